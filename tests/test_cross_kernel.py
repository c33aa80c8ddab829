"""One answer on every machine: the same inputs give the same bytes under
every OpenBLAS kernel.

NumPy's wheels ship an OpenBLAS that picks its kernel from the CPU at run
time, and each kernel adds in its own order; ``OPENBLAS_CORETYPE`` forces
one, so four kernels stand in for four machines. Each runs
tests/scripts/cross_kernel.py in a subprocess (default and exact mode, 2-D
and 4-D, float16/32/64, one and several ranks through
``mpibn.testing.reference``, small and blocked arrays) and the digests of
every rank's results must be equal. The script also digests two BLAS sums
(a dot and a gemv): they must differ between kernels, or the kernels did
not change and the test could not fail.

NumPy's own SIMD level is varied too (``NPY_DISABLE_CPU_FEATURES``).

On kernels this CPU cannot run OpenBLAS falls back to another one; the
test compares the distinct kernels that ran (at least two).
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "cross_kernel.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("Prescott", "Sandybridge", "Haswell", "SkylakeX")


def run(coretype, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    env.update(extra)
    env.update(OPENBLAS_CORETYPE=coretype, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_same_bytes_under_every_openblas_kernel():
    pytest.importorskip("threadpoolctl")
    runs = {k: run(k) for k in KERNELS}
    kernels = {r["kernel"] for r in runs.values()}
    if len(kernels) < 2:
        pytest.skip(f"OPENBLAS_CORETYPE changed nothing here (kernel {kernels})")
    # The controls: BLAS sums do depend on the kernel (else nothing is tested).
    assert len({r["control"] for r in runs.values()}) > 1, {k: r["control"] for k, r in runs.items()}
    first, base = KERNELS[0], runs[KERNELS[0]]["cases"]
    assert len(base) >= 20
    differ = {f"{k} ({runs[k]['kernel']}) vs {first}": [c for c in base if runs[k]["cases"][c] != base[c]]
              for k in KERNELS[1:]}
    assert not any(differ.values()), differ


@pytest.mark.timeout(300)
def test_same_bytes_without_numpys_simd_dispatch():
    """NumPy's own loops are compiled for several SIMD levels and picked from
    the CPU too; its sums must not depend on the level either (baseline only,
    every dispatched level disabled)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__ as dispatched
    except ImportError:                                  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__ as dispatched
    if not dispatched:
        pytest.skip("this NumPy dispatches to no SIMD level above its baseline")
    plain = run("Haswell", NPY_DISABLE_CPU_FEATURES=" ".join(dispatched))
    assert plain["cases"] == run("Haswell")["cases"]
