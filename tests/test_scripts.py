"""End-to-end: the documented example and the demo, each in its own mpiexec.

These launch ``mpiexec -n 4`` themselves (with a timeout), so they run in
the serial pytest session and are skipped when pytest itself runs under
mpiexec.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

from mpibn.cli.launch import find_mpiexec

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
    # one block per rank, in rank order, never interleaved
    block = str(np.full((1, 3, 2, 2), 0.999995, dtype=np.float32))
    assert out.stdout == "".join(f"rank {r}: float32\n{block}\n" for r in range(4)), out.stdout


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


def test_console_script_usage_names_the_console_script():
    console = os.path.join(os.path.dirname(sys.executable), "mpibn")
    if not os.path.exists(console):
        pytest.skip("no mpibn console script next to this Python (not pip-installed)")
    assert run([console, "--help"]).stdout.startswith("usage: mpibn [-h]")
    for command in ("demo", "explain", "verify", "bench"):
        out = run([console, command, "--help"])
        assert out.returncode == 0 and out.stdout.startswith(f"usage: mpibn {command} "), out.stdout
    bad = run([console, "demo", "--np", "0"])
    assert bad.returncode == 2 and bad.stderr.startswith("usage: mpibn "), bad.stderr
    # python -m mpibn still says what was typed
    assert run([sys.executable, "-m", "mpibn", "--help"]).stdout.startswith("usage: python -m mpibn [-h]")
    assert run([sys.executable, "-m", "mpibn", "bench", "--help"]).stdout.startswith(
        "usage: python -m mpibn bench")


@pytest.mark.parametrize("command", [["demo"], ["explain"], ["golden", "--out", "{tmp}"]])
def test_np_that_disagrees_with_mpiexec_is_an_error_not_a_smaller_run(command, tmp_path):
    command = [c.replace("{tmp}", str(tmp_path / "g")) for c in command]
    out = run([find_mpiexec(), "-n", "2", sys.executable, "-m", "mpibn", *command, "--np", "4"])
    assert out.returncode != 0, out.stdout
    message = "--np 4 but mpiexec started 2 rank(s)"
    assert out.stderr.count(message) == 1, out.stderr        # said once, by rank 0
    assert "over 2 ranks" not in out.stdout and not (tmp_path / "g").exists()


def test_demo_under_mpiexec_without_np_runs_on_the_ranks_started():
    out = run([find_mpiexec(), "-n", "2", sys.executable, "-m", "mpibn", "demo"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "over 2 ranks" in out.stdout and out.stdout.count("Allreduce calls 2") == 2
    same = run([find_mpiexec(), "-n", "2", sys.executable, "-m", "mpibn", "demo", "--np", "2"])
    assert same.returncode == 0 and "over 2 ranks" in same.stdout, same.stdout + same.stderr
