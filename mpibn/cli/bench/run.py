"""``mpibn bench``: how fast is mpibn's SyncBatchNorm, next to what else one could run?

    mpibn bench                  # everything; relaunches itself under mpiexec -n 2, 4
    mpibn bench --np             # single process only
    mpibn bench --quick          # fewer repeats, for a first look
    mpibn bench --smoke          # tiny shapes, no MPI, no torch: checks that it runs
    mpibn bench --grid           # mpibn / torch over shapes x dtypes (mpibn/cli/bench/grid.py)
    mpibn bench --report docs/performance.json               # a saved run's table and bars
    mpibn bench --grid --report docs/performance-grid.json   # a saved grid's table and verdicts

For each shape it times, in the same process and interleaved (one repeat
of each candidate in turn, so that load from other programs hits all of
them alike), after warm-up, the median of ``--repeats`` runs of:

* mpibn: ``SyncBatchNorm`` forward, backward and both (training);
  ``exact=True`` too when the layer has that option;
* torch: CPU ``F.batch_norm`` (training) forward+backward, when torch is
  installed, with ``--threads`` threads (default 1, as NumPy's element-wise
  work: the like-for-like comparison);
* naive: a straightforward NumPy batch norm as a student would write it
  (``mpibn.cli.textbook`` in the input dtype, every intermediate kept);
* copy: ``np.copyto`` of the input into a preallocated array;

and the peak temporary memory of one forward and one backward (tracemalloc,
beyond the returned y or dx) as a multiple of the input's size.

Under ``mpiexec -n P`` (run by the parent) every rank takes 1/P of the
batch and times the synced layer against the same layer alone on that
shard (``comm=COMM_SELF``), in the same run: the ratio is what the
group's one Allreduce per pass costs. Results go to performance.json and
a PNG plot in ``--out`` (default: the current directory; a ``--smoke`` run
writes to a new temporary directory unless given ``--out``; the committed
numbers in docs/ change only with ``--out docs``); a progress line goes to
stderr.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from mpibn import blocks

from .. import textbook
from . import (THREAD_VARS, data, default_out, interleaved, layer, load_torch, peak_temp, pinned,
               progress, worker_json)

SHAPES = [((32, 64, 56, 56), "float32"), ((256, 1024), "float32"),
          ((8, 256, 28, 28), "float64"), ((16, 64, 28, 28), "float16")]
SMOKE_SHAPES = [((4, 3, 5, 5), "float32"), ((6, 4), "float16")]
MPI_SHAPES = [((32, 64, 56, 56), "float32"), ((256, 1024), "float32")]
# MPICH's waiting ranks poll without yielding: on a machine with more
# ranks (or other busy programs) than cores, a waiting rank would hold a
# core that a rank still computing needs. Ask it to yield (MPICH only).
YIELD_ENV = {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}


#: The first line of ``--help``: the docstring's first line, without its markup.
DESCRIPTION = "How fast is mpibn's SyncBatchNorm, next to what else one could run?"


def parse(argv, prog="mpibn bench"):
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                epilog="See docs/performance.md for what is measured and the last results.")
    p.add_argument("--np", type=int, nargs="*", default=[2, 4],
                   help="rank counts to relaunch under mpiexec (none: single process only)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per candidate (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="threads for torch and BLAS (mpibn's element-wise NumPy work is single-threaded)")
    p.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, no MPI, no torch: checks the script")
    p.add_argument("--grid", action="store_true",
                   help="mpibn / torch over a grid of shapes and dtypes, best of --repeats, and the tiny "
                        "layer under mpiexec (mpibn/cli/bench/grid.py); writes performance-grid.json and .png")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="--grid cells: CPU time of the process (default; other programs' load does not "
                        "count) or wall time")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the table and the bars' verdicts of a saved performance.json (with --grid: "
                        "performance-grid.json); times nothing")
    p.add_argument("--verdicts-only", action="store_true", help="with --report: the bars' verdicts alone")
    p.add_argument("--out", default=None,
                   help="folder for performance.json / performance.png (default: the current directory; "
                        "--smoke: a new temporary directory; --out docs refreshes the committed numbers)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # set by the parent under mpiexec
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.smoke:
        args.repeats, args.warmup, args.np = 2, 1, []
    return args


def has_exact():
    import inspect
    from mpibn.layer import SyncBatchNorm
    return "exact" in inspect.signature(SyncBatchNorm).parameters


def bench_shape(shape, dtype, label, args, torch_pair):
    """One shape's times (mpibn, torch, naive, copy) and peak temporary memory."""
    x, dy = data(shape, dtype)
    channels = shape[1]
    bn = layer(channels, dtype)
    out = np.empty_like(x)
    gamma, beta = bn.gamma.data.copy(), bn.beta.data.copy()

    split = {"fwd": [], "bwd": []}

    def step():
        t0 = time.perf_counter()
        bn(x)
        t1 = time.perf_counter()
        bn.backward(dy)
        split["fwd"].append(t1 - t0)
        split["bwd"].append(time.perf_counter() - t1)

    cands = {"mpibn": step,
             "copy": lambda: np.copyto(out, x),
             "naive": lambda: textbook.backward(dy, textbook.forward(x, gamma, beta)[1])}
    torch, TF = torch_pair
    if torch is not None:
        try:
            xt = torch.from_numpy(x).requires_grad_()
            gt, bt = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
            dyt = torch.from_numpy(dy)
            TF.batch_norm(xt, None, None, gt, bt, training=True).backward(dyt)
            cands["torch"] = lambda: TF.batch_norm(xt, None, None, gt, bt, training=True).backward(dyt)
        except RuntimeError as e:          # e.g. no float16 batch norm on this CPU build
            print(f"\n  torch skipped for {label}: {str(e).splitlines()[0]}", file=sys.stderr)
    progress(f"{label}: timing {', '.join(cands)} ...")
    t = interleaved(cands, args.repeats, args.warmup)
    if has_exact():     # slow (exact sums): a few repeats of its own, not interleaved
        progress(f"{label}: timing exact=True ...")
        ex = layer(channels, dtype, exact=True)
        t["mpibn_exact"] = interleaved({"exact": lambda: (ex(x), ex.backward(dy))},
                                       min(3, args.repeats), 1)["exact"]
        ex.close()
    # forward and backward apart, from the same interleaved runs (warm-up dropped)
    t["mpibn_fwd"], t["mpibn_bwd"] = (float(np.median(split[k][args.warmup:])) for k in ("fwd", "bwd"))
    progress(f"{label}: peak temporary memory ...")
    mem = {"mpibn_fwd": peak_temp(lambda: bn(x), x.nbytes) / x.nbytes}
    mem["mpibn_bwd"] = peak_temp(lambda: bn.backward(dy), x.nbytes) / x.nbytes
    saved = textbook.forward(x, gamma, beta)[1]
    mem["naive_fwd"] = peak_temp(lambda: textbook.forward(x, gamma, beta), x.nbytes) / x.nbytes
    mem["naive_bwd"] = peak_temp(lambda: textbook.backward(dy, saved), x.nbytes) / x.nbytes
    bn.close()
    return {"shape": list(shape), "dtype": dtype, "times_s": t, "peak_temp_x_input": mem}


# -- under mpiexec: weak scaling ------------------------------------------------------

def worker(path, args):
    """Under mpiexec: every rank times its 1/P of each MPI shape; rank 0 writes the rows to path."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    results = []
    for shape, dtype in MPI_SHAPES:
        share = (shape[0] // size,) + tuple(shape[1:])
        x, dy = data(share, dtype, seed=rank)
        synced, alone = layer(shape[1], dtype, comm=comm), layer(shape[1], dtype)
        before = synced.group_comm.allreduce_calls
        t = interleaved({"synced": lambda: (synced(x), synced.backward(dy)),
                         "alone": lambda: (alone(x), alone.backward(dy))},
                        args.repeats, args.warmup, barrier=comm.Barrier)
        calls = synced.group_comm.allreduce_calls - before
        per_rank = comm.gather(t, root=0)
        if rank == 0:
            results.append({"shape": list(shape), "share": list(share), "dtype": dtype, "ranks": size,
                            "oversubscribed": size > os.cpu_count(),
                            "synced_s": max(r["synced"] for r in per_rank),
                            "alone_s": max(r["alone"] for r in per_rank),
                            "allreduce_per_step": calls / (args.warmup + args.repeats)})
        synced.close()
        alone.close()
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f)


def weak_scaling(nprocs, args):
    """worker's rows from ``mpiexec -n nprocs`` (none if the job failed)."""
    progress(f"mpiexec -n {nprocs}: weak scaling ...")
    rows = worker_json(nprocs, "mpibn.cli.bench", "--worker",
                       ["--repeats", str(args.repeats), "--warmup", str(args.warmup),
                        "--threads", str(args.threads)],
                       env=dict(os.environ, **YIELD_ENV), timeout=900)
    return rows if rows is not None else []


# -- report -----------------------------------------------------------------------------

def table(results, scaling):
    lines = []
    head = (f"{'shape':>20} {'dtype':>8} | {'fwd':>7} {'bwd':>7} {'fwd+bwd':>8} ms | {'torch':>7} "
            f"{'naive':>7} {'copy':>6} ms | {'/torch':>6} {'/naive':>6} {'/copy':>6} | mem fwd bwd")
    lines += [head, "-" * len(head)]
    for r in results:
        t, m = r["times_s"], r["peak_temp_x_input"]
        ms = {k: v * 1e3 for k, v in t.items()}
        torch_ms = f"{ms['torch']:7.2f}" if "torch" in ms else "    n/a"
        ratio_t = f"{t['mpibn'] / t['torch']:6.2f}" if "torch" in t else "   n/a"
        lines.append(f"{str(tuple(r['shape'])):>20} {r['dtype']:>8} | {ms['mpibn_fwd']:7.2f} "
                     f"{ms['mpibn_bwd']:7.2f} {ms['mpibn']:8.2f}    | {torch_ms} {ms['naive']:7.2f} "
                     f"{ms['copy']:6.2f}    | {ratio_t} {t['mpibn'] / t['naive']:6.2f} "
                     f"{t['mpibn'] / t['copy']:6.2f} | {m['mpibn_fwd']:4.2f} {m['mpibn_bwd']:4.2f}"
                     + (f" | exact=True {ms['mpibn_exact']:.2f} ms ({t['mpibn_exact'] / t['mpibn']:.2f}x)"
                        if "mpibn_exact" in t else ""))
    if scaling:
        lines += ["", "weak scaling (each rank 1/P of the batch; slowest rank; synced vs the same "
                      "layer alone on its shard, same run):"]
        for s in scaling:
            lines.append(f"  P={s['ranks']} {str(tuple(s['share'])):>20} {s['dtype']}: synced "
                         f"{s['synced_s'] * 1e3:8.2f} ms, alone {s['alone_s'] * 1e3:8.2f} ms, ratio "
                         f"{s['synced_s'] / s['alone_s']:.2f}, Allreduce per fwd+bwd "
                         f"{s['allreduce_per_step']:.0f}"
                         + (" (more ranks than cores)" if s.get("oversubscribed") else ""))
    return "\n".join(lines)


def bar_lines(checks):
    return [f"  {what:48s} {value:6.2f}  (at most {limit}: {'holds' if value <= limit else 'MISSED'})"
            for what, value, limit in checks]


def saved_table(path):
    """``mpibn bench --report performance.json``: a saved run's table, then its bars
    (today's bars applied to the saved numbers)."""
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    results, scaling = report["results"], report["weak_scaling"]
    return [table(results, scaling), "", "bars:"] + bar_lines(bars(results, scaling))


def bars(results, scaling):
    """The bars (performance targets), checked on this run's numbers: [(what, value, limit)]."""
    out = []
    main = next((r for r in results if r["shape"] == [32, 64, 56, 56] and r["dtype"] == "float32"), None)
    if main:
        t = main["times_s"]
        if "torch" in t:
            out.append(("(32, 64, 56, 56) float32 fwd+bwd / torch", t["mpibn"] / t["torch"], 1.5))
    # (The "at most 6 copies of the input" bar is retired: NumPy cannot fuse
    # element-wise steps; the copy column stays in the table as a yardstick.)
    for r in results:
        if np.prod(r["shape"]) * np.dtype(r["dtype"]).itemsize < 8 << 20:
            continue            # the peak-memory bar applies from 8 MiB of input on
        out.append((f"{tuple(r['shape'])} {r['dtype']} peak temporary / input",
                    max(r["peak_temp_x_input"]["mpibn_fwd"], r["peak_temp_x_input"]["mpibn_bwd"]), 1.0))
    for s in scaling:
        if s["ranks"] == 4:
            out.append((f"P=4 {tuple(s['share'])} synced / alone", s["synced_s"] / s["alone_s"], 1.3))
    return out


def plot(results, scaling, path, args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2 if scaling else 1, figsize=(13 if scaling else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    names = [("mpibn", "mpibn"), ("torch", "torch CPU"), ("naive", "naive NumPy"), ("copy", "np.copyto")]
    width = 0.2
    for i, (key, label) in enumerate(names):
        vals = [r["times_s"].get(key, np.nan) * 1e3 for r in results]
        ax.bar(np.arange(len(results)) + (i - 1.5) * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(results)))
    ax.set_xticklabels([f"{tuple(r['shape'])}\n{r['dtype']}" for r in results], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (log)")
    ax.set_title(f"single process, {args.threads} thread(s), median of {args.repeats}")
    ax.legend(fontsize=8)
    if scaling:
        ax = axes[0][1]
        shapes = sorted({tuple(s["shape"]) for s in scaling})
        for color, shape in zip(("C0", "C1", "C2", "C3"), shapes):
            rows = sorted((s for s in scaling if tuple(s["shape"]) == shape), key=lambda s: s["ranks"])
            ranks = [s["ranks"] for s in rows]
            ax.plot(ranks, [s["synced_s"] * 1e3 for s in rows], "o-", color=color,
                    label=f"{shape} synced")
            ax.plot(ranks, [s["alone_s"] * 1e3 for s in rows], "x--", color=color,
                    label=f"{shape} alone on the same shard")
        ax.set_xticks(sorted({s["ranks"] for s in scaling}))
        ax.set_yscale("log")
        ax.set_xlabel("ranks P (each 1/P of the batch)")
        ax.set_ylabel("per-rank fwd+bwd, ms (slowest rank, log)")
        ax.set_title("weak scaling: synced vs alone on the same shard")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None, prog="mpibn bench"):
    from ...comm import MPIUnavailable
    try:
        return _main(argv, prog)
    except MPIUnavailable as exc:            # one clear line, not libmpi's search list
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1


def _main(argv=None, prog="mpibn bench"):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv, prog)
    from .grid import OPENBLAS_VARS, run_grid, saved_report
    if args.report:
        print("\n".join(saved_report(args.report, args.verdicts_only) if args.grid
                        else saved_table(args.report)))
        return 0
    # The grid also runs without OpenBLAS settings of the environment (its process only).
    unset = OPENBLAS_VARS if args.grid else ()
    if not pinned(args.threads) or any(var in os.environ for var in unset):
        env = dict(os.environ, **{var: str(args.threads) for var in THREAD_VARS})
        for var in unset:
            env.pop(var, None)
        return subprocess.run([sys.executable, "-m", "mpibn.cli.bench", *argv], env=env).returncode
    if args.worker:
        worker(args.worker, args)
        return 0
    if args.grid:
        return run_grid(args, argv)
    return run_table(args, argv)


def run_table(args, argv):
    """``mpibn bench``: every shape in this process, then weak scaling under mpiexec."""
    torch_pair = (None, None) if args.smoke else load_torch(args.threads)
    load = os.getloadavg()
    results = []
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    for i, (shape, dtype) in enumerate(shapes):
        label = f"[{i + 1}/{len(shapes)}] {shape} {dtype}"
        results.append(bench_shape(shape, dtype, label, args, torch_pair))
    scaling = []
    for nprocs in args.np:
        scaling += weak_scaling(nprocs, args)
    progress("")
    report = {"command": " ".join(["mpibn", "bench"] + argv),
              "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
              "cpus": os.cpu_count(), "loadavg_before": load, "loadavg_after": os.getloadavg(),
              "numpy": np.__version__, "torch": getattr(torch_pair[0], "__version__", None),
              "block": blocks.BLOCK, "mpi_env": YIELD_ENV,
              "results": results, "weak_scaling": scaling}
    text = table(results, scaling)
    report["bars"] = [{"what": w, "value": v, "limit": lim, "holds": v <= lim} for w, v, lim in bars(results, scaling)]
    print(text)
    print("\nbars:")
    print("\n".join(bar_lines(bars(results, scaling))))
    print(f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    out = args.out or default_out(args.smoke)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "performance.json"), "w") as f:
        json.dump(report, f, indent=1)
    png = plot(results, scaling, os.path.join(out, "performance.png"), args)
    print(f"wrote {os.path.join(out, 'performance.json')}" + (f" and {png}" if png else ""))
    return 0
