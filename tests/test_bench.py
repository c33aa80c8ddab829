"""mpibn bench runs and writes its JSON (tiny shapes; no timing is asserted)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from mpi4py import MPI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="runs its own process")


def bench(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "mpibn", "bench", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_bench_smoke_writes_numbers(tmp_path):
    out = bench("--smoke", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "performance.json").read_text())
    assert [r["dtype"] for r in report["results"]] == ["float32", "float16"]
    assert report["command"] == f"mpibn bench --smoke --out {tmp_path}"
    for r in report["results"]:
        assert {"mpibn", "mpibn_fwd", "mpibn_bwd", "copy", "naive"} <= set(r["times_s"])
        assert all(v > 0 for v in r["times_s"].values())
        assert {"mpibn_fwd", "mpibn_bwd"} <= set(r["peak_temp_x_input"])
    assert "/naive" in out.stdout and "timing" in out.stderr        # table and progress line


def test_bench_smoke_never_replaces_the_committed_numbers(tmp_path):
    committed = os.path.join(ROOT, "docs", "performance.json")
    before = os.stat(committed).st_mtime_ns
    with open(committed, "rb") as f:
        content = f.read()
    out = bench("--smoke", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with open(committed, "rb") as f:
        assert f.read() == content
    assert os.stat(committed).st_mtime_ns == before
    wrote = out.stdout.rsplit("wrote ", 1)[1].split()[0]
    folder = os.path.dirname(wrote)
    try:
        assert os.path.isfile(wrote)
        assert os.path.basename(folder).startswith("mpibn-bench-smoke-")
        assert not os.path.samefile(folder, os.path.join(ROOT, "docs"))
        assert not (tmp_path / "performance.json").exists()
    finally:
        if os.path.basename(folder).startswith("mpibn-bench-smoke-"):
            shutil.rmtree(folder)


def test_bench_help_from_outside_the_checkout(tmp_path):
    out = bench("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m mpibn bench")      # run as python -m mpibn
    assert "--np" in out.stdout and "--smoke" in out.stdout


def test_scripts_bench_still_runs_the_packaged_benchmark():
    out = subprocess.run([sys.executable, "scripts/bench.py", "--help"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: mpibn bench" in out.stdout, out.stderr


def test_bench_grid_smoke_writes_cells_and_heat_map(tmp_path):
    out = bench("--grid", "--smoke", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "performance-grid.json").read_text())
    cells = report["cells"]
    assert [(tuple(c["shape"]), c["dtype"]) for c in cells] == [
        ((2, 3), "float32"), ((2, 3), "float16"), ((2, 2, 3, 3), "float32"), ((2, 2, 3, 3), "float16")]
    for c in cells:
        assert c["mpibn_s"] > 0 and c["plan"] == "whole"
        assert (c["floor_s"] is not None) == (c["dtype"] == "float16")
    assert report["unset"] == ["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"] and report["blas"]
    assert "mpibn us" in out.stdout and "[4/4]" in out.stderr           # table and progress line
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "performance-grid.png").stat().st_size > 1000


def test_bench_grid_verdicts_apply_the_bars():
    from mpibn.cli.bench.grid import verdicts

    def c(shape, dtype, ratio, seconds=1e-3):
        return {"shape": list(shape), "dtype": dtype, "ratio": ratio, "mpibn_s": seconds}
    cells = [c((2, 4, 3, 3), "float32", 2.0, 120e-6), c((2, 4, 3, 3), "float64", 0.5),
             c((16, 8), "float32", 4.0), c((16, 8), "float16", 40.0)]     # float16 not in the bars
    (geo, doubles, worst, over, tiny) = verdicts(cells)
    assert geo[0].startswith("geometric mean") and abs(geo[1] - 4.0 ** (1 / 3)) < 1e-12 and geo[2] == 1.7
    assert "1 float64 cells" in doubles[0] and doubles[1:3] == (0.5, 1.4)
    assert "(16, 8) float32" in worst[0] and worst[1:3] == (4.0, 3.5)
    assert over[1:3] == (1, 0)
    assert tiny[0].startswith("(2, 4, 3, 3) float32") and tiny[1:3] == (2.0, 1.0)


def test_scripts_bench_writes_into_docs_and_mpibn_bench_does_not():
    """Issue 19: ``mpibn bench`` writes into the current directory; the checkout's
    scripts/bench.py is the one way to refresh docs/ (never for a --smoke run)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_script", os.path.join(ROOT, "scripts", "bench.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    docs = os.path.join(ROOT, "docs")
    assert script.with_docs_out(["--np"]) == ["--np", "--out", docs]
    assert script.with_docs_out(["--grid", "--out", "x"]) == ["--grid", "--out", "x"]
    assert script.with_docs_out(["--smoke"]) == ["--smoke"]


def test_bench_floor_is_the_layers_arithmetic():
    # scripts/bench_floor.py times the tiny step's NumPy calls alone as the
    # floor of what the layer could reach; it first checks that those calls
    # give the layer's y and dx bit for bit (else it would time something else).
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench_floor
    finally:
        sys.path.pop(0)
    from mpibn.cli.bench import data, layer
    x, dy = data(bench_floor.SHAPE, bench_floor.DTYPE)
    bn = layer(bench_floor.SHAPE[1], bench_floor.DTYPE)
    g, b = bn.gamma.data.astype("float64"), bn.beta.data.astype("float64")
    rm, rv = bn.moving_mean.data.copy(), bn.moving_variance.data.copy()
    y, dx, dgamma, dbeta = bench_floor.numpy_floor(x, dy, g, b, rm, rv)()
    assert y.tobytes() == bn(x).tobytes() and dx.tobytes() == bn.backward(dy).tobytes()
    assert dgamma.tobytes() == bn.gamma.grad.tobytes() and dbeta.tobytes() == bn.beta.grad.tobytes()
    assert rm.tobytes() == bn.moving_mean.data.tobytes() and rv.tobytes() == bn.moving_variance.data.tobytes()
    bn.close()
