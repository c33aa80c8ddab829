"""Rank 2 skips one call of a layer; in debug mode its peers name it."""
import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm

bn = SyncBatchNorm(3, debug_timeout=2.0).set_train()
x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
bn(x)
if MPI.COMM_WORLD.Get_rank() != 2:
    bn(x)          # rank 2 never makes this call
else:
    import time
    time.sleep(30)
