"""Timing helper shared by the MPI benchmark scripts."""
import time

import numpy as np


def median_time(comm, fn, repeats):
    """Median over ``repeats`` runs of ``fn``, each started together after a
    Barrier; the median over ranks of each rank's median (seconds)."""
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(comm.allgather(np.median(times))))
