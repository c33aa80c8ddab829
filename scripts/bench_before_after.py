#!/usr/bin/env python3
"""mpibn of an older commit against mpibn now (and torch CPU), in one run.

    python scripts/bench_before_after.py                 # before = 454fc82 (before issue 13)
    python scripts/bench_before_after.py --commit HEAD~3 --repeats 15

Needs a git checkout. The old ``mpibn`` package is extracted with ``git
archive`` into a temporary directory and imported under another name
(``mpibn_before``; its imports are relative), so both run in one process,
interleaved with torch (when installed), one thread each, on the process's
CPU clock, best of ``--repeats`` rounds (``mpibn.cli.bench.best_of``).
Shapes: those of issue 13's table.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

SHAPES = [((2, 4, 3, 3), "float32"), ((4, 8, 4, 4), "float32"), ((16, 32), "float32"),
          ((64, 256), "float32"), ((8, 64, 8, 8), "float32"), ((8, 64, 8, 8), "float64"),
          ((256, 1024), "float32"), ((16, 64, 28, 28), "float32"), ((16, 64, 28, 28), "float16")]


def old_package(commit, where):
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "mpibn"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", where], input=archive, check=True)
    os.rename(os.path.join(where, "mpibn"), os.path.join(where, "mpibn_before"))
    sys.path.insert(0, where)
    import mpibn_before
    return mpibn_before


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commit", default="454fc82")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    from mpi4py import MPI

    import mpibn
    from mpibn.cli.bench import best_of, data
    from mpibn.cli.bench.grid import torch_step
    try:
        import torch
        import torch.nn.functional as functional
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    where = tempfile.mkdtemp(prefix="mpibn-before-")
    try:
        before = old_package(args.commit, where)
        print(f"{'shape':>18} {'dtype':>8} | {'before us':>10} {'now us':>10} {'torch us':>10} | "
              f"before/now  now/torch")
        for shape, dtype in SHAPES:
            x, dy = data(shape, dtype)
            a = before.SyncBatchNorm(shape[1], dtype=dtype, comm=MPI.COMM_SELF).set_train()
            b = mpibn.SyncBatchNorm(shape[1], dtype=dtype, comm=MPI.COMM_SELF).set_train()
            cands = {"before": lambda: (a(x), a.backward(dy)), "now": lambda: (b(x), b.backward(dy))}
            if torch is not None:
                try:
                    cands["torch"] = torch_step(torch, functional, x, dy, np.ones(shape[1], dtype),
                                                np.zeros(shape[1], dtype))
                except RuntimeError:
                    pass
            t = best_of(cands, args.repeats, clock=time.process_time)
            tt = t.get("torch")
            print(f"{str(shape):>18} {dtype:>8} | {t['before'] * 1e6:10.1f} {t['now'] * 1e6:10.1f} "
                  f"{tt * 1e6 if tt else float('nan'):10.1f} | {t['before'] / t['now']:10.2f} "
                  f"{t['now'] / tt if tt else float('nan'):10.2f}", flush=True)
    finally:
        shutil.rmtree(where)


if __name__ == "__main__":
    main()
