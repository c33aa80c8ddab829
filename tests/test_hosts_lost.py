"""debug_timeout names a rank that arrived in a collective and then went
silent inside it (the one-host form of a dead host or a cut link; the
emulated-host tests in test_hosts_faults.py need root, this one does not).
Failed before ``GroupComm._silent``: the message said "never arrived: none"."""
import os
import subprocess
import sys

import pytest
from mpi4py import MPI

from mpibn.cli.launch import find_mpiexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(90)
@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own mpiexec")
def test_debug_timeout_names_a_rank_lost_inside_the_collective():
    script = os.path.join(ROOT, "tests", "scripts", "stall_in_call.py")
    proc = subprocess.Popen([find_mpiexec(), "-n", "3", sys.executable, "-m", "mpi4py", script],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode != 0
    assert "CollectiveTimeout" in text, text
    assert "never arrived: none; lost (arrived, then silent 2.0 s after the deadline: dead or cut off): [2]" \
        in text, text
