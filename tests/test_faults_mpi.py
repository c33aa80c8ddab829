"""Agreed errors under mpiexec: one or several bad ranks, every rank raises.

For each fault a rank can make in its own input (bad x, NaN/Inf, too few
values, backward misuse, bad dy) the test checks on EVERY rank: the same
exception type and the same message, naming exactly the bad ranks; moving
statistics, parameters and gradients bitwise unchanged; and no hang (every
test has a timeout). All collectives finish before the first assert.

Run: mpiexec -n 4 python -m mpi4py -m pytest --with-mpi tests/test_faults_mpi.py
"""
import re

import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm

C = 3
pytestmark = pytest.mark.timeout(60)


def world():
    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()


def bad_sets():
    """One bad rank (the last), and several (the first and the last)."""
    size = MPI.COMM_WORLD.Get_size()
    return [[size - 1], sorted({0, size - 1, size // 2})]


def data(rank, n=4, shape=None, dtype=np.float32):
    rng = np.random.default_rng(100 + rank)
    return rng.normal(2.0, 3.0, shape or (n, C, 2, 2)).astype(dtype)


def grad(rank, shape, dtype=np.float32):
    return np.random.default_rng(200 + rank).normal(size=shape).astype(dtype)


def snapshot(bn):
    grads = [p.grad for p in bn.get_parameters()]
    return [p.data.tobytes() for p in bn.get_parameters()] + [None if g is None else g.tobytes() for g in grads]


def attempt(fn):
    try:
        fn()
        return None
    except Exception as exc:     # noqa: BLE001 - inspected on every rank below
        return exc


def gather_errors(comm, err):
    return comm.allgather(None if err is None else (type(err).__name__, str(err)))


def check_agreed(seen, err, exc_type, bad, size, says):
    """Every rank raised the same exc_type and message naming exactly ``bad``."""
    assert isinstance(err, exc_type), repr(err)
    # Same type and words everywhere; only the call each rank was in may differ
    # (a rank in backward next to peers in forward says '.backward').
    assert len({(t, re.sub(r"\.(construct|backward) ", ".<call> ", m)) for t, m in seen}) == 1, seen
    msg = str(err)
    assert says in msg
    assert named_ranks(msg) == set(bad), msg


def named_ranks(msg):
    """Ranks a message blames: 'rank 3: ...', 'ranks [0, 2]: ...' or 'rank 1 channel 2'."""
    found = set()
    for one, several in re.findall(r"\brank (\d+)(?=:| channel)|\branks \[([\d, ]+)\](?=:)", msg):
        found |= {int(one)} if one else {int(r) for r in several.split(",")}
    return found


def trained(comm, **kwargs):
    """A layer after one good training step (moving stats differ from init)."""
    rank = comm.Get_rank()
    bn = SyncBatchNorm(C, comm=comm, gamma_init=np.array([1.5, 0.5, 2.0]), beta_init=0.25, **kwargs).set_train()
    x = data(rank)
    bn(x)
    bn.backward(grad(rank, x.shape))
    return bn


# name -> (make this rank's bad x, exception type, words in the message)
BAD_X = {
    "list": (lambda x: x.tolist(), TypeError, "x must be a numpy.ndarray"),
    "int64": (lambda x: x.astype(np.int64), TypeError, "x has dtype int64; expected float16, float32, float64 or bfloat16"),
    "3-D": (lambda x: x[:, :, :, 0], ValueError, "must be 2-D (N, C) or 4-D (N, C, H, W), got a 3-D array"),
    "channels": (lambda x: np.concatenate([x, x[:, :1]], axis=1), ValueError, "x has 4 channels (shape[1])"),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bad", bad_sets(), ids=["one", "several"])
@pytest.mark.parametrize("kind", list(BAD_X))
def test_bad_x_is_agreed(kind, bad):
    comm, rank, size = world()
    make, exc_type, says = BAD_X[kind]
    bn = trained(comm)
    before = snapshot(bn)
    x = data(rank, n=3)
    err = attempt(lambda: bn(make(x) if rank in bad else x))
    seen = gather_errors(comm, err)
    after = snapshot(bn)
    # the failure left the ranks in step: a good step works afterwards
    ok = attempt(lambda: (bn(x), bn.backward(grad(rank, x.shape))))
    bn.close()
    check_agreed(seen, err, exc_type, bad, size, says)
    assert after == before
    assert ok is None


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bad", bad_sets(), ids=["one", "several"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_is_agreed_and_names_rank_and_channel(value, bad):
    comm, rank, size = world()
    bn = trained(comm)
    before = snapshot(bn)
    x = data(rank, n=3)
    if rank in bad:
        x[1, rank % C, 0, 1] = value
    err = attempt(lambda: bn(x))
    seen = gather_errors(comm, err)
    after = snapshot(bn)
    bn.close()
    check_agreed(seen, err, FloatingPointError, bad, size, "NaN or Inf in the training batch")
    for r in bad:
        assert f"rank {r} channel {r % C}" in str(err)
    assert "moving statistics left unchanged" in str(err)
    assert after == before


@pytest.mark.mpi(min_size=2)
def test_nonfinite_propagate_contaminates_only_that_channel():
    comm, rank, size = world()
    bn = trained(comm, nonfinite="propagate")
    mean0 = bn.moving_mean.data.copy()
    x = data(rank, n=3)
    if rank == size - 1:
        x[0, 1, 0, 0] = np.nan
    err = attempt(lambda: bn(x))
    y = bn(data(rank, n=3)) if err is None else None       # the NaN stays in the moving stats
    bn.close()
    assert err is None
    assert np.isnan(bn.moving_mean.data[1]) and np.isnan(bn.moving_variance.data[1])
    finite = [0, 2]
    assert np.isfinite(bn.moving_mean.data[finite]).all()
    assert (bn.moving_mean.data[finite] != mean0[finite]).all()
    assert np.isfinite(y[:, finite]).all()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("counts", ["one value", "all empty"])
def test_group_with_at_most_one_value_is_agreed(counts):
    comm, rank, size = world()
    bn = trained(comm)
    before = snapshot(bn)
    n = 1 if (counts == "one value" and rank == 0) else 0
    err = attempt(lambda: bn(data(rank, shape=(n, C))))
    seen = gather_errors(comm, err)
    after = snapshot(bn)
    bn.close()
    assert isinstance(err, ValueError) and len(set(seen)) == 1
    total = 1 if counts == "one value" else 0
    assert f"expected more than 1 value per channel in training, got {total}" in str(err)
    assert after == before


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bad", bad_sets(), ids=["one", "several"])
@pytest.mark.parametrize("kind", ["not array", "float dtype int", "shape"])
def test_bad_dy_is_agreed(kind, bad):
    comm, rank, size = world()
    bn = trained(comm)
    x = data(rank, n=3)
    bn(x)
    before = snapshot(bn)
    dy = grad(rank, x.shape)
    wrong = {"not array": dy.tolist(), "float dtype int": dy.astype(np.int32), "shape": dy[:2]}[kind]
    err = attempt(lambda: bn.backward(wrong if rank in bad else dy))
    seen = gather_errors(comm, err)
    after = snapshot(bn)
    # the forward is still there to be differentiated: a correct dy now works
    ok = attempt(lambda: bn.backward(dy))
    bn.close()
    exc_type, says = {"not array": (TypeError, "dy must be a numpy.ndarray"),
                      "float dtype int": (TypeError, "dy has dtype int32"),
                      "shape": (ValueError, "dy has shape (2, 3, 2, 2); the forward input had shape (3, 3, 2, 2)")}[kind]
    check_agreed(seen, err, exc_type, bad, size, says)
    assert after == before
    assert ok is None


@pytest.mark.mpi(min_size=2)
def test_backward_before_forward_on_every_rank():
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm).set_train()
    before = snapshot(bn)
    err = attempt(lambda: bn.backward(grad(rank, (2, C))))
    seen = gather_errors(comm, err)
    bn.close()
    check_agreed(seen, err, RuntimeError, range(size), size, "backward() was called without a training forward()")
    assert snapshot(bn) == before


@pytest.mark.mpi(min_size=2)
def test_backward_instead_of_forward_on_one_rank():
    # The peers start a training forward; the bad rank calls backward with no
    # forward. Both calls use the same buffer, so the bad rank's flag reaches
    # the peers' forward collective: all raise, nobody waits.
    comm, rank, size = world()
    bad = size - 1
    bn = trained(comm)
    fresh = SyncBatchNorm(C, comm=comm).set_train()
    before = snapshot(fresh)
    x = data(rank)
    err = attempt(lambda: fresh.backward(grad(rank, x.shape)) if rank == bad else fresh(x))
    seen = gather_errors(comm, err)
    fresh.close()
    bn.close()
    check_agreed(seen, err, RuntimeError, [bad], size, "backward() was called without a training forward()")
    assert snapshot(fresh) == before


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bad", bad_sets(), ids=["one", "several"])
def test_backward_twice_is_agreed(bad):
    # The bad ranks call backward a second time while the others start the
    # next forward: the forward collective carries their flag.
    comm, rank, size = world()
    bn = trained(comm)
    before = snapshot(bn)
    x = data(rank)
    err = attempt(lambda: bn.backward(grad(rank, x.shape)) if rank in bad else bn(x))
    seen = gather_errors(comm, err)
    after = snapshot(bn)
    bn.close()
    check_agreed(seen, err, RuntimeError, bad, size, "backward() was called twice for one forward()")
    assert after == before


@pytest.mark.mpi(min_size=4)
def test_error_stays_inside_its_group():
    comm, rank, size = world()
    bn = SyncBatchNorm(C, process_groups=[[0, 1], [2, 3]], comm=comm).set_train()
    before = snapshot(bn)
    x = data(rank)
    err = attempt(lambda: bn(x.astype(np.int8) if rank == 3 else x))
    seen = gather_errors(comm, err)
    after = snapshot(bn)
    bn.close()
    assert [s is None for s in seen] == [True, True, False, False]
    assert seen[2] == seen[3]
    if rank >= 2:
        check_agreed(seen[2:], err, TypeError, [3], 4, "x has dtype int8")
        assert "group ranks [2, 3]" in str(err)
        assert after == before
    else:
        assert after != before                 # the healthy group trained


@pytest.mark.mpi(min_size=2)
def test_eval_mode_errors_are_local_and_nan_propagates_elementwise():
    # Eval communicates nothing, so a bad input raises on its own rank only
    # (no peer waits), and NaN in one sample only touches that sample's y.
    comm, rank, size = world()
    bn = trained(comm)
    bn.set_train(False)
    calls = bn.group_comm.allreduce_calls
    before = snapshot(bn)
    x = data(rank, n=3)
    err = attempt(lambda: bn(x[:, :2] if rank == size - 1 else x))
    seen = gather_errors(comm, err)
    x_nan = x.copy()
    x_nan[1, 2, 0, 0] = np.nan
    y, y_nan = bn(x), bn(x_nan)
    after = snapshot(bn)
    calls_after = bn.group_comm.allreduce_calls
    bn.close()
    assert [s is not None for s in seen] == [r == size - 1 for r in range(size)]
    if rank == size - 1:
        assert isinstance(err, ValueError) and f"(rank {rank})" in str(err)
    nan_at = np.argwhere(np.isnan(y_nan))
    assert nan_at.tolist() == [[1, 2, 0, 0]]
    mask = ~np.isnan(y_nan)
    assert y_nan[mask].tobytes() == y[mask].tobytes()
    assert after == before
    assert calls_after == calls


@pytest.mark.mpi(min_size=2)
def test_layers_called_out_of_order_is_agreed():
    # Two layers of the same width share one communicator; the last rank
    # calls them in the other order. Widths match, so the Allreduce itself
    # would succeed and silently mix the layers' statistics: the (layer,
    # call) tags in the buffer turn it into an error on every rank.
    comm, rank, size = world()
    first, second = trained(comm), trained(comm)
    before = snapshot(first) + snapshot(second)
    x = data(rank)
    err = attempt(lambda: (second if rank == size - 1 else first)(x))
    seen = gather_errors(comm, err)
    after = snapshot(first) + snapshot(second)
    first.close()
    second.close()
    assert isinstance(err, RuntimeError) and len(set(seen)) == 1
    assert "ranks are in different layer calls" in str(err)
    assert after == before
