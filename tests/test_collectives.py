"""Exactly one Allreduce per training forward, one per backward, none in eval.

The group communicator is wrapped in a proxy that records *every* MPI call
made on it, so that the count does not rest on ``allreduce_calls`` alone
(which the code under test keeps itself) and any other collective (a
Barrier, an allgather) would show up too.
"""
import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm

WORLD = MPI.COMM_WORLD


class Recorder:
    """Stands in for an mpi4py communicator; logs each method called on it."""

    def __init__(self, comm):
        self._comm = comm
        self.calls = []

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if not callable(attr):
            return attr
        def call(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)
        return call


def shard(rank, shape, seed):
    """This rank's batch: uneven sizes, and an empty one on rank 2 when there is one."""
    rng = np.random.default_rng(seed + rank)
    n = 0 if rank == 2 else 2 + rank
    return (rng.standard_normal((n,) + shape) + 1.0).astype(np.float32), \
        rng.standard_normal((n,) + shape).astype(np.float32)


@pytest.mark.mpi(min_size=2)
def test_one_allreduce_per_training_pass_none_in_eval():
    rank = WORLD.Get_rank()
    x, dy = shard(rank, (3, 4, 4), seed=10)
    log = {}
    with SyncBatchNorm(3) as bn:
        group = bn.group_comm
        recorder = group.comm = Recorder(group.comm)
        buffer = group._buf
        for step, (mode, ubs) in enumerate([("train", None), ("train", None), ("eval", None),
                                            ("train", False), ("eval", True), ("train", None)]):
            bn.set_train(mode == "train")
            bn.use_batch_statistics = ubs
            start, counted = len(recorder.calls), group.allreduce_calls
            bn(x)
            forward = (recorder.calls[start:], group.allreduce_calls - counted)
            start, counted = len(recorder.calls), group.allreduce_calls
            bn.backward(dy)
            backward = (recorder.calls[start:], group.allreduce_calls - counted)
            log[step] = (mode, ubs, forward, backward)
        same_buffer = group._buf is buffer
        group.comm = recorder._comm                       # unwrap before close frees it
    # Every collective is over; now check, on every rank.
    one = (["Allreduce"], 1)
    none = ([], 0)
    for step, (mode, ubs, forward, backward) in log.items():
        batch_statistics = ubs if ubs is not None else mode == "train"
        expected = one if batch_statistics else none
        assert forward == expected, (step, mode, ubs, forward)
        assert backward == expected, (step, mode, ubs, backward)
    assert same_buffer, "the exchange buffer is preallocated, not remade per call"


@pytest.mark.mpi(min_size=2)
def test_two_layers_share_the_group_and_each_pass_costs_one():
    rank = WORLD.Get_rank()
    x, dy = shard(rank, (5,), seed=20)
    with SyncBatchNorm(5).set_train() as a, SyncBatchNorm(5).set_train() as b:
        assert a.group_comm is b.group_comm
        recorder = a.group_comm.comm = Recorder(a.group_comm.comm)
        y = b(a(x))
        b_dx = b.backward(dy)
        a.backward(b_dx)
        calls = list(recorder.calls)
        a.group_comm.comm = recorder._comm
    assert calls == ["Allreduce"] * 4
    assert y.shape == x.shape


def test_a_lone_rank_communicates_nothing():
    x = np.random.default_rng(30).standard_normal((4, 3, 2, 2)).astype(np.float32)
    dy = np.random.default_rng(31).standard_normal(x.shape).astype(np.float32)
    with SyncBatchNorm(3, comm=MPI.COMM_SELF).set_train() as bn:
        assert bn.group_comm.comm is None
        for _ in range(3):
            bn(x)
            bn.backward(dy)
        assert bn.group_comm.allreduce_calls == 0
