"""Issue 19 under mpiexec: fail-stop for a group, and bad values that got through.

Every rank asserts after all collectives are done; every test has a timeout
(a hang is a failure). Run:
mpiexec -n 4 python -m mpi4py -m pytest --with-mpi tests/test_failstop_mpi.py

Before the fix (c2ef9e9), each run alone under mpiexec -n 4: the non-exact
exchange hung (pytest-timeout: rank 3 raised before the Allreduce its peers
waited in: item 3, confirmed); the fail-stop tests failed (no GroupFailed:
later calls made collectives again); the late rank completed the call its
peers had given up on (rank 0's moving mean differed); NaN/Inf in dy and
the overflow raised nothing or the wrong words; of the in-step errors, only
'nan dy' failed (no error at all): the others were already recoverable.
"""
import time
import warnings

import numpy as np
import pytest

from mpibn import (CollectiveTimeout, GroupFailed, SyncBatchNorm, group_comm_for, make_exchange,
                   sync_batch_norm)
from test_faults_mpi import attempt, check_agreed, data, grad, snapshot, world
from test_faults_mpi import gather_errors as gather

C = 3
pytestmark = [pytest.mark.timeout(60), pytest.mark.mpi(min_size=2)]


def step(bn, rank, n=3, seed=0):
    x = data(rank + 10 * seed, n=n)
    bn(x)
    return bn.backward(grad(rank + 10 * seed, x.shape))


# -- items 1 and 2: fail-stop ----------------------------------------------------------------

def test_every_layer_of_a_stopped_group_refuses_and_new_layers_work():
    comm, rank, size = world()
    a, b = SyncBatchNorm(C, comm=comm).set_train(), SyncBatchNorm(C, comm=comm).set_train()
    elsewhere = SyncBatchNorm(C, comm=comm, process_groups=[list(range(size))]).set_train()
    step(a, rank)
    before = snapshot(a) + snapshot(b)
    # The last rank calls backward a second time while its peers start the next forward.
    x = data(rank)
    first = attempt(lambda: a.backward(grad(rank, x.shape)) if rank == size - 1 else a(x))
    seen = gather(comm, first)
    started = time.monotonic()
    later = [attempt(lambda: a(x)), attempt(lambda: a.backward(grad(rank, x.shape))),
             attempt(lambda: b(x)), attempt(lambda: b.set_train(False)(x))]
    seconds = time.monotonic() - started
    after = snapshot(a) + snapshot(b)
    ok_elsewhere = attempt(lambda: step(elsewhere, rank))      # another communicator is not stopped
    fresh = SyncBatchNorm(C, comm=comm, dtype=np.float64).set_train()     # new layers: a new communicator
    fresh(x.astype(np.float64))
    everything = np.concatenate(comm.allgather(x.astype(np.float64)))
    for layer in (a, b, elsewhere, fresh):
        layer.close()
    check_agreed(seen, first, RuntimeError, [size - 1], size, "backward() was called twice for one forward()")
    assert "this error stops the group (fail-stop)" in str(first)
    assert all(isinstance(e, GroupFailed) for e in later), later
    assert all("First failure seen by rank" in str(e) and "backward() was called twice" in str(e)
               and "restore every rank from the last checkpoint" in str(e) for e in later), later
    assert all(e.first is first and e.__cause__ is first for e in later)
    assert a.group_comm is None and seconds < 0.05
    assert after == before
    assert ok_elsewhere is None
    assert fresh.group_comm is None      # closed; its statistics were those of the concatenated batch:
    assert np.allclose(fresh.batch_mean, everything.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)


def test_a_stopped_group_makes_no_collective():
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm).set_train()
    step(bn, rank)
    x = data(rank)
    attempt(lambda: bn.backward(grad(rank, x.shape)) if rank == 0 else bn(x))     # rank 0 out of step
    group = bn.group_comm
    calls = group.allreduce_calls
    errors = [attempt(lambda: step(bn, rank, seed=s)) for s in range(5)]
    made = group.allreduce_calls - calls
    bn.close()
    assert made == 0 and all(isinstance(e, GroupFailed) for e in errors), (made, errors)


@pytest.mark.parametrize("kind", ["bad x", "nan x", "bad dy", "nan dy", "one value", "same mistake everywhere"])
def test_errors_that_leave_the_ranks_in_step_stay_recoverable(kind):
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm).set_train()
    step(bn, rank)
    x = data(rank, n=3)
    bad = rank == size - 1
    if kind == "bad x":
        err = attempt(lambda: bn(x.astype(np.int64) if bad else x))
    elif kind == "nan x":
        x[0, 1, 0, 0] = np.nan if bad else x[0, 1, 0, 0]
        err = attempt(lambda: bn(x))
    elif kind == "one value":
        err = attempt(lambda: bn(x[:1, :, :1, :1] if rank == 0 else x[:0]))
    elif kind == "same mistake everywhere":
        err = attempt(lambda: bn.backward(grad(rank, (2, C))))       # backward twice, on every rank
    else:
        bn(x)
        dy = grad(rank, x.shape)
        if kind == "bad dy":
            err = attempt(lambda: bn.backward(dy[:1] if bad else dy))
        else:
            dy[2, 0, 1, 1] = np.nan if bad else dy[2, 0, 1, 1]
            err = attempt(lambda: bn.backward(dy))
    seen = gather(comm, err)
    failure = getattr(bn.group_comm, "failure", None)
    ok = attempt(lambda: step(bn, rank, seed=3))
    bn.close()
    assert err is not None and len({s[0] for s in seen}) == 1, seen
    assert failure is None and ok is None, (failure, ok)


def test_a_late_rank_stops_and_no_buffer_with_a_pending_request_is_reused(monkeypatch):
    monkeypatch.setenv("MPIBN_FAILSTOP_GRACE", "off")      # this pytest process must live on
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm, debug_timeout=1.0, dtype=np.float64).set_train()
    step(bn, rank)
    group = bn.group_comm
    old = group._flat
    x = data(rank).astype(np.float64)
    if rank == 0:
        time.sleep(2.5)
    err = attempt(lambda: bn(x))
    moving = bn.moving_mean.data.copy()
    later = attempt(lambda: bn(x))
    seen = comm.allgather((type(err).__name__, moving.tobytes()))
    pending = [p for p in group._abandoned if isinstance(p, tuple) and len(p) == 6]
    bn.close()
    if rank == 0:
        # It found its peers' stop notices before joining: nothing pending here.
        assert isinstance(err, GroupFailed) and "stopped the group: its collective timed out" in str(err), err
        assert not pending and group._flat is old
    else:
        assert isinstance(err, CollectiveTimeout) and "never arrived: [0]" in str(err), err
        # The timed-out Iallreduce keeps its buffer; the group got a new one.
        (reduction, buf, *_), = pending
        assert buf.base is old or buf is old
        assert group._flat is not old and not np.shares_memory(group._flat, old)
    assert isinstance(later, GroupFailed)
    assert len({m for _, m in seen}) == 1          # no rank updated its moving statistics alone


# -- item 3: the stateless exact path joins the collective with its problem ------------------------

def test_stateless_exact_with_a_non_exact_exchange_on_one_rank_is_agreed():
    comm, rank, size = world()
    group = group_comm_for(comm, None)
    exact_exchange, plain_exchange = make_exchange(group, C, exact=True), make_exchange(group, C)
    x = np.random.default_rng(rank).normal(size=(4, C))
    bad = rank == size - 1
    err = attempt(lambda: sync_batch_norm(x, np.ones(C), np.zeros(C), group_comm=group, exact=True,
                                          exchange=plain_exchange if bad else exact_exchange))
    seen = gather(comm, err)
    ok = attempt(lambda: sync_batch_norm(x, np.ones(C), np.zeros(C), group_comm=group, exact=True,
                                         exchange=exact_exchange))
    group.release()
    check_agreed(seen, err, ValueError, [size - 1], size, "exact=True needs an exchange made by")
    assert ok is None


# -- item 4: NaN in dy ----------------------------------------------------------------------------

@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nonfinite_dy_is_agreed_and_names_rank_and_channel(value, exact):
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm, exact=exact).set_train()
    step(bn, rank)
    x = data(rank, n=3)
    bn(x)
    before = snapshot(bn)
    dy = grad(rank, x.shape)
    bad = [size - 1, 0]
    if rank in bad:
        dy[1, rank % C, 0, 1] = value
    err = attempt(lambda: bn.backward(dy))
    seen = gather(comm, err)
    after = snapshot(bn)
    dy[np.isinf(dy) | np.isnan(dy)] = 0.5
    ok = attempt(lambda: bn.backward(dy))       # the forward is still there: a good dy works
    bn.close()
    check_agreed(seen, err, FloatingPointError, bad, size, "NaN or Inf in dy")
    for r in bad:
        assert f"rank {r} channel {r % C}" in str(err)
    assert after == before and ok is None


# -- item 7: overflow is reported as overflow, with no warning ----------------------------------------

@pytest.mark.parametrize("where", ["one rank", "between ranks"])
def test_variance_overflow_is_named_and_warns_nothing(where):
    comm, rank, size = world()
    bn = SyncBatchNorm(C, comm=comm, dtype=np.float64).set_train()
    before = snapshot(bn)
    rng = np.random.default_rng(rank)
    if where == "one rank":
        x = rng.normal(size=(4, C)) * (1e160 if rank == size - 1 else 1.0)
    else:                                        # each rank's spread is 1, their means 1e155 apart
        x = rng.normal(size=(4, C)) + rank * 1e155
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = attempt(lambda: bn(x))
    seen = gather(comm, err)
    after = snapshot(bn)
    bn.close()
    assert isinstance(err, FloatingPointError) and len(set(seen)) == 1, seen
    assert "NaN or Inf" not in str(err)
    if where == "one rank":
        assert f"the variance overflows float64 at rank {size - 1} channel 0" in str(err)
    else:
        assert "the group's batch variance overflows float64 at channel(s) [0, 1, 2]" in str(err)
    assert [str(w.message) for w in caught] == []
    assert after == before
