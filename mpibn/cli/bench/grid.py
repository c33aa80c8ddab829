"""``mpibn bench --grid``: mpibn against torch CPU over a grid of shapes and dtypes.

    mpibn bench --grid              # the grid, then the tiny layer under mpiexec -n 1 and -n 4
    mpibn bench --grid --np         # the grid only (no mpiexec)
    mpibn bench --grid --smoke      # a tiny grid, no torch, no MPI: checks that it runs

Each cell is one (shape, dtype): forward+backward of ``SyncBatchNorm`` in
training mode (``bn(x)``, ``bn.backward(dy)``, one process, ``COMM_SELF``)
against torch's CPU ``F.batch_norm`` in training mode with moving
statistics, forward plus ``torch.autograd.grad`` for dx, dgamma and dbeta
(torch 2.13.0, CPU build, when installed). One thread each. The two run
interleaved: each round times a batch of calls of one, then of the other
(a batch lasts about 2 ms, so that the clock's resolution and the
per-batch overhead do not count), and a cell's time is the best round of
``--repeats`` (best-of-k: on a machine shared with other programs, load
only ever adds time). The clock is the process's CPU time (``--clock
cpu``, the default: time other programs take the core away does not
count; on a quiet machine it is the wall time) or ``--clock wall``. The
MPI runs always use wall time (waiting in a collective is their cost). For float16 the cell also times the *conversion
floor*: what any implementation that computes in float64 must convert,
x and dy and x again up to float64 (NumPy converts float16 in software)
and y and dx back down.

Under ``mpiexec`` (unless ``--np`` is given with no counts) the tiny layer,
(2, 4, 3, 3) float32 on every rank, is timed per call with its Allreduce
under ``-n 1`` and ``-n 4``, next to the same layer alone on each rank
(``COMM_SELF``) and a bare Allreduce of the same buffer, in one run per
MPICH setting: the default, and settings that make waiting ranks yield the
core (``MPI_SETTINGS``).

Results: ``performance-grid.json`` and the heat map ``performance-grid.png``
of the ratios mpibn / torch, in ``--out`` (as ``mpibn bench``); the bars
(the project's performance targets) are checked and printed; a progress
line goes to stderr. ``mpibn bench --grid --report performance-grid.json``
prints a saved run's table of ratios and each bar's verdict (times
nothing; ``--verdicts-only``: the verdicts alone), which
docs/performance.md and the README quote.
"""
import json
import math
import os
import sys
import time

import numpy as np

from mpibn import blocks

from . import SAMPLE_S, best_of, data, default_out, layer, load_torch, progress, worker_json

SHAPES = ([(n, c) for n in (2, 16, 256) for c in (8, 256, 1024)]
          + [(2, 4, 3, 3), (8, 64, 8, 8), (16, 64, 28, 28), (32, 64, 56, 56), (4, 512, 7, 7)])
DTYPES = ("float16", "float32", "float64")
SMOKE_SHAPES = [(2, 3), (2, 2, 3, 3)]
TINY = ((2, 4, 3, 3), "float32")
# The project's performance targets, ratios mpibn / torch in the same run: the geometric mean over
# the float32 and float64 cells, over the float64 cells alone, the worst
# float32/float64 cell, and the tiny layer's own ratio (a ratio, not
# microseconds: the machine's load moves absolute times 2x).
GEOMEAN_BAR, FLOAT64_BAR, CELL_BAR, TINY_BAR = 1.7, 1.4, 3.5, 1.0
# MPICH settings for ranks that wait in a collective (MPICH 4-5 names; others ignore them).
MPI_SETTINGS = {
    "default": {},
    "heavy_yield": {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"},
    "yield_every_poll": {"MPIR_CVAR_POLLS_BEFORE_YIELD": "1", "MPIR_CVAR_POSIX_POLL_FREQUENCY": "1"},
    "progress_throttle": {"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1"},
}
# The cells' clock: CPU time of this process (the default: one thread each,
# so it is the time of the work itself, and other programs that take the
# core away do not count; on a quiet machine it equals wall time), or wall time.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
# OpenBLAS settings a shared machine may set for every program; the grid
# runs without them (in its own process only) and records the kernel in use.
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def torch_step(torch, functional, x, dy, gamma, beta):
    """torch's training forward + backward (dx, dgamma, dbeta), as mpibn's layer does."""
    xt = torch.from_numpy(x).requires_grad_()
    gt, bt = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
    dyt = torch.from_numpy(dy)
    rm = torch.zeros(x.shape[1], dtype=xt.dtype)
    rv = torch.ones(x.shape[1], dtype=xt.dtype)

    def step():
        y = functional.batch_norm(xt, rm, rv, gt, bt, training=True, momentum=0.1, eps=1e-5)
        torch.autograd.grad(y, (xt, gt, bt), dyt)
    step()                                             # raises here if the dtype is unsupported
    return step


def conversion_floor(x, dy):
    """float16 -> float64 of x, dy and x, float64 -> float16 of y and dx."""
    up, down = np.empty(x.shape), np.empty(x.shape, x.dtype)

    def floor():
        np.copyto(up, x)
        np.copyto(up, dy)
        np.copyto(up, x)
        np.copyto(down, up)
        np.copyto(down, up)
    return floor


def cell(shape, dtype, torch, functional, rounds, clock, sample=SAMPLE_S):
    x, dy = data(shape, dtype)
    bn = layer(shape[1], dtype)
    gamma, beta = bn.gamma.data.copy(), bn.beta.data.copy()
    cands = {"mpibn": lambda: (bn(x), bn.backward(dy))}
    note = None
    if torch is not None:
        try:
            cands["torch"] = torch_step(torch, functional, x, dy, gamma, beta)
        except RuntimeError as e:                      # a dtype this CPU build lacks
            note = f"torch: {str(e).splitlines()[0]}"
    if dtype == "float16":
        cands["floor"] = conversion_floor(x, dy)
    t = best_of(cands, rounds, clock=clock, sample=sample)
    bn.close()
    plan = blocks.plan((shape[0], shape[1], int(np.prod(shape[2:], dtype=int))))
    out = {"shape": list(shape), "dtype": dtype, "plan": plan if plan == "whole" else list(plan),
           "mpibn_s": t["mpibn"], "torch_s": t.get("torch"), "floor_s": t.get("floor"),
           "ratio": t["mpibn"] / t["torch"] if "torch" in t else None}
    if note:
        out["note"] = note
    return out


def _geomean(cells):
    return math.exp(sum(math.log(c["ratio"]) for c in cells) / len(cells))


def verdicts(cells):
    """The bars (performance targets) on this run's cells: [(what, value, limit, unit)]."""
    both = [c for c in cells if c["dtype"] in ("float32", "float64") and c["ratio"] is not None]
    doubles = [c for c in both if c["dtype"] == "float64"]
    out = []
    if both:
        worst = max(both, key=lambda c: c["ratio"])
        out.append((f"geometric mean mpibn/torch, {len(both)} float32+float64 cells", _geomean(both),
                    GEOMEAN_BAR, "x"))
        if doubles:
            out.append((f"geometric mean mpibn/torch, {len(doubles)} float64 cells", _geomean(doubles),
                        FLOAT64_BAR, "x"))
        out.append((f"worst cell {tuple(worst['shape'])} {worst['dtype']}", worst["ratio"], CELL_BAR, "x"))
        over = [c for c in both if c["ratio"] > CELL_BAR]
        out.append((f"float32/64 cells above {CELL_BAR}x", len(over), 0, "cells"))
    tiny = next((c for c in cells if (tuple(c["shape"]), c["dtype"]) == TINY), None)
    if tiny and tiny["ratio"] is not None:
        out.append(("(2, 4, 3, 3) float32 fwd+bwd, mpibn/torch", tiny["ratio"], TINY_BAR, "x"))
    return out


def heat_map(cells, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        print("matplotlib not installed: no heat map", file=sys.stderr)
        return None
    shapes = list(dict.fromkeys(tuple(c["shape"]) for c in cells))
    dtypes = list(dict.fromkeys(c["dtype"] for c in cells))
    grid = np.full((len(shapes), len(dtypes)), np.nan)
    for c in cells:
        if c["ratio"] is not None:
            grid[shapes.index(tuple(c["shape"])), dtypes.index(c["dtype"])] = c["ratio"]
    fig, ax = plt.subplots(figsize=(6.5, 0.42 * len(shapes) + 1.6))
    top = max(16.0, np.nanmax(grid) if np.isfinite(grid).any() else 16.0)
    # log scale centred on 1 (as fast as torch): green below, red above
    image = ax.imshow(grid, cmap="RdYlGn_r", norm=LogNorm(vmin=1 / top, vmax=top), aspect="auto")
    for i, shape in enumerate(shapes):
        for j, dtype in enumerate(dtypes):
            c = next(c for c in cells if tuple(c["shape"]) == shape and c["dtype"] == dtype)
            text = "n/a" if c["ratio"] is None else f"{c['ratio']:.2f}"
            text += f"\n{c['mpibn_s'] * 1e6:.0f} us" if c["mpibn_s"] < 1e-3 else f"\n{c['mpibn_s'] * 1e3:.1f} ms"
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5)
    ax.set_xticks(range(len(dtypes)), dtypes)
    ax.set_yticks(range(len(shapes)), [str(s) for s in shapes], fontsize=8)
    ax.set_title("mpibn / torch CPU, fwd+bwd training, 1 thread, best of k\n"
                 "(cell: ratio and mpibn's time; green below 1, red above)", fontsize=9)
    fig.colorbar(image, ax=ax, label="mpibn / torch (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return [{k: v for k, v in d.items() if k != "filepath"} for d in threadpool_info()]


# -- under mpiexec: the tiny layer's per-call time --------------------------------------

def mpi_worker(path, rounds):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    shape, dtype = TINY
    x, dy = data(shape, dtype, seed=comm.Get_rank())
    synced, alone = layer(shape[1], dtype, comm=comm), layer(shape[1], dtype)
    buf = np.zeros(synced.group_comm._flat.size)       # the layer's exchange buffer
    one = np.zeros(1)
    t = best_of({"synced": lambda: (synced(x), synced.backward(dy)),
                 "alone": lambda: (alone(x), alone.backward(dy)),
                 "allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
                 "allreduce_1": lambda: comm.Allreduce(MPI.IN_PLACE, one, op=MPI.SUM)},
                rounds, barrier=comm.Barrier, agree=lambda inner: comm.bcast(inner, root=0))
    every = comm.gather(t, root=0)
    if comm.Get_rank() == 0:
        with open(path, "w") as f:
            json.dump({"ranks": comm.Get_size(), "buffer_values": int(buf.size),
                       **{k: max(r[k] for r in every) for k in t}}, f)
    synced.close()
    alone.close()


def mpi_run(nprocs, setting, rounds):
    """mpi_worker's numbers from ``mpiexec -n nprocs`` with one MPICH setting (None if it failed)."""
    env = dict(os.environ, **MPI_SETTINGS[setting])
    found = worker_json(nprocs, "mpibn.cli.bench.grid", "--mpi-worker", [str(rounds)], env=env,
                        timeout=600, quiet=True)
    return None if found is None else dict(found, setting=setting, env=MPI_SETTINGS[setting])


def mpi_part(counts, rounds):
    runs = []
    plan = [(1, "default")] + [(n, s) for n in counts if n > 1 for s in MPI_SETTINGS]
    for i, (nprocs, setting) in enumerate(plan):
        progress(f"[mpi {i + 1}/{len(plan)}] tiny layer under mpiexec -n {nprocs}, {setting} ...")
        run = mpi_run(nprocs, setting, rounds)
        if run:
            runs.append(run)
    return runs


# -- the run ----------------------------------------------------------------------------

def bar_verdict(value, limit, unit):
    """'holds', or 'MISSED' with by how much (a percentage of the bar, or a count)."""
    if value <= limit:
        return "holds"
    if unit == "cells":
        return f"MISSED by {value - limit:g} cell{'s' if value - limit != 1 else ''}"
    return f"MISSED by {100 * (value / limit - 1):.0f} %"


def bar_lines(checks):
    """One line per bar: what, this run's value, the bar and the verdict."""
    return [f"  {what:52s} {value:8d}  (at most {limit} {unit}: {bar_verdict(value, limit, unit)})"
            if unit == "cells" else
            f"  {what:52s} {value:8.2f}  (at most {limit} {unit}: {bar_verdict(value, limit, unit)})"
            for what, value, limit, unit in checks]


def mpi_lines(runs):
    lines = ["tiny layer (2, 4, 3, 3) float32 per fwd+bwd call, slowest rank, us:"]
    for r in runs:
        lines.append(f"  -n {r['ranks']} {r['setting']:>17}: synced {r['synced'] * 1e6:8.1f}, alone "
                     f"{r['alone'] * 1e6:8.1f}, Allreduce of the layer's {r['buffer_values']} values "
                     f"{r['allreduce'] * 1e6:7.1f}, of 1 value {r['allreduce_1'] * 1e6:7.1f}")
    return lines


def report_lines(cells, runs, checks):
    lines = [f"{'shape':>18} {'dtype':>8} | {'mpibn us':>10} {'torch us':>10} {'ratio':>6} | "
             f"{'floor us':>9} {'/floor':>6} | plan"]
    lines.append("-" * len(lines[0]))
    for c in cells:
        torch_us = f"{c['torch_s'] * 1e6:10.1f}" if c["torch_s"] else "       n/a"
        ratio = f"{c['ratio']:6.2f}" if c["ratio"] else "   n/a"
        floor = (f"{c['floor_s'] * 1e6:9.1f} {c['mpibn_s'] / c['floor_s']:6.2f}" if c["floor_s"]
                 else f"{'':9} {'':6}")
        lines.append(f"{str(tuple(c['shape'])):>18} {c['dtype']:>8} | {c['mpibn_s'] * 1e6:10.1f} "
                     f"{torch_us} {ratio} | {floor} | {c['plan']}")
    if runs:
        lines += [""] + mpi_lines(runs)
    lines += ["", "bars:"] + bar_lines(checks)
    return lines


def ratio_table(cells):
    """The grid as shapes x dtypes, each cell 'ratio (mpibn us / torch us)'."""
    shapes = list(dict.fromkeys(tuple(c["shape"]) for c in cells))
    dtypes = list(dict.fromkeys(c["dtype"] for c in cells))
    at = {(tuple(c["shape"]), c["dtype"]): c for c in cells}

    def text(c):
        if c is None:
            return "-"
        if c["ratio"] is None:
            return f"n/a ({c['mpibn_s'] * 1e6:.0f} us)"
        return f"{c['ratio']:.2f} ({c['mpibn_s'] * 1e6:.0f} / {c['torch_s'] * 1e6:.0f})"
    rows = [["shape"] + dtypes] + [[str(s)] + [text(at.get((s, d))) for d in dtypes] for s in shapes]
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = [" | ".join(f"{v:>{w}}" for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines


def kernel(report):
    """'OpenBLAS 0.3.31 SkylakeX' from a report's threadpoolctl record, or what there is."""
    for lib in report.get("blas") or []:
        if isinstance(lib, dict) and lib.get("internal_api") == "openblas":
            version = ".".join(str(lib.get("version") or "?").split(".")[:3])
            return f"OpenBLAS {version} {lib.get('architecture', '?')} kernel"
    return "BLAS kernel not recorded"


def saved_report(path, verdicts_only=False):
    """``mpibn bench --grid --report PATH``: the table and the verdicts of a saved run.

    The verdicts are this code's bars applied to the saved cells, so a bar
    that changes changes the report (and the docs that quote it)."""
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    cells, runs = report["cells"], report.get("mpi_tiny_layer") or []
    checks = verdicts(cells)
    if verdicts_only:
        return ["bars (mpibn / torch, the project's performance targets):"] + bar_lines(checks)
    load = report.get("loadavg_before", [float("nan")])[0], report.get("loadavg_after", [float("nan")])[0]
    lines = [f"`{report['command']}`: NumPy {report['numpy']}, torch {report['torch']}, {kernel(report)}, "
             f"{report['threads']} thread",
             f"best of {report['rounds_best_of']} rounds, {report['clock']} clock, "
             f"load average {load[0]:.1f} before, {load[1]:.1f} after, {report['cpus']} CPUs",
             "",
             "mpibn / torch, training forward + backward (mpibn us / torch us):"]
    lines += ratio_table(cells)
    if runs:
        lines += [""] + mpi_lines(runs)
    lines += ["", "bars (mpibn / torch, the project's performance targets):"] + bar_lines(checks)
    return lines


def run_grid(args, argv):
    """``mpibn bench --grid`` (called by ``mpibn.cli.bench.run.main`` with its parsed arguments)."""
    torch, functional = (None, None) if args.smoke else load_torch(args.threads)
    load = os.getloadavg()
    shapes, dtypes = (SMOKE_SHAPES, ("float32", "float16")) if args.smoke else (SHAPES, DTYPES)
    todo = [(s, d) for s in shapes for d in dtypes]
    cells = []
    for i, (shape, dtype) in enumerate(todo):
        c = cell(shape, dtype, torch, functional, args.repeats, CLOCKS[args.clock],
                 SAMPLE_S / 10 if args.smoke else SAMPLE_S)
        cells.append(c)
        ratio = f" ({c['ratio']:.2f}x torch)" if c["ratio"] else ""
        progress(f"[{i + 1}/{len(todo)}] {shape} {dtype}: mpibn {c['mpibn_s'] * 1e6:.0f} us{ratio}")
    runs = mpi_part(args.np, args.repeats) if args.np else []
    progress("")
    checks = verdicts(cells)
    for line in report_lines(cells, runs, checks):
        print(line)
    print(f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    report = {"command": " ".join(["mpibn", "bench"] + list(argv)), "rounds_best_of": args.repeats,
              "clock": args.clock,
              "sample_s": SAMPLE_S, "threads": args.threads, "cpus": os.cpu_count(),
              "loadavg_before": load, "loadavg_after": os.getloadavg(), "numpy": np.__version__,
              "torch": getattr(torch, "__version__", None), "blas": blas_info(),
              "unset": list(OPENBLAS_VARS), "whole_max_values": blocks.WHOLE, "block": blocks.BLOCK,
              "cells": cells, "mpi_tiny_layer": runs,
              "bars": [{"what": w, "value": v, "limit": lim, "unit": u, "holds": v <= lim}
                       for w, v, lim, u in checks]}
    out = args.out or default_out(args.smoke)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "performance-grid.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    png = heat_map(cells, os.path.join(out, "performance-grid.png"))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--mpi-worker"]:
    mpi_worker(sys.argv[2], int(sys.argv[3]))
