"""Soak: many training steps with random uneven shards; no growth, no leak.

    mpiexec -n 4 python -m mpi4py scripts/soak.py --steps 10000

Every step each rank holds a random number of samples (0 included: empty
shards; the sizes come from a generator seeded the same on every rank, so
every rank knows the group total stays above 1), runs forward and backward,
and the layers are checked at the end:

* Python heap growth (tracemalloc, which also sees NumPy's buffers) between
  the end of a warm-up and the end of the run, and the resident set size;
* communicators: the GroupComm cache holds the same entries before and
  after, and every closed layer's communicator is freed;
* the one-Allreduce-per-pass rule: 2 collectives per training step.

Exit status 1 if the heap grew by more than --max-growth bytes.
tests/test_resources.py runs ``soak`` for a few hundred steps.
"""
import argparse
import sys
import time
import tracemalloc

import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn import comm as mpibn_comm


def live_groups(parent):
    """Live group communicators on ``parent`` (its GroupComm cache)."""
    return len(mpibn_comm.group_cache(parent))


def shard_sizes(rng, size, high=5):
    """Per-rank sample counts, identical on every rank; zeros allowed, total >= 2."""
    while True:
        sizes = rng.integers(0, high + 1, size)
        sizes[rng.random(size) < 0.3] = 0            # plenty of empty shards
        if sizes.sum() >= 2:
            return sizes


def rss_kib():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4      # pages of 4 KiB
    except OSError:
        return -1


def soak(comm, steps, channels=4, seed=0, warmup=None):
    """Run ``steps`` training steps; return a dict of measurements."""
    rank, size = comm.Get_rank(), comm.Get_size()
    warmup = min(steps // 5, 200) if warmup is None else warmup
    shared = np.random.default_rng(seed)              # same draws on every rank
    own = np.random.default_rng(seed + 1 + rank)
    cache_before = live_groups(comm)
    tracemalloc.start()
    bn = SyncBatchNorm(channels, comm=comm).set_train()
    group = bn.group_comm
    calls0 = group.allreduce_calls
    base = rss0 = None
    empty = 0
    t0 = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            base, rss0 = tracemalloc.get_traced_memory()[0], rss_kib()
        n = int(shard_sizes(shared, size)[rank])
        spatial = (2, 2) if step % 2 else ()
        x = own.normal(own.normal(), 2.0, (n, channels) + spatial).astype(np.float32)
        bn(x)
        bn.backward(own.normal(size=x.shape).astype(np.float32))
        empty += n == 0
    seconds = time.perf_counter() - t0
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    calls = group.allreduce_calls - calls0
    bn.close()
    return {"steps": steps, "empty_shards": empty, "seconds": seconds,
            "heap_growth_bytes": current - base, "heap_peak_bytes": peak,
            "rss_growth_kib": rss_kib() - rss0, "allreduce_calls": calls,
            "cache_before": cache_before, "cache_after": live_groups(comm), "comm_freed": group.comm is None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--max-growth", type=int, default=64 * 1024)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    result = soak(comm, args.steps)
    results = comm.gather(result, root=0)
    if comm.Get_rank() == 0:
        for r, res in enumerate(results):
            print(f"rank {r}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in res.items()), flush=True)
    ok = result["heap_growth_bytes"] <= args.max_growth and result["comm_freed"] \
        and result["cache_after"] == result["cache_before"]
    return 0 if comm.allreduce(ok, op=MPI.LAND) else 1


if __name__ == "__main__":
    sys.exit(main())
