"""How much would batching several layers' buffers into one Allreduce save?

Run: mpiexec -n 4 python -m mpi4py scripts/bench_collectives.py

Times, on the same ranks in the same run, L separate Allreduces of one
layer's (P, 2C + 12) buffer against one Allreduce of L such buffers, and
sets that next to the compute of one SyncBatchNorm forward+backward on a
small activation, so the saving can be judged as a share of a step.
"""

import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm

import mpi_timing  # scripts/mpi_timing.py, beside this file

comm = MPI.COMM_WORLD
P = comm.Get_size()


def median_time(fn, repeats=50):
    return mpi_timing.median_time(comm, fn, repeats)


rows = []
for layers, channels in [(20, 64), (53, 256), (53, 2048)]:
    width = 2 * channels + 12
    one = [np.zeros((P, width)) for _ in range(layers)]
    fused = np.zeros((P, layers * width))
    separate = median_time(lambda: [comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM) for b in one])
    together = median_time(lambda: comm.Allreduce(MPI.IN_PLACE, fused, op=MPI.SUM))
    rows.append((layers, channels, separate, together))

x = np.random.default_rng(0).standard_normal((8, 64, 14, 14)).astype(np.float32)
dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
bn = SyncBatchNorm(64).set_train()


def step():
    bn(x)
    bn.backward(dy)


compute = median_time(step, repeats=20)
if comm.Get_rank() == 0:
    print(f"{P} ranks; one SyncBatchNorm fwd+bwd on (8, 64, 14, 14) float32 per rank: {compute * 1e3:.2f} ms")
    print("layers  C     L separate Allreduces   one fused Allreduce   saving per pass")
    for layers, channels, separate, together in rows:
        print(f"{layers:6d} {channels:5d}   {separate * 1e3:10.3f} ms         {together * 1e3:10.3f} ms"
              f"       {(separate - together) * 1e3:8.3f} ms")
bn.close()
