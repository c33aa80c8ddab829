"""Issue 10 (hardening) across ranks: agreed errors on every rank, never a hang or a mix.

In-process tests run under ``mpiexec -n 4 python -m mpi4py -m pytest
--with-mpi``; every rank asserts, after all collectives are done. Cases that
used to abort or hang the whole job run in their own ``mpiexec -n 4``
(``tests/scripts/mismatch_job.py``) from the serial pytest run, with a
bounded timeout.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn import exact as E
from mpibn import functional as F
from mpibn.agree import AgreementError
from mpibn.comm import group_comm_for
from mpibn.sync import sync_batch_norm
from conftest import global_batch, shard_slices
from oracle import plain_batch_norm
from test_faults_mpi import check_agreed, named_ranks

C = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]


def world():
    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()


def attempt(fn):
    try:
        return None, fn()
    except Exception as exc:     # noqa: BLE001 - inspected on every rank below
        return exc, None


def gather(comm, err):
    return comm.allgather(None if err is None else (type(err).__name__, str(err)))


def data(rank, n=4, shape=None, dtype=np.float32, step=0):
    return np.random.default_rng(100 + rank + 17 * step).normal(2.0, 3.0, shape or (n, C, 2, 2)).astype(dtype)


def state(bn):
    return [p.data.tobytes() for p in bn.get_parameters()] + [
        None if p.grad is None else p.grad.tobytes() for p in bn.get_parameters()]


# -- item 1: ranks that disagree on train/eval ---------------------------------------------

@pytest.mark.mpi(min_size=2)
def test_default_mode_lets_one_rank_evaluate_between_steps():
    # The common pattern the default must keep: rank 0 alone evaluates a
    # validation batch between two training steps. No collective, no error.
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm)
    means = []
    for step in (1, 2):
        bn.set_train()
        x = data(rank, step=step)
        bn(x)
        bn.backward(np.ones_like(x))
        means.append(bn.batch_mean.copy())
        if rank == 0:
            bn.set_train(False)
            bn(data(rank, n=2, step=9))
    bn.close()
    assert all(m.tobytes() == o.tobytes() for m, o in zip(means, comm.bcast(means)))


@pytest.mark.mpi(min_size=2)
def test_lockstep_catches_a_rank_that_evaluated_instead_of_training():
    # The issue's scenario, opted in: rank 0 forgot set_train(True) for step 1.
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm, lockstep=True)
    moving = state(bn)[:4]
    errs = []
    for step in (1, 2):
        bn.set_train(not (rank == 0 and step == 1))
        x = data(rank, step=step)
        err, _ = attempt(lambda: (bn(x), bn.backward(np.ones_like(x))))
        if err is not None:
            errs.append((step, err))
            break
    seen = gather(comm, errs[0][1] if errs else None)
    after = state(bn)[:4]
    bn.close()
    (step, err), = errs
    assert step == (2 if rank == 0 else 1)
    assert isinstance(err, RuntimeError) and len(set(seen)) == 1, seen
    assert "ranks are in different layer calls" in str(err)
    assert f"rank 0: layer 1 forward call 2; ranks {list(range(1, size))}: layer 1 forward call 1" in str(err)
    assert after == moving                         # no statistics of two steps were mixed in


@pytest.mark.mpi(min_size=2)
def test_lockstep_with_every_rank_evaluating_works():
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm, lockstep=True)
    err, _ = attempt(lambda: [(bn.set_train(s != 2), bn(data(rank, step=s))) for s in (1, 2, 3)])
    seen = gather(comm, err)
    bn.close()
    assert seen == [None] * size


def _job(scenario, env_extra=None, timeout=150):
    from mpibn.cli.launch import _RANK_VARIABLES, find_mpiexec
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES and not k.startswith("PMI")}
    env.update(env_extra or {})
    script = os.path.join(ROOT, "tests", "scripts", "mismatch_job.py")
    try:
        out = subprocess.run([find_mpiexec(), "-n", "4", sys.executable, "-m", "mpi4py", script, scenario],
                             capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hang: {scenario} still running after {timeout} s\n{exc.stdout}\n{exc.stderr}")
    lines = {}
    for line in out.stdout.splitlines():
        m = re.match(r"rank (\d) step (\d): (.*)", line)
        if m:
            lines[int(m[1]), int(m[2])] = m[3]
    return out, lines


@pytest.mark.timeout(200)
@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own mpiexec")
def test_issue_scenario_eval_step1_with_lockstep_from_the_environment():
    out, lines = _job("eval_step1", {"MPIBN_LOCKSTEP": "1"})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    errors = {lines[(0, 2)], lines[(1, 1)], lines[(2, 1)], lines[(3, 1)]}
    assert lines[(0, 1)].startswith("ok training=False"), text
    assert len(errors) == 1, text                    # the same error on every rank
    assert errors.pop().startswith("RuntimeError: SyncBatchNorm(num_features=3).construct (group ranks "
                                   "[0, 1, 2, 3]): ranks are in different layer calls"), text
    assert "rank 0: layer 1 forward call 2; ranks [1, 2, 3]: layer 1 forward call 1" in text


# -- item 2: x changed in place, across ranks -----------------------------------------------

@pytest.mark.mpi(min_size=2)
def test_x_changed_in_place_on_one_rank_is_agreed():
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm).set_train()
    x = data(rank)
    bn(x)
    before = state(bn)
    if rank == size - 1:
        x *= 10
    err, _ = attempt(lambda: bn.backward(np.ones_like(x)))
    seen = gather(comm, err)
    after = state(bn)
    x2 = data(rank, step=1)
    ok, _ = attempt(lambda: (bn(x2), bn.backward(np.ones_like(x2))))   # the ranks are still in step
    bn.close()
    check_agreed(seen, err, RuntimeError, [size - 1], size, "x was modified in place between forward()")
    assert after == before
    assert ok is None


# -- item 3: a rank whose H or W is 0 -------------------------------------------------------

@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("exact", [False, True])
def test_rank_with_zero_width_counts_zero(exact):
    comm, rank, size = world()
    x_all, dy_all = global_batch(5, (2 * size, C, 3, 4), offset=1.0)
    sl = shard_slices([2] * size)[rank]
    empty = rank == 1
    x = x_all[sl][:, :, :, :0] if empty else x_all[sl]
    dy = dy_all[sl][:, :, :, :0] if empty else dy_all[sl]
    bn = SyncBatchNorm(C, comm=comm, dtype=np.float64, exact=exact).set_train()
    err, out = attempt(lambda: (bn(x), bn.backward(dy)))
    seen = gather(comm, err)
    bn.close()
    keep = np.concatenate([x_all[shard_slices([2] * size)[r]] for r in range(size) if r != 1])
    _, _, mean, var = plain_batch_norm(keep, keep, np.ones(C), np.zeros(C), 1e-5)
    assert seen == [None] * size
    np.testing.assert_allclose(bn.batch_mean, mean, rtol=1e-13)
    np.testing.assert_allclose(bn.batch_var, var, rtol=1e-12)
    assert out[0].shape == x.shape and out[1].shape == x.shape


# -- item 4: the stateless API with different channel counts -------------------------------

@pytest.mark.mpi(min_size=2)
def test_stateless_channel_mismatch_is_agreed_in_process():
    comm, rank, size = world()
    channels = 5 if rank == 1 else 4
    group = group_comm_for(comm, None)
    x = np.random.default_rng(rank).normal(size=(3, channels))
    err, _ = attempt(lambda: sync_batch_norm(x, np.ones(channels), np.zeros(channels), group_comm=group))
    seen = gather(comm, err)
    calls = group.allreduce_calls
    ok, _ = attempt(lambda: sync_batch_norm(x[:, :4], np.ones(4), np.zeros(4), group_comm=group))
    calls = group.allreduce_calls - calls
    group.release()
    assert isinstance(err, ValueError) and len(set(seen)) == 1, seen
    others = [r for r in range(size) if r != 1]
    assert f"got ranks {others}: 4 channels, exact=False; rank 1: 5 channels, exact=False" in str(err)
    assert ok is None and calls == 2          # the agreement, then the one exchange


@pytest.mark.timeout(200)
@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own mpiexec")
def test_stateless_channel_mismatch_does_not_abort_the_job():
    out, lines = _job("stateless_channels")
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "truncated" not in text, text
    said = {lines[(r, 1)] for r in range(4)}
    assert len(said) == 1, text
    assert said.pop().startswith("ValueError: sync_batch_norm (group ranks [0, 1, 2, 3]): every rank") and \
        "got ranks [0, 2, 3]: 4 channels, exact=False; rank 1: 5 channels, exact=False" in text


# -- item 5: any exception before the collective joins it ------------------------------------

@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("where", ["forward", "backward", "backward dy layout", "exact forward"])
def test_exception_deep_in_the_math_on_one_rank_is_agreed(where, monkeypatch):
    comm, rank, size = world()
    bad = size - 1
    # "backward dy layout": dy's reshape to (B, C, L), the first local step of backward
    target = {"forward": (F, "batch_norm_stats"), "backward": (F, "batch_norm_backward_reduce"),
              "backward dy layout": (F, "as_ncl"), "exact forward": (E, "exact_sums")}[where]
    original = getattr(*target)

    def broken(*args, **kwargs):
        if rank == bad:
            raise IndexError("deep inside the math")
        return original(*args, **kwargs)
    bn = SyncBatchNorm(C, comm=comm, exact=where.startswith("exact")).set_train()
    x = data(rank)
    backward = where.startswith("backward")
    if backward:
        bn(x)
    before = state(bn)
    monkeypatch.setattr(*target, broken)
    err, _ = attempt(lambda: bn.backward(np.ones_like(x)) if backward else bn(x))
    monkeypatch.undo()
    seen = gather(comm, err)
    after = state(bn)
    bn.close()
    check_agreed(seen, err, IndexError, [bad], size, "IndexError raised in this rank's own computation")
    cause = err.__cause__
    assert (isinstance(cause, IndexError) and str(cause) == "deep inside the math") == (rank == bad)
    assert after == before


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["matrix", "masked"])
def test_matrix_or_masked_input_on_one_rank_is_agreed(kind):
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm).set_train()
    x = data(rank, shape=(4, C))
    if rank == 0:
        x = np.asmatrix(x) if kind == "matrix" else np.ma.masked_array(x, mask=x > 2)
    err, _ = attempt(lambda: bn(x))
    seen = gather(comm, err)
    bn.close()
    says = "x is a numpy.matrix" if kind == "matrix" else "x is a numpy.ma.MaskedArray; its mask would be ignored"
    check_agreed(seen, err, TypeError, [0], size, says)


# -- items 9, 10: construction ---------------------------------------------------------------

@pytest.mark.mpi(min_size=4)
def test_same_partition_in_another_order_is_accepted():
    comm, rank, size = world()
    groups = [[1, 0], [3, 2]] if rank % 2 else [[2, 3], [0, 1]]
    err, bn = attempt(lambda: SyncBatchNorm(C, process_groups=groups, comm=comm))
    ranks = None if bn is None else bn.group_comm.ranks
    seen = gather(comm, err)
    if bn is not None:
        bn.close()
    assert seen == [None] * size
    assert ranks == ((0, 1) if rank < 2 else (2, 3))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("arg, name", [("gamma_init", "gamma"), ("moving_mean_init", "mean")])
def test_rank_dependent_initial_values_are_refused(arg, name):
    comm, rank, size = world()
    init = np.full(C, 1.0 + (rank == size - 1))
    err, bn = attempt(lambda: SyncBatchNorm(C, comm=comm, **{arg: init}))
    seen = gather(comm, err)
    if bn is not None:
        bn.close()
    assert isinstance(err, AgreementError) and len(set(seen)) == 1, seen
    msg = str(err)
    assert f"initial {name} ({arg}): ranks {list(range(size - 1))} have '" in msg
    assert f"[1, 1, 1]', rank {size - 1} has '" in msg and "[2, 2, 2]'" in msg


# -- item 11: moving statistics that overflow their dtype -----------------------------------

@pytest.mark.mpi(min_size=2)
def test_float16_moving_variance_overflow_raises_on_every_rank():
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm, dtype=np.float16).set_train()
    before = state(bn)
    x = (np.random.default_rng(rank).normal(0, 1500, (4, C))).astype(np.float16)
    err, _ = attempt(lambda: bn(x))
    seen = gather(comm, err)
    after = state(bn)
    bn.close()
    assert isinstance(err, FloatingPointError) and len(set(seen)) == 1, seen
    assert "the moving variance overflows float16" in str(err)
    assert after == before


# -- item 19: messages ------------------------------------------------------------------------

@pytest.mark.mpi(min_size=2)
def test_the_same_mistake_on_every_rank_is_said_once():
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm).set_train()
    err, _ = attempt(lambda: bn(data(rank).astype(np.int64)))
    seen = gather(comm, err)
    bn.close()
    assert len(set(seen)) == 1
    assert str(err).count("x has dtype int64") == 1
    assert f"ranks {list(range(size))}: x has dtype int64" in str(err)
    assert named_ranks(str(err)) == set(range(size))


@pytest.mark.mpi(min_size=2)
def test_tags_number_layers_as_constructed():
    comm, rank, size = world()
    first, second = (SyncBatchNorm(C, comm=comm).set_train() for _ in range(2))
    x = data(rank)
    err, _ = attempt(lambda: (second if rank == size - 1 else first)(x))
    seen = gather(comm, err)
    first.close()
    second.close()
    assert len(set(seen)) == 1
    assert (f"ranks {list(range(size - 1))}: layer 1 forward call 1; rank {size - 1}: layer 2 forward call 1"
            in str(err)), str(err)
