"""A rank that raises, exits or is killed mid-step ends the whole job promptly.

Each test launches its own ``mpiexec -n 4 python -m mpi4py
scripts/fault_job.py`` in a subprocess (the mpiexec next to this Python,
``mpibn.cli.launch.find_mpiexec``), so it runs in the serial pytest run and is
skipped when pytest itself runs under mpiexec. The failing rank writes the
time of its fault to a stamp file; the job must then end, with a non-zero
exit status, within DEADLINE seconds of the fault. A job still alive then
is a hang: its process group is killed and the test fails.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
from mpi4py import MPI

from mpibn.cli.launch import _RANK_VARIABLES, find_mpiexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "fault_job.py")
DEADLINE = 10.0          # seconds from the fault to the end of the job (issue 6)
STARTUP = 120.0          # seconds allowed for mpiexec to start 4 Pythons on a busy machine

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1,
                                reason="launches its own mpiexec; runs in the serial pytest run")


def run_job(tmp_path, fault, rank, np_=4, step=2):
    """Run fault_job.py; return (exit status, seconds from fault to end or None, output)."""
    stamp = tmp_path / "fault.stamp"
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES and not k.startswith("PMI")}
    cmd = [find_mpiexec(), "-n", str(np_), sys.executable, "-m", "mpi4py", SCRIPT,
           "--fault", fault, "--rank", str(rank), "--step", str(step), "--stamp", str(stamp)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    start, fault_at = time.monotonic(), None
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if fault_at is None and stamp.exists():
                fault_at = now
            limit = STARTUP if fault_at is None else fault_at + DEADLINE - start
            if now - start > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                out = proc.communicate()[0]
                pytest.fail(f"hang: job still running {now - start:.1f} s after start "
                            f"({'no fault yet' if fault_at is None else f'{now - fault_at:.1f} s after the fault'})"
                            f"\n{out}")
            time.sleep(0.02)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    if fault_at is None and stamp.exists():         # the job ended between two polls
        fault_at = ended
    after = None if fault_at is None else ended - fault_at
    return proc.returncode, after, out


@pytest.mark.timeout(STARTUP + 2 * DEADLINE)
@pytest.mark.parametrize("fault, rank", [("raise", 1), ("raise", 0), ("kill", 2), ("kill", 0), ("exit", 3),
                                         ("badx", 2), ("nan", 1)])
def test_failing_rank_ends_the_job(tmp_path, fault, rank):
    rc, after, out = run_job(tmp_path, fault, rank)
    agreed = {"badx": "TypeError: SyncBatchNorm(num_features=4).construct (group ranks [0, 1, 2, 3]): "
                      "rank 2: x has dtype int32",
              "nan": "FloatingPointError: SyncBatchNorm(num_features=4).construct: NaN or Inf in the "
                     "training batch at rank 1 channel 1"}
    print(f"{fault} on rank {rank}: exit status {rc}, job ended {after:.2f} s after the fault")
    assert after is not None, out            # the fault happened ...
    assert rc != 0, out                      # ... and the job failed, promptly (run_job's deadline)
    assert f"fault_job: rank {rank} step 2: {fault}" in out
    assert "steps done" not in out
    if fault in agreed:                      # the agreed error, uncaught, ended the job
        assert agreed[fault] in out, out


@pytest.mark.timeout(STARTUP + 2 * DEADLINE)
def test_control_job_without_fault_succeeds(tmp_path):
    rc, after, out = run_job(tmp_path, "none", 1)
    assert (rc, after) == (0, None), out
    assert "fault_job: 5 steps done on 4 ranks" in out
