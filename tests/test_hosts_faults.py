"""Network faults across emulated hosts (issue 14, part 3).

Each test runs ``scripts/hosts_train.py`` (a checked training job: every
step's statistics are compared with the concatenated batch on every rank,
a checkpoint per rank per completed step) in ``scripts/hosts.py`` with 2
hosts x 2 ranks: ranks 0, 1 on host1 and 2, 3 on host2, the faulty one.

* a host dies: the test SIGKILLs every process of host2 mid-training;
* a partition: host2's link goes down (between steps, or 0.2 s into an
  Allreduce that host1 joins late) and stays down; layers have
  ``debug_timeout``;
* a flap: the link goes down for 2 s, then up, between steps or inside one.

docs/reliability.md ("Across hosts") has the table these tests produce.
"""
import os
import re
import signal
import sys
import time

import numpy as np
import pytest

import hosts_support as hs
from hosts_support import Harness, leftovers

from mpibn import load_checkpoint
from mpibn.watchdog import EXIT_GRACE

PY = sys.executable
pytestmark = hs.marks + [hs.needs_hosts]
DEBUG_TIMEOUT = 3.0
GRACE = 4.0              # "a few seconds": the probe round (2 s) and polling
HOST2 = {2, 3}


def train(out, *options, linger=None, env=None):
    extra = ("--linger", linger) if linger is not None else ()
    return Harness([PY, "-m", "mpi4py", "scripts/hosts_train.py", "--out", out, *options], "--timeout", 90,
                   *extra, env=hs.clean_env(**(env or {})))


def gone(harness, host, since, timeout=60):
    """Seconds after ``since`` when no process of ``host`` is left (None: still there)."""
    end = time.time() + timeout
    while harness.pids(host):
        if time.time() > end or harness.proc.poll() is not None and not harness.pids(host):
            break
        time.sleep(0.05)
    return None if harness.pids(host) else time.time() - since


def check_stopped(message, rank, after):
    """A rank's first error after a partition: its own CollectiveTimeout naming the other
    side, or GroupFailed because a peer on its side stopped first (fail-stop notice)."""
    if message.startswith("GroupFailed: "):
        assert re.search(r"rank \d stopped the group: its collective timed out", message), message
        return False
    assert message.startswith("CollectiveTimeout: "), message
    # It names every rank on the other side of the cut. A rank of its own
    # side may be named too: one still inside the previous collective,
    # whose last message from across the cut never came, truly never
    # arrived at this one (seen once in CI: rank 2 named 0, 1 and 3).
    lost = {int(r) for part in message.split("; ")[1:]
            if part.startswith(("never arrived", "lost"))
            for r in part.split(": ")[-1].strip("[]").split(", ") if r.isdigit()}
    other_side = {0, 1, 2, 3} - HOST2 if rank in HOST2 else HOST2
    assert other_side <= lost <= {0, 1, 2, 3} - {rank}, message
    assert after < DEBUG_TIMEOUT + GRACE, message
    return True


def wait_for(path, harness, timeout=60):
    end = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):     # written, not just created
        assert harness.proc.poll() is None and time.monotonic() < end, harness.output
        time.sleep(0.01)
    return float(path.read_text())


def steps_done(out, rank):
    return [int(line.split()[1]) for line in (out / f"rank{rank}.log").read_text().splitlines()
            if line.startswith("step ") and " ok " in line]


def check_checkpoints(out, rank, steps):
    """Exactly one complete, loadable checkpoint per completed step; no partial files."""
    files = sorted(p.name for p in out.iterdir() if p.name.startswith(f"rank{rank}-step"))
    assert files == sorted(f"rank{rank}-step{k}.npz" for k in steps)
    assert not [p.name for p in out.iterdir() if p.name.startswith(f".rank{rank}-") and p.name.endswith(".tmp")]
    for k in steps:
        params = load_checkpoint(str(out / f"rank{rank}-step{k}.npz"))
        assert sorted(params) == ["beta", "gamma", "mean", "variance"]


@pytest.mark.timeout(120)
def test_a_host_dies_and_the_job_ends(tmp_path):
    harness = train(tmp_path, "--fault", "kill", "--steps", 400, "--at", 3)
    wait_for(tmp_path / "stamp", harness)
    time.sleep(0.2)                                    # mid-training, anywhere in a step
    victims = harness.pids("host2")
    assert victims, harness.output
    killed_at = time.time()
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:      # listed, then exited by itself (a short-lived helper process)
            pass
    while harness.pids("host1") and time.time() < killed_at + 10.0:
        time.sleep(0.02)
    host1_gone = time.time()
    rc = harness.wait(60)
    ended = harness.when("hosts.py: job exited with status")
    print(f"host2 killed ({len(victims)} processes): job exit status {rc}, mpiexec ended "
          f"{ended - killed_at:.2f} s later, host1's last process {host1_gone - killed_at:.2f} s later")
    assert rc != 0, harness.output
    assert ended - killed_at < 10.0 and host1_gone - killed_at < 10.0, harness.output
    # host1's ranks ended by themselves (mpiexec ended them): the teardown found nothing to kill.
    assert "teardown killed" not in harness.output, harness.output
    for rank in (0, 1):
        assert "done" not in (tmp_path / f"rank{rank}.log").read_text()
        check_checkpoints(tmp_path, rank, steps_done(tmp_path, rank))
    for rank in (2, 3):        # killed, perhaps mid-write: its finished checkpoints are intact
        done = [k for k in steps_done(tmp_path, rank)]
        for k in done:
            assert sorted(load_checkpoint(str(tmp_path / f"rank{rank}-step{k}.npz"))) == \
                ["beta", "gamma", "mean", "variance"]
    assert leftovers(harness.prefix) == []


@pytest.mark.timeout(150)
@pytest.mark.parametrize("when", ["between", "inside"])
def test_a_partition_is_bounded_by_debug_timeout(tmp_path, when):
    """Every rank raises within the deadline, and (issue 19) the far side ends by itself:
    its MPI_Abort cannot reach mpiexec and returns, MPI_Finalize would wait forever, and
    mpibn's watchdog ends each process EXIT_GRACE s into its exit. Before: host2's ranks
    and proxy stayed until the harness's teardown killed them."""
    at = 4
    harness = train(tmp_path, "--fault", "partition", "--when", when, "--at", at,
                    "--debug-timeout", DEBUG_TIMEOUT, linger=30)
    cut = wait_for(tmp_path / "cut", harness)
    far_side = gone(harness, "host2", cut)
    rc = harness.wait(90)
    ended = harness.when("hosts.py: job exited with status")
    assert rc != 0, harness.output
    report = [f"partition {when}: job exit status {rc} {ended - cut:.2f} s after the cut, host2's last "
              f"process {'still there' if far_side is None else f'{far_side:.2f} s'} after it"]
    timed_out = set()
    for rank in range(4):
        stamp, message = (tmp_path / f"error-rank{rank}.txt").read_text().splitlines()[:2]
        after = float(stamp) - cut
        report.append(f"rank {rank}: {after:.2f} s: {message}")
        if check_stopped(message, rank, after):
            timed_out.add(rank)
        assert after < DEBUG_TIMEOUT + GRACE, message
        # No checkpoint of the failed step, or later; every earlier one complete.
        done = steps_done(tmp_path, rank)
        assert done == list(range(len(done))) and len(done) in (at, at + 1)
        if rank not in HOST2:        # host1 never finished the failed step
            assert len(done) == at
        check_checkpoints(tmp_path, rank, done)
    print("\n".join(report))
    assert timed_out & HOST2 and timed_out - HOST2, report      # each side saw the cut itself
    assert "teardown killed" not in harness.output, harness.output
    assert far_side is not None and far_side < DEBUG_TIMEOUT + GRACE + EXIT_GRACE + 3.0, report
    assert leftovers(harness.prefix) == []


@pytest.mark.timeout(150)
def test_a_program_that_carries_on_after_a_partition_ends_on_both_sides(tmp_path):
    """The ranks catch the error, run on (every later call raises GroupFailed at once) and
    then wait in a Barrier of their own, which cannot complete across the cut: the
    watchdog ends every process MPIBN_FAILSTOP_GRACE s after its group stopped."""
    grace = 6.0
    harness = train(tmp_path, "--fault", "partition", "--when", "inside", "--at", 3, "--steps", 6,
                    "--debug-timeout", DEBUG_TIMEOUT, "--catch", linger=30,
                    env={"MPIBN_FAILSTOP_GRACE": str(grace)})
    cut = wait_for(tmp_path / "cut", harness)
    far_side = gone(harness, "host2", cut)
    rc = harness.wait(90)
    near_side = harness.when("hosts.py: job exited with status") - cut
    print(f"carry on: job exit status {rc} {near_side:.2f} s after the cut, host2's last process "
          f"{'still there' if far_side is None else f'{far_side:.2f} s'} after it")
    assert rc != 0, harness.output
    assert "teardown killed" not in harness.output, harness.output
    bound = DEBUG_TIMEOUT + GRACE + grace + 3.0
    assert far_side is not None and far_side < bound and near_side < bound, harness.output
    for rank in range(4):
        log = (tmp_path / f"rank{rank}.log").read_text()
        assert "GroupFailed" in log and "waiting in a Barrier" in log and "done" not in log, log
    assert "this process ends in 6 s unless it constructs new layers" in harness.output
    assert leftovers(harness.prefix) == []


@pytest.mark.timeout(150)
@pytest.mark.parametrize("when", ["between", "inside"])
def test_a_flap_continues_with_correct_numbers(tmp_path, when):
    steps = 8
    harness = train(tmp_path, "--fault", "flap", "--when", when, "--at", 3, "--steps", steps)
    rc = harness.wait(100)
    assert rc == 0, harness.output
    logs = [(tmp_path / f"rank{rank}.log").read_text().splitlines() for rank in range(4)]
    for lines in logs:
        # Every step checked against the concatenated batch (hosts_train.py exits 2 otherwise).
        assert [line.split()[:3] for line in lines[:steps]] == [["step", str(k), "ok"] for k in range(steps)]
        assert lines[steps].startswith("done")
    # Bitwise the same statistics on every rank, every step.
    assert len({tuple(line.split()[-1] for line in lines[:steps]) for lines in logs}) == 1
    slow = max(float(lines[3].split()[4]) for lines in logs)
    print(f"flap {when}: all {steps} steps correct; the step with the flap took {slow:.1f} s")
    assert (tmp_path / "cut").exists()
    assert leftovers(harness.prefix) == []


@pytest.mark.timeout(150)
def test_a_flap_longer_than_the_deadline_fails_cleanly_on_every_rank(tmp_path):
    """debug_timeout=1 s against a 2 s flap inside a step: every rank raises
    CollectiveTimeout at step 3, none writes a checkpoint of it."""
    harness = train(tmp_path, "--fault", "flap", "--when", "inside", "--at", 3, "--steps", 8,
                    "--debug-timeout", 1)
    rc = harness.wait(100)
    assert rc != 0, harness.output
    for rank in range(4):
        message = (tmp_path / f"error-rank{rank}.txt").read_text().splitlines()[1]
        # Its own timeout, or a peer's stop notice that came first (fail-stop).
        assert message.startswith(("CollectiveTimeout: ", "GroupFailed: ")), message
        done = steps_done(tmp_path, rank)
        assert done in ([0, 1, 2], [0, 1, 2, 3]), done     # host2 may finish step 3's forward only
        check_checkpoints(tmp_path, rank, done)
    assert leftovers(harness.prefix) == []
