"""``python -m mpibn explain``: argument checks (serial) and a full run (MPI)."""
import argparse

import numpy as np
import pytest

from mpibn.cli import explain
from mpibn.cli.main import main
from mpibn.cli.launch import under_mpiexec


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


def _run(groups=None, shards=None, digits=6, full=False):
    args = argparse.Namespace(groups=groups, shards=shards, channels=2, digits=digits, seed=0,
                              full=full)
    return explain.run(args)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("digits", [6, 17])
def test_explain_every_check_is_true(capsys, full, digits):
    # The review's failure: "bitwise the payload of the row sent: False" on
    # ranks 0 and 2, because explain recomputed xhat and summed it. Any
    # False anywhere in the output fails this test.
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rc = _run(digits=digits, full=full)
    out = capsys.readouterr().out
    rcs = comm.allgather(rc)
    assert rcs == [0] * comm.Get_size()
    if comm.Get_rank() == 0:
        assert "False" not in out
        assert "MISMATCH" not in out
        assert "all True" in out
        assert out.count("check: ") >= (7 * comm.Get_size() if full else 1)
        assert "layer 1 forward call 1" in out and "layer 2" not in out
    else:
        assert out == ""


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(60)
def test_explain_default_run_shows_the_mean_of_means_contrast(capsys):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rc = _run()
    out = capsys.readouterr().out
    assert comm.allgather(rc) == [0] * comm.Get_size()
    if comm.Get_rank() == 0:
        lines = out.splitlines()
        # Group [0, 1] holds 3 and 1 samples: the true mean 10.375, the mean
        # of the two ranks' means (10.0667 + 11.3)/2 = 10.6833.
        assert "mean = (3*10.0667 + 1*11.3)/4 = 10.375" in out
        assert "(10.0667 + 11.3)/2 = 10.6833" in out
        assert len(lines) < 100, len(lines)            # short by default
        # The sums shown are the ones the layer sent (read from the buffer).
        assert "sent sum_dy = -4, sum_dy_xhat = 1.21034" in out


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(60)
def test_explain_never_averages_an_empty_ranks_placeholder(capsys):
    # Review 2026-12, error 12: group [2, 3] printed "(9.35 + 0)/2 = 4.675":
    # the 0 is the placeholder mean of the empty rank 3, which has no mean.
    # A scheme averaging the means gets 0/0 = NaN there; explain says so.
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rc = _run()
    out = capsys.readouterr().out
    assert comm.allgather(rc) == [0] * comm.Get_size()
    if comm.Get_rank() == 0:
        assert "(9.35 + 0)/2" not in out and "4.675" not in out
        assert "rank 3 holds no values and so no mean" in out and "0/0 = NaN" in out
        assert "(10.0667 + 11.3)/2 = 10.6833: wrong, the counts differ" in out
        # Error 19: at most one non-zero entry per column, and the -0.0 caveat.
        assert "every column then has at\nmost one non-zero entry" in out
        assert "-0.0 comes back as +0.0" in out


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(60)
def test_explain_shows_no_table_and_counts_no_check_for_a_rank_alone(capsys):
    # Review 2026-12, error 19: rank 2 alone sent nothing, yet explain showed
    # "the table that came back" and counted the vacuous "bitwise the same
    # table on group ranks [2]: True" among the checks.
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rc = _run(groups=[[0, 1, 3]], full=True)          # --full prints every check
    out = capsys.readouterr().out
    assert comm.allgather(rc) == [0] * comm.Get_size()
    if comm.Get_rank() == 0:
        assert "on group ranks [2]" not in out
        assert "rank 2: alone: nothing is sent; its own row is the whole table" in out
    rc = _run(groups=[[0, 1, 3]])
    out = capsys.readouterr().out
    assert comm.allgather(rc) == [0] * comm.Get_size()
    if comm.Get_rank() == 0:
        assert "(10.0667 + 11.3)/2 = 10.6833: wrong, the counts differ; rank 3 holds no values" in out


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_explain_checks_catch_a_wrong_payload(capsys, monkeypatch):
    # The checks can fail: corrupt what the layer hands to MPI on one rank
    # and explain must report False and exit 1 on every rank.
    from mpi4py import MPI
    from mpibn import comm as mcomm
    comm = MPI.COMM_WORLD
    inner = mcomm.GroupComm.allreduce_sum

    def corrupting(self, buf, tag=(0, 0)):
        if tag[0] % 2 == 1 and comm.Get_rank() == 0:     # backward rows of rank 0
            buf[self.rank, -1] += 1.0
        return inner(self, buf, tag)
    monkeypatch.setattr(mcomm.GroupComm, "allreduce_sum", corrupting)
    rc = _run(groups=None, shards=[2] * comm.Get_size())
    out = capsys.readouterr().out
    assert comm.allgather(rc) == [1] * comm.Get_size()
    if comm.Get_rank() == 0:
        assert "False" in out and "MISMATCH" in out


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_explain_refuses_bad_groups_on_every_rank(capsys):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rc = _run(groups=[[0, comm.Get_size()]])
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
