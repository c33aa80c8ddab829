"""P simulated ranks in one process (threads), for serial partition tests.

``run_group(size, fn)`` calls ``fn(group_comm, rank)`` in ``size`` threads;
their ``GroupComm`` wraps a fake communicator whose Allreduce adds the P
buffers in an order chosen at random *per rank and per call*, which is
stricter than any MPI library (they at least agree between ranks on one
call). The threads run as ``mpibn.testing.reference``'s simulated ranks do
(``_run_threads``: the lowest rank's error is re-raised in the caller).
"""
import threading

import numpy as np

from mpibn.comm import GroupComm
from mpibn.testing import _run_threads


class _Shared:
    def __init__(self, size, seed, tree):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.bufs = [None] * size
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        self.tree = tree


class FakeComm:
    """Just enough of an mpi4py intracommunicator for ``GroupComm.allreduce_sum``."""

    def __init__(self, shared, rank):
        self.shared, self.rank = shared, rank

    def Allreduce(self, sendbuf, recvbuf, op=None):
        sh = self.shared
        sh.bufs[self.rank] = recvbuf.copy()
        sh.barrier.wait()
        with sh.lock:
            order = sh.rng.permutation(sh.size)
        parts = [sh.bufs[r] for r in order]
        if sh.tree:                              # pairwise, as a reduction tree would
            while len(parts) > 1:
                parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i]
                         for i in range(0, len(parts), 2)]
            total = parts[0]
        else:
            total = np.zeros_like(recvbuf)
            for part in parts:
                total += part
        sh.barrier.wait()
        recvbuf[...] = total


def run_group(size, fn, seed=0, tree=False):
    """[fn(group_comm, rank) for each rank], run concurrently in threads (``mpibn.testing``'s runner)."""
    shared = _Shared(size, seed, tree)

    def rank_fn(rank):
        return fn(GroupComm(FakeComm(shared, rank) if size > 1 else None, range(size), rank), rank)

    return _run_threads([lambda r=r: rank_fn(r) for r in range(size)], [shared.barrier])
