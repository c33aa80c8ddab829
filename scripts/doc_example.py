"""The documented example of MindSpore's nn.SyncBatchNorm, on mpibn.

Run on 4 ranks: ``mpiexec -n 4 python -m mpi4py scripts/doc_example.py``.
The layer starts in eval mode (as in MindSpore), so it normalises with
moving_mean = 0 and moving_var = 1: y = 1 / sqrt(1 + 1e-5) = 0.999995 in
float32 everywhere, and nothing is communicated.
"""
import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm

sync_bn_op = SyncBatchNorm(num_features=3, process_groups=[[0, 1], [2, 3]])
x = np.ones([1, 3, 2, 2], dtype=np.float32)
output = sync_bn_op(x)
# Ranks printing at once interleave mid-line: rank 0 prints every rank's
# block, in rank order.
blocks = MPI.COMM_WORLD.gather(f"rank {MPI.COMM_WORLD.Get_rank()}: {output.dtype}\n{output}", root=0)
if MPI.COMM_WORLD.Get_rank() == 0:
    print("\n".join(blocks), flush=True)
