"""End-to-end: the documented example and the demo, each in its own mpiexec.

These launch ``mpiexec -n 4`` themselves (with a timeout), so they run in
the serial pytest session and are skipped when pytest itself runs under
mpiexec.
"""
import os
import subprocess
import sys

import pytest
from mpi4py import MPI

from mpibn.launch import find_mpiexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own mpiexec")


def run(args, timeout=120):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_documented_example_prints_0_999995_on_every_rank():
    out = run([find_mpiexec(), "-n", "4", sys.executable, "-m", "mpi4py", "scripts/doc_example.py"])
    assert out.returncode == 0, out.stderr
    for rank in range(4):
        assert f"rank {rank}: float32" in out.stdout
    assert out.stdout.count("0.999995") == 4 * 12
    numbers = [t.strip("[]") for t in out.stdout.split() if t.strip("[]").replace(".", "").isdigit()]
    assert set(numbers) == {"0.999995"}


def test_demo_on_four_ranks_matches_concatenated_batch():
    out = run([sys.executable, "-m", "mpibn", "demo", "--np", "4"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "equal the concatenated batch's" in out.stdout
    assert out.stdout.count("Allreduce calls 2") == 4
    assert " 0 of 10 samples" in out.stdout       # an empty rank took part


def test_cli_help_and_bad_option():
    assert "demo" in run([sys.executable, "-m", "mpibn", "--help"]).stdout
    bad = run([sys.executable, "-m", "mpibn", "demo", "--np", "0"])
    assert bad.returncode == 2 and "--np must be at least 1" in bad.stderr


def test_cli_bench_help_lists_the_benchmark_options():
    out = run([sys.executable, "-m", "mpibn", "bench", "--help"])
    assert out.returncode == 0 and "--np" in out.stdout and "--smoke" in out.stdout
    assert "bench" in run([sys.executable, "-m", "mpibn", "--help"]).stdout
