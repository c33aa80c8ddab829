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
