"""What does exact=True cost next to the default mode? Ratios, measured side by side.

One process (one thread, both OpenBLAS settings unset)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
        python scripts/bench_exact.py [--repeats 9] [--clock cpu|wall] [--json out.json] [--per-sample]
    python scripts/bench_exact.py --report docs/bench-exact.json   # the table of a saved run

For each shape and dtype it times SyncBatchNorm's training forward and
backward (on COMM_SELF) with the default statistics and with exact=True,
interleaved (each repeat runs every candidate once, in turn, so that load
from other programs hits them alike), after a warm-up, and prints the
median ratio exact / default of forward + backward, and of each pass,
against the project's bar (target) for that shape: at most 3x on 4-D activations
of 1 MiB and more, 4x at (16, 32, 14, 14), 10x on small and 2-D shapes.
The default clock is the CPU time of this process (one thread: the time of
the work itself; other programs taking the core away do not count); the
BLAS kernel in use is recorded (threadpoolctl). ``--per-sample`` also times
the partition-invariant default mode proposed in docs/ground-truth.md
(``per_sample_step`` below, the math alone) against the default mode's math
alone (``default_math_step``).

Under ``mpiexec -n P python -m mpi4py scripts/bench_exact.py`` it times a
few per-rank shapes on P ranks (median of the ranks' medians, wall clock)
and prints the numbers each Allreduce carries.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from mpibn import SyncBatchNorm
from mpibn.exact import SUMMED_WIDTH

# (shape, dtype, bar): the project's targets, exact / default of forward + backward.
CELLS = [((64, 64, 32, 32), "float32", 3.0), ((32, 64, 56, 56), "float32", 3.0),
         ((8, 64, 28, 28), "float32", 3.0), ((16, 64, 28, 28), "float64", 3.0),
         ((16, 64, 28, 28), "float16", 3.0),
         ((16, 32, 14, 14), "float32", 4.0),
         ((128, 512), "float32", 10.0), ((256, 1024), "float32", 10.0), ((32, 16), "float32", 10.0),
         ((2, 4, 3, 3), "float32", 10.0), ((128, 512), "float64", 10.0)]
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=9, help="timed rounds per cell (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--per-sample", action="store_true",
                   help="also time the per-sample partition-invariant default mode (a proposal)")
    p.add_argument("--cells", default=None, help="comma-separated indices into CELLS (default: all)")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the table of a run saved with --json (times nothing)")
    return p.parse_args(argv)


def interleaved(candidates, repeats, warmup, clock):
    """{name: [seconds per round]} after warm-up; each round runs every candidate in turn."""
    times = {name: [] for name in candidates}
    for i in range(warmup + repeats):
        for name, fn in candidates.items():
            t0 = clock()
            fn()
            if i >= warmup:
                times[name].append(clock() - t0)
    return times


def layer_step(channels, exact, x, dy, split):
    from mpi4py import MPI
    bn = SyncBatchNorm(channels, comm=MPI.COMM_SELF, exact=exact).set_train()

    def step():
        t0 = time.process_time()
        bn(x)
        split.append(time.process_time() - t0)
        bn.backward(dy)
    return step


def cell(shape, dtype, bar, args, clock):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    fwd = {"default": [], "exact": []}
    candidates = {mode: layer_step(shape[1], mode == "exact", x, dy, fwd[mode]) for mode in fwd}
    if args.per_sample:
        candidates["per_sample"] = lambda: per_sample_step(x, dy)
        candidates["default_math"] = lambda: default_math_step(x, dy)
    repeats = args.repeats if x.size < (1 << 22) else max(3, args.repeats // 2)
    times = interleaved(candidates, repeats, args.warmup, clock)
    med = {name: float(np.median(t)) for name, t in times.items()}
    f = {m: float(np.median(v[args.warmup:])) for m, v in fwd.items()}      # CPU time, forward alone
    row = {"shape": list(shape), "dtype": dtype, "MiB": x.nbytes / 2 ** 20, "bar": bar,
           "default_s": med["default"], "exact_s": med["exact"], "ratio": med["exact"] / med["default"],
           "ratio_fwd": f["exact"] / f["default"],
           "ratio_bwd": (med["exact"] - f["exact"]) / (med["default"] - f["default"])}
    row["holds"] = row["ratio"] <= bar
    if args.per_sample:     # against the default mode's math alone: per_sample_step has no layer around it
        row["per_sample_ratio"] = med["per_sample"] / med["default_math"]
    return row


def per_sample_step(x, dy, eps=1e-5):
    """The proposed partition-invariant default mode, forward + backward on one rank.

    Per (sample b, channel c), over the L positions, in float64, one block
    of samples at a time (in cache): s1 = sum x, the sample's own centred
    s2 = sum (x - s1 / L)^2, and in backward t1 = sum dy, t2 = sum dy (x -
    mean). Across samples, and so across ranks, only *exact* sums of these
    partials (``exact.exact_sums`` on (B, C) arrays: L times fewer values
    than x), so the result depends on which samples the group holds, never
    on how they are split or in which order the Allreduce adds::

        mean = S1 / N,   M2 = sum s2 + (B sum s1^2 - S1^2) / (B L)   (both terms >= 0)

    from the correctly rounded S1 / B, sum s2 / B and (B sum s1^2 - S1^2) / B^2,
    so within a few ulps. Not correctly rounded (the partials are rounded),
    but each partial is the same wherever its sample lies.
    """
    from mpibn import exact as E
    from mpibn import functional as F
    x3, dy3 = F.as_ncl(x), F.as_ncl(dy)
    b, c, length = x3.shape
    # One exact sum and one rounding pass for both partials: columns [s1 | s2].
    lin, prod, _ = E.exact_sums(np.concatenate(_per_sample(x3, None), axis=1), balanced=True)
    per_b, var_b, _ = E.exact_stats(b, lin, prod)            # S1 / B, (B Q - S1^2) / B^2; sum s2 / B
    mean = per_b[:c] / length
    inv_std = 1.0 / np.sqrt((per_b[c:] * b + var_b[:c] * b / length) / (b * length) + eps)
    F.batch_norm_elemt(x3, mean, inv_std, np.ones(c), np.zeros(c))
    lin, prod, _ = E.exact_sums(np.concatenate(_per_sample(x3, dy3, mean), axis=1), balanced=True)
    per_b = E.exact_stats(b, lin, prod)[0] / length          # sum t1 / N, sum t2 / N
    F.batch_norm_backward_elemt(dy3, None, np.ones(c), inv_std, per_b[:c], per_b[c:] * inv_std, x=x3,
                                mean=mean)


def default_math_step(x, dy, eps=1e-5):
    """The default mode's four kernels on one rank, no layer around them: what
    ``per_sample_step`` replaces, for a like-for-like ratio."""
    from mpibn import functional as F
    x3, dy3 = F.as_ncl(x), F.as_ncl(dy)
    c = x3.shape[1]
    n, mean, m2 = F.batch_norm_stats(x3)
    inv_std = F.inv_std_from_var(m2 / n, eps)
    F.batch_norm_elemt(x3, mean, inv_std, np.ones(c), np.zeros(c))
    sum_dy, sum_dy_xhat = F.batch_norm_backward_reduce(dy3, x=x3, mean=mean, inv_std=inv_std)
    F.batch_norm_backward_elemt(dy3, None, np.ones(c), inv_std, sum_dy / n, sum_dy_xhat / n, x=x3, mean=mean)


def _per_sample(x3, dy3, mean=None):
    """Per-(sample, channel) float64 partials, a block of samples at a time:
    forward (sum x, sum (x - own mean)^2), backward (sum dy, sum dy (x - mean))."""
    b, c, length = x3.shape
    first, second = np.empty((b, c)), np.empty((b, c))
    step = max(1, (1 << 16) // (c * length))
    for n in range(0, b, step):
        rows = slice(n, n + step)
        h = x3[rows].astype(np.float64)
        if dy3 is None:
            first[rows] = np.add.reduce(h, axis=2)
            h -= (first[rows] / length)[:, :, None]
            h *= h
        else:
            d = dy3[rows].astype(np.float64)
            first[rows] = np.add.reduce(d, axis=2)
            h -= mean[:, None]
            h *= d
        second[rows] = np.add.reduce(h, axis=2)
    return first, second


def blas():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return [{k: v for k, v in d.items() if k != "filepath"} for d in threadpool_info()]


def header_lines(clock, repeats, per_sample):
    return [f"SyncBatchNorm training forward + backward, one process, {clock} clock, "
            f"median of {repeats} interleaved rounds: exact=True / default",
            f"{'shape':>18} {'dtype':>8} {'MiB':>6} {'default ms':>10} {'exact ms':>9} {'fwd':>5} {'bwd':>5} "
            f"{'both':>5} {'bar':>4}" + (f"        {'per-sample':>10}" if per_sample else "")]


def row_line(r, per_sample):
    return (f"{str(tuple(r['shape'])):>18} {r['dtype']:>8} {r['MiB']:6.2f} {r['default_s'] * 1e3:10.3f} "
            f"{r['exact_s'] * 1e3:9.3f} {r['ratio_fwd']:5.2f} {r['ratio_bwd']:5.2f} {r['ratio']:5.2f} "
            f"{r['bar']:4.0f} {'ok' if r['holds'] else 'MISSED':6}"
            + (f" {r['per_sample_ratio']:10.2f}" if per_sample else ""))


def kernel(report):
    for lib in report.get("blas") or []:
        if isinstance(lib, dict) and lib.get("internal_api") == "openblas":
            return f"OpenBLAS {'.'.join(str(lib.get('version')).split('.')[:3])} {lib.get('architecture')} kernel"
    return "BLAS kernel not recorded"


def saved_report(path):
    """``--report PATH``: a saved run's table (what the run printed), from its JSON.

    Each row's verdict is this script's bar (CELLS) applied to the saved ratio."""
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    bars = {(tuple(shape), dtype): bar for shape, dtype, bar in CELLS}
    per_sample = all("per_sample_ratio" in r for r in report["cells"])
    lines = header_lines(report["clock"], report["repeats"], per_sample)
    for r in report["cells"]:
        r = dict(r, bar=bars.get((tuple(r["shape"]), r["dtype"]), r["bar"]))
        r["holds"] = r["ratio"] <= r["bar"]
        lines.append(row_line(r, per_sample))
    lines.append(f"NumPy {report['numpy']}, {kernel(report)}")
    return lines


def one_process(argv):
    args = parse(argv)
    if args.report:
        print("\n".join(saved_report(args.report)))
        return
    clock = CLOCKS[args.clock]
    picked = CELLS if args.cells is None else [CELLS[int(i)] for i in args.cells.split(",")]
    rows = []
    print("\n".join(header_lines(args.clock, args.repeats, args.per_sample)))
    for shape, dtype, bar in picked:
        r = cell(shape, dtype, bar, args, clock)
        rows.append(r)
        print(row_line(r, args.per_sample), flush=True)
    report = {"command": "python scripts/bench_exact.py " + " ".join(argv),
              "cells": rows, "clock": args.clock, "repeats": args.repeats, "numpy": np.__version__,
              "blas": blas(), "env": {k: os.environ.get(k) for k in
                                      ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                       "OPENBLAS_NUM_THREADS")}}
    print(f"NumPy {report['numpy']}, {kernel(report)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def under_mpi(comm):
    import mpi_timing  # scripts/mpi_timing.py, beside this file
    size = comm.Get_size()
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
            timing[exact] = mpi_timing.median_time(comm, step, 7)
            bn.close()
        c = shape[1]
        rows.append((shape, timing[False], timing[True], size * (2 * c + 12),
                     size * (2 * c + 12) + SUMMED_WIDTH * c))
    if comm.Get_rank() == 0:
        print(f"SyncBatchNorm forward + backward on {size} ranks, float32 input, per-rank shape; median seconds")
        print(f"{'shape per rank':>18} {'default':>9} {'exact':>9} {'ratio':>6} {'numbers per Allreduce':>24}")
        for shape, t0, t1, n0, n1 in rows:
            print(f"{str(shape):>18} {t0:9.4f} {t1:9.4f} {t1 / t0:6.1f} {n0:>10} -> {n1:<10}")


if __name__ == "__main__":
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_size() > 1:
        under_mpi(MPI.COMM_WORLD)
    else:
        one_process(sys.argv[1:])
