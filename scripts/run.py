#!/usr/bin/env python3
"""Set up a virtual environment and run mpibn's main job or its tests.

    python3 scripts/run.py demo     # venv + install, then the 4-rank demo and the doc example
    python3 scripts/run.py test     # venv + install, then the three test stages below
    python3 scripts/run.py test tests/test_layer.py -x    # pytest arguments go to every stage

Only the Python standard library is needed to start: the script creates
``.venv`` (or ``$MPIBN_VENV``), installs mpibn with its ``mpich`` and
``test`` extras (the ``mpich`` wheel brings ``mpiexec``), and runs.
Every MPI run is bounded by a timeout so that nothing can hang.

``test`` runs, and times, three stages (CI runs this, ``.ci/run``):

1. serial: ``pytest -m "not system"``;
2. ``mpiexec -n 4``: the MPI-marked tests (``-m "mpi and not system"``)
   under ``scripts/mpi_pytest.py --with-mpi``, which shows rank 0's report
   and keeps the other ranks' output in files, printed only for a rank
   that failed or counted differently. Unmarked tests use ``COMM_SELF``
   (tests/conftest.py), so stage 1 already ran them as each rank would;
   repeating them on 4 oversubscribed ranks doubled the suite's time. The
   plain ``mpiexec -n 4 python -m mpi4py -m pytest --with-mpi`` still runs
   everything;
3. system: ``pytest -m system`` (the wheel in a fresh venv, emulated
   hosts), serially, last: slow, and it needs the rest to work.

It exits non-zero when any stage fails. A stage that selects no test
(pytest exit 5) passes only where that can be right: the system stage,
or any stage when pytest arguments were given.
"""
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("MPIBN_VENV", os.path.join(ROOT, ".venv"))
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PY = os.path.join(BIN, "python")


def ranks(text):
    """MPIBN_NP: the ranks of the mpiexec stage, an integer >= 1 (default 4)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        sys.exit(f"run.py: MPIBN_NP must be an integer >= 1 (the ranks of the mpiexec stage), got {text!r}")
    return value


NP = ranks(os.environ.get("MPIBN_NP", "").strip() or "4")


def sh(*cmd, timeout=None):
    print("+", " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"run.py: timed out after {timeout} s: {' '.join(cmd)}", flush=True)
        return 124


def setup(extras):
    if not os.path.exists(PY):
        if sh(sys.executable, "-m", "venv", VENV):
            sys.exit("run.py: could not create the virtual environment")
    if sh(PY, "-m", "pip", "install", "--quiet", "-e", f".[{extras}]"):
        sys.exit("run.py: pip install failed")


def mpiexec(*args, timeout):
    return sh(os.path.join(BIN, "mpiexec"), "-n", str(NP), PY, "-m", "mpi4py", *args, timeout=timeout)


def stage(results, name, run, no_tests_ok):
    print(f"\n===== run.py: {name} =====", flush=True)
    t0 = time.monotonic()
    rc = run()
    seconds = time.monotonic() - t0
    ok = rc == 0 or (rc == 5 and no_tests_ok)          # 5: pytest selected no test
    print(f"===== run.py: {name}: exit {rc}{'' if ok else ' FAILED'} in {seconds:.0f} s =====",
          flush=True)
    results.append((name, rc, ok, seconds))


def test(extra):
    results = []
    selected = bool(extra)      # the user's own selection may leave a stage without tests
    stage(results, "serial", lambda: sh(PY, "-m", "pytest", "-q", "-m", "not system", *extra,
                                        timeout=1200), selected)
    logs = tempfile.mkdtemp(prefix="mpibn-pytest-ranks-")

    def parallel():
        rc = mpiexec(os.path.join(ROOT, "scripts", "mpi_pytest.py"), "--logs", logs, "--no-check",
                     "-q", "--with-mpi", "-m", "mpi and not system", *extra, timeout=1200)
        # After the job, so that it also reports ranks that mpiexec ended early.
        checked = sh(sys.executable, os.path.join(ROOT, "scripts", "mpi_pytest.py"),
                     "--check", logs, "--np", str(NP))
        return rc or checked

    stage(results, f"mpiexec -n {NP}", parallel, selected)
    stage(results, "system", lambda: sh(PY, "-m", "pytest", "-q", "-m", "system", *extra,
                                        timeout=1500), True)
    print(f"run.py: every rank's output of the mpiexec stage: {logs}")
    total = sum(seconds for *_, seconds in results)
    print("run.py: " + " | ".join(f"{name} exit {rc} {seconds:.0f} s" for name, rc, _, seconds in results)
          + f" | total {total:.0f} s: " + ("OK" if all(ok for _, _, ok, _ in results) else "FAILED"),
          flush=True)
    return 0 if all(ok for _, _, ok, _ in results) else 1


def main(argv):
    job = argv[1] if len(argv) > 1 else "demo"
    if job == "demo":
        setup("mpich")
        rc = sh(PY, "-m", "mpibn", "demo", "--np", str(NP), timeout=300)
        return rc or mpiexec("scripts/doc_example.py", timeout=120)
    if job == "test":
        setup("mpich,test")
        return test(argv[2:])
    sys.exit(f"usage: python3 scripts/run.py demo|test [pytest args]; got {job!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
