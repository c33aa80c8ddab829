"""Rank 2 says "I am here" in a layer's collective (debug mode), then stops
(SIGSTOP) before it contributes to the reduction; its peers name it as lost:
it arrived, then went silent."""
import os
import signal

import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm


class StopBeforeReducing:
    """The group's communicator, except that Iallreduce stops this process."""

    def __init__(self, comm):
        self._comm = comm

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def Iallreduce(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGSTOP)   # stopped, not dead: nothing closes


bn = SyncBatchNorm(3, debug_timeout=2.0).set_train()
x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
bn(x)
if MPI.COMM_WORLD.Get_rank() == 2:
    bn.group_comm.comm = StopBeforeReducing(bn.group_comm.comm)
bn(x)
