"""What the row-per-rank buffer costs as groups grow.

    python scripts/bench_scale.py table            # bytes per layer per pass, P 2..4096, C 64..2048
    mpiexec -n 4 python -m mpi4py scripts/bench_scale.py measure --label shm >> scale.jsonl
    python scripts/hosts.py --hosts 2 --per-host 2 -- python -m mpi4py scripts/bench_scale.py measure --label 2x2 >> scale.jsonl
    python scripts/bench_scale.py fit scale.jsonl  # the model fitted to the measurements
    python scripts/bench_scale.py all              # all of it: 1..16 ranks on this host, 2 hosts x 2 (root)

One layer's pass sends a (P, 2C + HEADER) float64 buffer (HEADER = mpibn.comm.HEADER, 12): each rank's row,
zeros elsewhere, summed by Allreduce (``mpibn/comm.py``). ``measure``
times, on the ranks it runs on, Allreduce of that buffer and the
Allgather that delivers the same rows (each rank sends only its row), for
C in 64, 256, 1024, 2048: the median over ranks of each rank's median of
60, and the slowest rank's best of 60 (closer to the collective's own cost
on a loaded machine with more ranks than cores).
``fit`` fits T = alpha * ceil(log2 P) + beta * wire(P, bytes) to each
collective, wire the bytes a ring sends per rank (Allreduce 2 (P-1)/P
B, Allgather (P-1)/P B for a buffer of B bytes), and prints the model
next to the measurements.
"""
import json
import math
import os
import subprocess
import sys

CS = (64, 256, 1024, 2048)
PS = (2, 4, 8, 16, 64, 256, 1024, 4096)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpibn.comm import HEADER                         # noqa: E402  (12 numbers per row)
from mpibn.exact import SUMMED_WIDTH as EXACT_PER_CHANNEL   # noqa: E402  (float64 limbs per channel)
HERE = os.path.dirname(os.path.abspath(__file__))


def rows_bytes(p, c):
    return 8 * p * (2 * c + HEADER)


def human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000


def table():
    print(f"Bytes per layer per pass (float64). rows: the (P, 2C+{HEADER}) buffer; each rank sends about")
    print("2(P-1)/P of it in a ring Allreduce and (P-1)/P in a ring Allgather of the rows.")
    print(f"exact limbs: the O(C) summed region of exact=True, {EXACT_PER_CHANNEL} float64 per channel "
          f"whatever P (plus {HEADER} header numbers).\n")
    print("Each cell: rows / Allreduce sends / Allgather sends.\n")
    print("| P | " + " | ".join(f"C={c}" for c in CS) + " |")
    print("|---|" + "---|" * len(CS))
    for p in PS:
        cells = [f"{human(rows_bytes(p, c))} / {human(2 * (p - 1) / p * rows_bytes(p, c))} / "
                 f"{human((p - 1) / p * rows_bytes(p, c))}" for c in CS]
        print(f"| {p} | " + " | ".join(cells) + " |")
    print("| exact limbs, any P | " + " | ".join(human(8 * (EXACT_PER_CHANNEL * c + HEADER)) for c in CS) + " |")
    cross = {c: (EXACT_PER_CHANNEL * c + HEADER) / (2 * c + HEADER) for c in CS}
    print("\nrows exceed the exact O(C) buffer from P > " +
          ", ".join(f"{v:.0f} (C={c})" for c, v in cross.items()))


def measure(label):
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    for c in CS:
        width = 2 * c + HEADER
        buf = np.zeros((p, width))
        row = np.ones(width)
        rows = np.zeros((p, width))
        t_ar = times(comm, lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
        t_ag = times(comm, lambda: comm.Allgather(row, rows))
        if rank == 0:
            print(json.dumps(dict(label=label, P=p, C=c, bytes=rows_bytes(p, c), cores=os.cpu_count(),
                                  load=round(os.getloadavg()[0], 1),
                                  allreduce=t_ar[0], allgather=t_ag[0],
                                  allreduce_best=t_ar[1], allgather_best=t_ag[1])), flush=True)


def times(comm, fn, repeats=60):
    """(median over ranks of each rank's median, slowest rank's best) in seconds.

    On a loaded machine with more ranks than cores the median mostly times
    the scheduler; the best of 60 is closer to what the collective costs.
    """
    import time
    import numpy as np
    spent = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - t0)
    medians, bests = zip(*comm.allgather((float(np.median(spent)), min(spent))))
    return float(np.median(medians)), max(bests)


def wire(kind, p, nbytes):
    return (2 if kind == "allreduce" else 1) * (p - 1) / p * nbytes


def fit(path, stat="_best"):
    """Fit the model to the slowest rank's best times, only where every rank had a core.

    With more ranks than cores a rank waits for a time slice (milliseconds),
    and the collective's time says more about the scheduler than about MPI:
    those rows are shown, not fitted.
    """
    import numpy as np
    data = [json.loads(line) for line in open(path) if line.startswith("{")]
    models = {}
    for label in sorted({d["label"] for d in data}):
        runs = [d for d in data if d["label"] == label and 1 < d["P"] <= d["cores"]]
        print(f"\n{label} (load average {min(d['load'] for d in data if d['label'] == label)} to "
              f"{max(d['load'] for d in data if d['label'] == label)}, {data[0]['cores']} cores)")
        print("  | P | C | buffer | Allreduce median / best | Allgather median / best | Allgather / Allreduce (best) |")
        print("  |---|---|---|---|---|---|")
        for d in sorted(data, key=lambda d: (d["P"], d["C"])):
            if d["label"] == label:
                over = " (oversubscribed)" if d["P"] > d["cores"] else ""
                print(f"  | {d['P']}{over} | {d['C']} | {human(d['bytes'])} | {d['allreduce'] * 1e6:.0f} / "
                      f"{d['allreduce_best'] * 1e6:.0f} us | {d['allgather'] * 1e6:.0f} / "
                      f"{d['allgather_best'] * 1e6:.0f} us | {d['allgather_best'] / d['allreduce_best']:.2f} |")
        if len(runs) < 2:
            print("  (no run with a core per rank: not fitted)")
            continue
        print(f"  T = alpha * ceil(log2 P) + beta * ring bytes per rank, fitted to the best times of P <= cores:")
        for kind in ("allreduce", "allgather"):
            a = np.array([[math.ceil(math.log2(d["P"])), wire(kind, d["P"], d["bytes"])] for d in runs])
            t = np.array([d[kind + stat] for d in runs])
            (alpha, beta), *_ = np.linalg.lstsq(a, t, rcond=None)
            rel = np.abs(a @ [alpha, beta] - t) / t
            models[label, kind] = alpha, beta
            print(f"    {kind}: alpha {alpha * 1e6:.1f} us, beta {beta * 1e9:.3f} ns/byte "
                  f"({1 / beta / 1e9:.2f} GB/s); model off by at most {rel.max():.0%}")
    for (label, kind), (alpha, beta) in models.items():
        if kind != "allreduce":
            continue
        ag_alpha, ag_beta = models[label, "allgather"]
        print(f"\nModel with {label}'s constants, per layer per pass (us): "
              "Allreduce of rows / Allgather of rows / Allreduce of exact limbs")
        print("| P | " + " | ".join(f"C={c}" for c in CS) + " |")
        print("|---|" + "---|" * len(CS))
        for p in PS:
            steps = math.ceil(math.log2(p))
            cells = []
            for c in CS:
                ar = alpha * steps + beta * wire("allreduce", p, rows_bytes(p, c))
                ag = ag_alpha * steps + ag_beta * wire("allgather", p, rows_bytes(p, c))
                ex = alpha * steps + beta * wire("allreduce", p, 8 * (EXACT_PER_CHANNEL * c + HEADER))
                cells.append(f"{ar * 1e6:.0f} / {ag * 1e6:.0f} / {ex * 1e6:.0f}")
            print(f"| {p} | " + " | ".join(cells) + " |")


def run_all():
    py = sys.executable
    mpiexec = os.path.join(os.path.dirname(py), "mpiexec")
    out = os.path.join(os.getcwd(), "scale.jsonl")
    me = os.path.abspath(__file__)
    with open(out, "w") as f:
        for p in (1, 2, 4, 8, 16):
            subprocess.run([mpiexec, "-n", str(p), py, "-m", "mpi4py", me, "measure", "--label",
                            "one host, shared memory"], stdout=f, check=True, timeout=600)
        subprocess.run([py, os.path.join(HERE, "hosts.py"), "--hosts", "2", "--per-host", "2", "--",
                        py, "-m", "mpi4py", me, "measure", "--label", "2 hosts x 2, TCP over veth"],
                       stdout=f, timeout=600)
    table()
    fit(out)


def main(argv):
    job = argv[1] if len(argv) > 1 else "table"
    if job == "table":
        return table()
    if job == "measure":
        return measure(argv[argv.index("--label") + 1] if "--label" in argv else "run")
    if job == "fit":
        return fit(argv[2])
    if job == "all":
        return run_all()
    sys.exit(f"usage: bench_scale.py table|measure [--label L]|fit FILE|all; got {job!r}")


if __name__ == "__main__":
    main(sys.argv)
