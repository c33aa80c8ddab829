"""scripts/mpi_pytest.py: pytest under mpiexec with one readable report.

Each test launches ``mpiexec -n 3`` on a tiny generated test file, so it
runs in the serial session only; marked ``system`` (whole pytest sessions
under mpiexec, several seconds each), so CI runs it in its last stage.
"""
import os
import subprocess
import sys

import pytest
from mpi4py import MPI

from mpibn.cli.launch import find_mpiexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "mpi_pytest.py")
pytestmark = [pytest.mark.system,
              pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own mpiexec")]

TESTS = '''
import time
from mpi4py import MPI
import pytest

def test_one():
    assert True

@pytest.mark.mpi(min_size=2)
def test_two():
    if MPI.COMM_WORLD.Get_rank() == SLOW_RANK:
        time.sleep(2)
    assert MPI.COMM_WORLD.Get_rank() != FAILING_RANK, "rank %d fails on purpose" % FAILING_RANK
'''


def launch(tmp_path, failing_rank, *runner_args, slow_rank=-1):
    (tmp_path / "test_tiny.py").write_text(
        TESTS.replace("FAILING_RANK", str(failing_rank)).replace("SLOW_RANK", str(slow_rank)))
    logs = tmp_path / "logs"
    cmd = [find_mpiexec(), "-n", "3", sys.executable, "-m", "mpi4py", SCRIPT, "--logs", str(logs),
           *runner_args, "-q", "--with-mpi", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
           str(tmp_path / "test_tiny.py")]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return out, logs


def test_one_report_on_the_terminal_and_each_rank_in_its_file(tmp_path):
    out, logs = launch(tmp_path, -1)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("MPI Information") == 1              # plain pytest under mpiexec: 3
    assert out.stdout.count("2 passed in") == 1
    assert "ranks 1-2 agree with rank 0 (exit 0: 2 passed)" in out.stdout
    for rank in (1, 2):
        log = (logs / f"rank{rank}.log").read_text()
        assert f"rank: {rank}" in log and "2 passed in" in log


def test_a_rank_that_fails_alone_is_shown_with_its_log(tmp_path):
    out, logs = launch(tmp_path, 2)
    assert out.returncode != 0
    assert out.stdout.count("2 passed in") == 1                    # rank 0 passed
    assert "===== rank 2: exit 1: 1 passed, 1 failed (rank 0: exit 0: 2 passed)" in out.stdout
    assert "rank 2 fails on purpose" in out.stdout                 # rank 2's failure, from its log
    assert "===== rank 1" not in out.stdout                        # rank 1 agreed: not repeated


def test_rank_0_failing_still_lets_every_rank_finish_and_check_after_the_job(tmp_path):
    # Rank 2 finishes last: a failing rank 0 that exits first must not abort it unrecorded.
    out, logs = launch(tmp_path, 0, "--no-check", slow_rank=2)
    assert out.returncode != 0
    assert "rank 0 fails on purpose" in out.stdout and "agree" not in out.stdout
    check = subprocess.run([sys.executable, SCRIPT, "--check", str(logs), "--np", "3"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert "===== rank 1: exit 0: 2 passed (rank 0: exit 1: 1 passed, 1 failed)" in check.stdout
    (logs / "rank2.json").unlink()                                  # a rank that left no result
    check = subprocess.run([sys.executable, SCRIPT, "--check", str(logs), "--np", "3"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "===== rank 2: no result" in check.stdout
