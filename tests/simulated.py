"""P simulated ranks in one process (threads), for serial partition tests.

``run_group(size, fn)`` calls ``fn(group_comm, rank)`` in ``size`` threads;
their ``GroupComm`` wraps a fake communicator whose Allreduce adds the P
buffers in an order chosen at random *per rank and per call*, which is
stricter than any MPI library (they at least agree between ranks on one
call). Exceptions in a thread are re-raised in the caller.
"""
import threading

import numpy as np

from mpibn.comm import GroupComm


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
    """[fn(group_comm, rank) for each rank], run concurrently in threads."""
    shared = _Shared(size, seed, tree)
    results, errors = [None] * size, [None] * size

    def body(rank):
        comm = FakeComm(shared, rank) if size > 1 else None
        try:
            results[rank] = fn(GroupComm(comm, range(size), rank), rank)
        except BaseException as exc:         # noqa: BLE001 - re-raised below
            errors[rank] = exc
            shared.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for exc in errors:
        if exc is not None and not isinstance(exc, threading.BrokenBarrierError):
            raise exc
    for exc in errors:
        if exc is not None:
            raise exc
    return results
