"""scripts/bench.py runs and writes its JSON (tiny shapes; no timing is asserted)."""
import json
import os
import subprocess
import sys

import pytest
from mpi4py import MPI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="runs its own process")


def test_bench_smoke_writes_numbers(tmp_path):
    out = subprocess.run([sys.executable, "scripts/bench.py", "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "performance.json").read_text())
    assert [r["dtype"] for r in report["results"]] == ["float32", "float16"]
    for r in report["results"]:
        assert {"mpibn", "mpibn_fwd", "mpibn_bwd", "copy", "naive"} <= set(r["times_s"])
        assert all(v > 0 for v in r["times_s"].values())
        assert {"mpibn_fwd", "mpibn_bwd"} <= set(r["peak_temp_x_input"])
    assert "/naive" in out.stdout and "timing" in out.stderr        # table and progress line
