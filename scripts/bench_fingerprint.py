"""What does backward's in-place check of x cost?

Run: python scripts/bench_fingerprint.py [--repeats 15]
Recorded: python scripts/bench_fingerprint.py > docs/bench-fingerprint.txt (quoted in docs/reliability.md)

For a few shapes, times on one process, side by side in the same run and
interleaved (on, off, on, off, ...): a training step (forward + backward)
and an eval forward, with the fingerprint of x on (as shipped) and off
(``mpibn.sync.fingerprint`` replaced by a stub that returns None, which
also skips backward's comparison); prints the fastest and the median run
and the ratio on/off of each, the time of one ``fingerprint`` call,
full (training) and samples only (eval), fastest of the repeats, and its
share of the fastest step with the check off (``share``: training calls
the full fingerprint twice, in forward and in backward; eval the samples
once). On a shared, busy machine the fastest run is the one least
disturbed by other processes; the median shows how noisy the rest was.
"""
import argparse
import time

import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn import functional as F
from mpibn import sync
from mpibn.fingerprint import fingerprint


def blas():
    try:
        from threadpoolctl import threadpool_info
        return "; ".join(f"{i.get('internal_api')} {i.get('architecture')} threads={i.get('num_threads')}"
                         for i in threadpool_info() if i.get("user_api") == "blas") or "none found"
    except ImportError:
        return "unknown (threadpoolctl not installed)"


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"BLAS: {blas()}")
    print(f"{'shape':>20} {'pass':>6} {'on min':>9} {'off min':>9} {'ratio':>6}   {'on med':>9} {'off med':>9} "
          f"{'ratio':>6} {'fp full':>9} {'samples':>9} {'share':>7}")
    rng = np.random.default_rng(0)
    for shape in [(32, 64, 56, 56), (8, 64, 14, 14), (256, 1024)]:
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        bn = SyncBatchNorm(shape[1], comm=MPI.COMM_SELF)
        passes = {"train": lambda: (bn.set_train(True), bn(x), bn.backward(dy)),
                  "eval": lambda: (bn.set_train(False), bn(x))}
        one = min(timed(lambda: fingerprint(F.as_ncl(x))) for _ in range(args.repeats))
        few = min(timed(lambda: fingerprint(F.as_ncl(x), full=False)) for _ in range(args.repeats))
        for name, step in passes.items():
            times = {True: [], False: []}
            step()
            for _ in range(args.repeats):
                for on in (True, False):
                    sync.fingerprint = fingerprint if on else (lambda x3, full=True: None)
                    times[on].append(timed(step))
            sync.fingerprint = fingerprint
            lo_on, lo_off = min(times[True]), min(times[False])
            md_on, md_off = np.median(times[True]), np.median(times[False])
            share = (2 * one if name == "train" else few) / lo_off
            print(f"{str(shape):>20} {name:>6} {lo_on * 1e3:7.2f}ms {lo_off * 1e3:7.2f}ms {lo_on / lo_off:6.3f}   "
                  f"{md_on * 1e3:7.2f}ms {md_off * 1e3:7.2f}ms {md_on / md_off:6.3f} {one * 1e3:7.3f}ms {few * 1e3:7.3f}ms "
                  f"{100 * share:5.1f} %", flush=True)
        bn.close()


if __name__ == "__main__":
    main()
