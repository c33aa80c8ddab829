"""``python -m mpibn explain``: argument checks (serial) and a full run (MPI)."""
import argparse

import numpy as np
import pytest

from mpibn import explain
from mpibn.__main__ import main
from mpibn.launch import under_mpiexec


@pytest.mark.parametrize("argv", [
    ["explain", "--bogus"],
    ["explain", "--groups", "[1, 2]"],
    ["explain", "--groups", "not json"],
    ["explain", "--shards", "1,x"],
    ["explain", "--digits", "0"],
])
def test_bad_options_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["explain", "--shards", "1,2"],                   # 2 sizes for 4 ranks
    ["explain", "--groups", "[[0, 7]]"],              # rank id out of range
    ["explain", "--groups", "[[0, 1], [2]]"],         # rank 3 alone with 0 samples
])
def test_impossible_setups_are_refused_before_launching(argv, capsys):
    if under_mpiexec():
        pytest.skip("under mpiexec the ranks check the setup themselves (tested below)")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_check_setup():
    assert explain.check_setup([[0, 1], [2, 3]], [3, 1, 2, 0], 4) is None
    assert explain.check_setup(None, [1, 0, 1], 3) is None            # one group of 2 samples
    assert "holds 1 samples" in explain.check_setup([[0, 1]], [1, 0, 3], 3)
    assert "repeat" in explain.check_setup([[0, 1], [1]], [3, 3], 2)
    assert "sizes" in explain.check_setup(None, [3, 3], 3)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_explain_runs_and_agrees_with_the_concatenated_batch(capsys):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    args = argparse.Namespace(groups=None, shards=None, channels=2, digits=6, seed=0)
    rc = explain.run(args)
    out = capsys.readouterr().out
    rcs = comm.allgather(rc)
    assert rcs == [0] * comm.Get_size()
    if comm.Get_rank() == 0:
        assert "every group's result equals its concatenated batch" in out
        assert out.count("bitwise the same table on group ranks") == comm.Get_size()
        assert "MISMATCH" not in out
    else:
        assert out == ""


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_explain_refuses_bad_groups_on_every_rank(capsys):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    args = argparse.Namespace(groups=[[0, comm.Get_size()]], shards=None, channels=2, digits=6,
                              seed=0)
    rc = explain.run(args)
    out = capsys.readouterr().out
    assert comm.allgather(rc) == [2] * comm.Get_size()
    assert ("error:" in out) == (comm.Get_rank() == 0)


def test_buffer_tap_records_and_restores():
    class Fake:
        def allreduce_sum(self, buf, tag=(0, 0)):
            buf += 1.0 + tag[0]
            return buf
    fake = Fake()
    tap = explain.BufferTap(fake)
    fake.allreduce_sum(np.zeros(3), (2, 1))
    tap.close()
    (sent, back), = tap.calls
    assert np.array_equal(sent, np.zeros(3)) and np.array_equal(back, np.full(3, 3.0))
    assert fake.allreduce_sum(np.zeros(1))[0] == 1.0 and len(tap.calls) == 1
