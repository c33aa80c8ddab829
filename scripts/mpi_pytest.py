#!/usr/bin/env python3
"""pytest on every rank of an mpiexec job, with one readable report.

    mpiexec -n 4 python -m mpi4py scripts/mpi_pytest.py --with-mpi [pytest arguments]
    python3 scripts/mpi_pytest.py --check DIR --np 4     # the same check after the job

Plain ``mpiexec -n 4 python -m mpi4py -m pytest`` interleaves four progress
streams, four headers and four summaries. Here rank 0 reports on the
terminal as pytest does; every other rank writes its whole output
(progress, failures, stack dumps of a timeout) to ``DIR/rank<r>.log``, and
every rank writes its exit status and outcome counts to ``DIR/rank<r>.json``.
DIR is ``--logs DIR`` or a new temporary directory, named at the end.

Then rank 0 waits (at most ``--wait`` seconds, default 120; files, no
collective, so a dead rank cannot hang it) for the other ranks' results
and prints one line when each exited 0 (or, like rank 0, 5: no test
selected) with the same counts as rank 0,
else the whole log of each rank that failed, counted differently or left
no result. A mismatch makes rank 0 exit 1. The other ranks wait for rank
0 to finish that before they exit: under ``python -m mpi4py`` a rank that
exits non-zero aborts the whole job. ``--no-check`` leaves the check to a
later ``--check`` (scripts/run.py does that, so that it still happens when
mpiexec ended the job early).
"""
import json
import os
import sys
import tempfile
import time

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


class Counts:
    """pytest plugin: this rank's outcome counts, as in pytest's summary line."""

    counts = None

    def pytest_terminal_summary(self, terminalreporter):
        stats = terminalreporter.stats
        self.counts = {k: len(stats[k]) for k in OUTCOMES if stats.get(k)}


def summary(result):
    if result is None:
        return "no result (the rank ended before pytest finished)"
    counts = ", ".join(f"{n} {k}" for k, n in (result["counts"] or {}).items()) or "nothing ran"
    return f"exit {result['exit']}: {counts}"


def wait_for(path, seconds):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.2)


def load(logdir, rank):
    try:
        with open(os.path.join(logdir, f"rank{rank}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check(logdir, size, wait=0.0):
    """Print one line if ranks 1..size-1 exited 0 with rank 0's counts, else their logs;
    return True when they did. Waits up to ``wait`` seconds for missing results."""
    deadline = time.monotonic() + wait
    while True:
        results = [load(logdir, r) for r in range(size)]
        if all(r is not None for r in results) or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    reference = results[0] or {"exit": None, "counts": None}
    # Exit 5 (no test selected) is a failure only when rank 0 disagrees.
    bad = [r for r in range(1, size)
           if results[r] is None or results[r]["exit"] not in (0, 5)
           or results[r]["exit"] != reference["exit"] or results[r]["counts"] != reference["counts"]]
    for r in bad:
        print(f"\n===== rank {r}: {summary(results[r])} (rank 0: {summary(results[0])}); "
              f"its output, {os.path.join(logdir, f'rank{r}.log')}: =====", flush=True)
        try:
            with open(os.path.join(logdir, f"rank{r}.log"), errors="replace") as f:
                sys.stdout.write(f.read())
        except OSError as exc:
            print(f"(no log: {exc})")
        print(f"===== end of rank {r} =====", flush=True)
    if not bad and size > 1:
        print(f"mpi_pytest: ranks 1-{size - 1} agree with rank 0 ({summary(results[0])}); "
              f"their output: {logdir}/rank<r>.log", flush=True)
    return not bad


def options(argv):
    """(our options, pytest's arguments): ours come first."""
    ours = {"logs": None, "wait": 120.0, "check": False, "np": None}
    i = 0
    while i < len(argv):
        if argv[i] in ("--logs", "--wait", "--np") and i + 1 < len(argv):
            ours[argv[i][2:]] = argv[i + 1]
            i += 2
        elif argv[i] in ("--check", "--no-check"):
            ours["check"] = argv[i] == "--check" or "no"
            if argv[i] == "--check" and i + 1 < len(argv):
                ours["logs"] = argv[i + 1]
                i += 1
            i += 1
        else:
            break
    return ours, argv[i:]


def main(argv):
    ours, args = options(argv)
    if ours["check"] is True:
        if not ours["logs"] or not ours["np"]:
            sys.exit("usage: mpi_pytest.py --check DIR --np N")
        return 0 if check(ours["logs"], int(ours["np"])) else 1
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    logdir = ours["logs"]
    if logdir is None:     # one new directory for the job, named by rank 0 (at start-up: safe)
        logdir = comm.bcast(tempfile.mkdtemp(prefix="mpibn-pytest-ranks-") if rank == 0 else None)
    os.makedirs(logdir, exist_ok=True)
    if rank > 0:
        # Before pytest starts: its output capture then saves this file as the terminal.
        sys.stdout.flush()
        sys.stderr.flush()
        log = os.open(os.path.join(logdir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        args = ["-p", "no:cacheprovider"] + args        # one rank keeps pytest's cache
    import pytest
    counts = Counts()
    status = int(pytest.main(args, plugins=[counts]))
    with open(os.path.join(logdir, f"rank{rank}.json.tmp"), "w") as f:
        json.dump({"exit": status, "counts": counts.counts}, f)
    os.replace(os.path.join(logdir, f"rank{rank}.json.tmp"), os.path.join(logdir, f"rank{rank}.json"))
    done = os.path.join(logdir, "rank0.done")
    if rank == 0:
        sys.stdout.flush()
        if ours["check"] != "no" and not check(logdir, size, wait=float(ours["wait"])):
            status = status or 1
        if ours["check"] == "no":
            # Wait for every rank's result all the same: a failing rank 0 that
            # exited now would abort (python -m mpi4py) ranks still writing theirs.
            for r in range(1, size):
                wait_for(os.path.join(logdir, f"rank{r}.json"), float(ours["wait"]))
        open(done, "w").close()
    else:
        wait_for(done, 2 * float(ours["wait"]))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
