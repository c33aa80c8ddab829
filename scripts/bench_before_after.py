#!/usr/bin/env python3
"""mpibn of an older commit against mpibn now (and torch CPU), in one run.

    python scripts/bench_before_after.py --commit c2ef9e9 --out docs/bench-before-after.json
    python scripts/bench_before_after.py --commit HEAD~3 --repeats 15
    python scripts/bench_before_after.py --report docs/bench-before-after.json   # a saved run's table

Needs a git checkout. The old ``mpibn`` package is extracted with ``git
archive`` into a temporary directory and imported under another name
(``mpibn_before``; its imports are relative), so both run in one process,
interleaved with torch (when installed), one thread each, on the process's
CPU clock, best of ``--repeats`` rounds (``mpibn.cli.bench.best_of``).
Shapes: small and mid-size layers, where the fixed cost per call shows,
and two big ones. ``--out`` also writes every number (and the command,
versions and load) to a JSON file; ``--report`` prints a saved run's
table again, with the geometric mean of before / now.
"""
import json
import math
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


HEAD = (f"{'shape':>18} {'dtype':>8} | {'before us':>10} {'now us':>10} {'torch us':>10} | "
        f"before/now  now/torch")


def row_line(r):
    before, now, tt = r["before_s"], r["now_s"], r["torch_s"]
    return (f"{str(tuple(r['shape'])):>18} {r['dtype']:>8} | {before * 1e6:10.1f} {now * 1e6:10.1f} "
            f"{tt * 1e6 if tt else float('nan'):10.1f} | {before / now:10.2f} "
            f"{now / tt if tt else float('nan'):10.2f}")


# The project's target for a kernel rewrite against c2ef9e9 (the last version whose
# sums went through BLAS): the geometric mean of before/now at least this.
TARGET, TARGET_COMMIT = 1.5, "c2ef9e9"


def summary_lines(report):
    rows = report["rows"]
    geo = math.exp(sum(math.log(r["before_s"] / r["now_s"]) for r in rows) / len(rows))
    verdict = []
    if report["commit"] == TARGET_COMMIT:
        held = geo >= TARGET
        verdict = [f"target: at least {TARGET}x against {TARGET_COMMIT}: "
                   + ("holds" if held else f"MISSED by {100 * (1 - geo / TARGET):.0f} %")]
    return [f"geometric mean of before/now over {len(rows)} shapes: {geo:.2f}", *verdict,
            f"before = {report['commit']}, now = {report['now']}; best of {report['repeats']} rounds, "
            f"CPU clock; load average {report['loadavg_before'][0]:.1f} before, "
            f"{report['loadavg_after'][0]:.1f} after"]


def saved_report(path):
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    return [HEAD] + [row_line(r) for r in report["rows"]] + summary_lines(report)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commit", default="c2ef9e9", help="the 'before' version (any git revision)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, metavar="JSON", help="also write the results here")
    p.add_argument("--report", default=None, metavar="JSON", help="print a saved run's table (times nothing)")
    args = p.parse_args()
    if args.report:
        print("\n".join(saved_report(args.report)))
        return
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
    load = os.getloadavg()
    now = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip() or "unknown"
    where = tempfile.mkdtemp(prefix="mpibn-before-")
    rows = []
    try:
        before = old_package(args.commit, where)
        print(HEAD)
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
            rows.append({"shape": list(shape), "dtype": dtype, "before_s": t["before"], "now_s": t["now"],
                         "torch_s": t.get("torch")})
            print(row_line(rows[-1]), flush=True)
    finally:
        shutil.rmtree(where)
    report = {"command": "python scripts/bench_before_after.py " + " ".join(sys.argv[1:]),
              "commit": args.commit, "now": now, "repeats": args.repeats, "numpy": np.__version__,
              "torch": getattr(torch, "__version__", None), "loadavg_before": load,
              "loadavg_after": os.getloadavg(), "rows": rows}
    print("\n".join(summary_lines(report)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
