"""Networks of many layers: shared communicators, call-order safety, a
20+ layer stack trained data-parallel equal to one process on the whole batch."""
import os
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm, comm as mpibn_comm
from conftest import global_batch, shard_slices
from resnet_np import Net, loss_and_grad

WORLD = MPI.COMM_WORLD
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_thousand_layers_share_one_communicator():
    parent = MPI.COMM_SELF.Dup()          # a parent no other test's layers use
    splits = mpibn_comm.split_calls
    layers = [SyncBatchNorm(4, comm=parent) for _ in range(1000)]
    groups = {id(bn.group_comm) for bn in layers}
    splits_made = mpibn_comm.split_calls - splits
    cache = mpibn_comm.group_cache(parent)
    for bn in layers[:-1]:
        bn.close()
    still_cached = None in cache
    layers[-1].close()
    parent.Free()
    assert len(groups) == 1 and splits_made == 1
    assert still_cached and None not in cache      # freed with its last user


@pytest.mark.mpi(min_size=2)
def test_distinct_groupings_get_distinct_communicators_and_are_freed():
    size = WORLD.Get_size()
    before = mpibn_comm.split_calls
    groupings = [None, [[0, 1]], [[r] for r in range(size)], [[0, 1]], None]
    layers = [SyncBatchNorm(2, process_groups=g) for g in groupings]
    made = mpibn_comm.split_calls - before
    shared = layers[1].group_comm is layers[3].group_comm and layers[0].group_comm is layers[4].group_comm
    for bn in layers:
        bn.close()
    assert made == 3 and shared
    assert all(bn.group_comm is None for bn in layers)


def _train(net, x, target, steps, comm):
    losses = []
    for _ in range(steps):
        loss, dout = loss_and_grad(net.forward(x), target)
        grads = net.backward(dout)
        if comm is not None:       # data parallelism: the loss is a sum, so are the gradients
            for g in grads.values():
                comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
            loss = comm.allreduce(loss)
        net.sgd(grads, lr=0.01)
        losses.append(loss)
    return losses


@pytest.mark.mpi(min_size=2)
def test_resnet_stack_data_parallel_equals_whole_batch():
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    sizes = [3 + 2 * r for r in range(size)]
    sizes[-1] = 0 if size > 2 else sizes[-1]         # an empty rank, too
    sl = shard_slices(sizes)[rank]
    x, _ = global_batch(100, (sum(sizes), 6, 3, 3), offset=1.0)
    target = np.random.default_rng(101).standard_normal((sum(sizes), 2))
    steps = 3

    dist = Net(6, n_blocks=10, outputs=2, comm=WORLD)
    group = dist.bns["bn0"].group_comm
    calls_before = group.allreduce_calls
    dist_losses = _train(dist, x[sl], target[sl], steps, WORLD)
    calls = group.allreduce_calls - calls_before
    one = Net(6, n_blocks=10, outputs=2, comm=MPI.COMM_SELF)
    one_losses = _train(one, x, target, steps, None)
    n_layers = len(dist.bns)
    shared = len({id(bn.group_comm) for bn in dist.bns.values()})
    dist_state, one_state = dist.state(), one.state()
    dist.close()
    one.close()

    assert n_layers >= 20 and shared == 1
    assert calls == 2 * n_layers * steps               # one Allreduce per layer per pass
    np.testing.assert_allclose(dist_losses, one_losses, rtol=1e-10)
    assert dist_losses[-1] < dist_losses[0]            # it does train
    for k in one_state:
        np.testing.assert_allclose(dist_state[k], one_state[k], rtol=0, atol=1e-10, err_msg=k)


@pytest.mark.mpi(min_size=2)
def test_resnet_stack_with_local_batch_norm_differs():
    # Negative control: per-rank (unsynced) batch norm does not equal the whole batch.
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    sizes = [3 + 2 * r for r in range(size)]
    sl = shard_slices(sizes)[rank]
    x, _ = global_batch(100, (sum(sizes), 6, 3, 3), offset=1.0)
    target = np.random.default_rng(101).standard_normal((sum(sizes), 2))
    local = Net(6, n_blocks=10, outputs=2, comm=WORLD, process_groups=[[r] for r in range(size)])
    local_losses = _train(local, x[sl], target[sl], 2, WORLD)
    one = Net(6, n_blocks=10, outputs=2, comm=MPI.COMM_SELF)
    one_losses = _train(one, x, target, 2, None)
    local.close()
    one.close()
    assert abs(local_losses[-1] - one_losses[-1]) > 1e-6 * abs(one_losses[-1])


@pytest.mark.mpi(min_size=2)
def test_misordered_layers_of_different_widths_raise_agreed_error():
    rank = WORLD.Get_rank()
    small, wide = SyncBatchNorm(2).set_train(), SyncBatchNorm(64).set_train()
    xs, _ = global_batch(110, (4, 2), dtype=np.float32)
    xw, _ = global_batch(111, (4, 64), dtype=np.float32)
    errors = []
    for bn, x in ([(small, xs), (wide, xw)] if rank else [(wide, xw), (small, xs)]):
        try:
            bn(x)
        except RuntimeError as err:
            errors.append(str(err))
    small.close()
    wide.close()
    # Both calls fail on every rank, naming both layers; nobody aborts or hangs.
    assert len(errors) == 2
    assert "different layer calls" in errors[0] and "rank 0: layer" in errors[0]


@pytest.mark.skipif(WORLD.Get_size() > 1, reason="launches its own mpiexec")
def test_debug_timeout_names_the_rank_that_never_called():
    from mpibn.cli.launch import find_mpiexec
    script = os.path.join(ROOT, "tests", "scripts", "skip_call.py")
    out = subprocess.run([find_mpiexec(), "-n", "3", sys.executable, "-m", "mpi4py", script],
                         capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "CollectiveTimeout" in text and "never arrived: [2]" in text


def test_cache_dies_with_its_parent_communicator():
    # A freed parent's handle may be reused by the next communicator; the
    # cache is an attribute of the parent, so it cannot hand out a stale group.
    first = MPI.COMM_SELF.Dup()
    kept = SyncBatchNorm(2, comm=first)          # never closed
    first.Free()
    second = MPI.COMM_SELF.Dup()
    before = mpibn_comm.split_calls
    fresh = SyncBatchNorm(2, comm=second)
    made = mpibn_comm.split_calls - before
    distinct = fresh.group_comm is not kept.group_comm
    fresh.close()
    second.Free()
    assert made == 1 and distinct
