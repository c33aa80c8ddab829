"""Resources: close() and the context manager free communicators; no growth.

Live communicators are counted through the GroupComm cache
(``mpibn.comm.group_cache(parent)``: one entry per live grouping), and each
GroupComm's ``comm`` is None once freed. Under mpiexec, more layers are
created and closed than MPICH has context ids (2048 in its default build),
so a close() that forgot to free would make Comm.Split fail.
"""
import importlib.util
import os

import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn import comm as mpibn_comm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def live_groups(parent):
    """Live group communicators on ``parent`` (its GroupComm cache)."""
    return len(mpibn_comm.group_cache(parent))


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", os.path.join(ROOT, "scripts", "soak.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layers_share_one_group_comm_and_the_last_close_frees_it():
    comm = MPI.COMM_WORLD
    before = live_groups(MPI.COMM_WORLD)
    a = SyncBatchNorm(2, comm=comm)
    b = SyncBatchNorm(3, comm=comm)
    shared = a.group_comm
    counts = [live_groups(MPI.COMM_WORLD)]
    a.close()
    counts.append(live_groups(MPI.COMM_WORLD))
    a.close()                                  # closing twice is harmless
    b.close()
    counts.append(live_groups(MPI.COMM_WORLD))
    assert b.group_comm is None and a.group_comm is None
    assert counts == [before + 1, before + 1, before]
    assert shared.comm is None                 # freed (or never needed, alone)


def test_context_manager_closes_even_on_error():
    before = live_groups(MPI.COMM_WORLD)
    with pytest.raises(ZeroDivisionError):
        with SyncBatchNorm(2, comm=MPI.COMM_WORLD) as bn:
            assert live_groups(MPI.COMM_WORLD) == before + 1
            1 / 0
    assert bn.group_comm is None and live_groups(MPI.COMM_WORLD) == before


def test_closed_layer_refuses_to_compute():
    bn = SyncBatchNorm(2, comm=MPI.COMM_SELF).set_train()
    x = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    bn(x)
    bn.close()
    with pytest.raises(RuntimeError, match="the layer is closed"):
        bn(x)
    with pytest.raises(RuntimeError, match="the layer is closed"):
        bn.backward(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))


def groupings(size):
    """Distinct groupings of ``size`` ranks (each makes a real sub-communicator)."""
    ranks = list(range(size))
    out = [None, [ranks], [ranks[: size // 2], ranks[size // 2:]]]
    if size >= 4:
        out += [[[0, 2], [1, 3]], [[0, 3], [1, 2]], [[0, 1, 2]], [[1, 2, 3]]]
    return out


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
def test_many_layers_with_distinct_groupings_do_not_run_out_of_contexts():
    parent = MPI.COMM_WORLD.Dup()              # a parent no other test's layers use
    options = groupings(parent.Get_size())
    live, freed, failure = [], 0, None
    try:
        for i in range(2500):                  # 6/7 of them on each rank: > MPICH's 2048 context ids
            with SyncBatchNorm(2, comm=parent, process_groups=options[i % len(options)]) as bn:
                live.append(live_groups(parent))
                group = bn.group_comm
            freed += group.comm is None
    except Exception as exc:                   # noqa: BLE001 - asserted below on every rank
        failure = repr(exc)
    failures = parent.allgather(failure)
    left = live_groups(parent)
    parent.Free()
    assert failures == [None] * len(failures)
    assert set(live) == {1}
    assert freed == 2500 and left == 0


@pytest.mark.timeout(300)
def test_soak_no_growth_no_leak():
    # Serially the group is one rank (no communication) and under mpiexec
    # it is COMM_WORLD; either way: uneven and empty shards, constant memory.
    soak = load_soak()
    comm = MPI.COMM_WORLD.Dup()
    result = soak.soak(comm, steps=300, warmup=60)
    results = comm.allgather(result)
    size = comm.Get_size()
    comm.Free()
    for res in results:
        assert res["heap_growth_bytes"] < 16 * 1024, res
        assert res["cache_after"] == res["cache_before"] and res["comm_freed"], res
        assert res["allreduce_calls"] == (2 * 300 if size > 1 else 0), res
    if size > 1:                               # alone, a rank cannot be empty (total must be > 1)
        assert sum(res["empty_shards"] for res in results) > 0
