"""What does exact=True cost? Forward + backward time and bytes per Allreduce.

Run: mpiexec -n 4 python -m mpi4py scripts/bench_exact.py

For a few activation shapes (per rank), times one training forward +
backward of SyncBatchNorm with the default statistics and with exact=True
on the same ranks in the same run (median of the ranks' medians), and
prints the numbers each Allreduce carries.
"""

import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm

import mpi_timing  # scripts/mpi_timing.py, beside this file
from mpibn.exact import SHARED_WIDTH

comm = MPI.COMM_WORLD
P = comm.Get_size()


def median_time(fn, repeats=7):
    return mpi_timing.median_time(comm, fn, repeats)


rows = []
rng = np.random.default_rng(comm.Get_rank())
for shape in [(8, 64, 14, 14), (32, 256, 7, 7), (4, 32, 56, 56)]:
    x = (100 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    timing = {}
    for exact in (False, True):
        bn = SyncBatchNorm(shape[1], exact=exact).set_train()

        def step():
            bn(x)
            bn.backward(dy)

        step()
        timing[exact] = median_time(step)
        bn.close()
    c = shape[1]
    rows.append((shape, timing[False], timing[True], P * (2 * c + 12), P * (2 * c + 12) + SHARED_WIDTH * c))

if comm.Get_rank() == 0:
    print(f"SyncBatchNorm forward + backward on {P} ranks, float32 input, per-rank shape; median seconds")
    print(f"{'shape per rank':>18} {'default':>9} {'exact':>9} {'ratio':>6} {'numbers per Allreduce':>24}")
    for shape, t0, t1, n0, n1 in rows:
        print(f"{str(shape):>18} {t0:9.4f} {t1:9.4f} {t1 / t0:6.1f} {n0:>10} -> {n1:<10}")
