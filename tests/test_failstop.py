"""Issue 19: fail-stop. Programs that catch an error and carry on end, on every rank.

Each test runs ``tests/scripts/failstop_job.py SCENARIO`` under its own
``mpiexec -n 4`` with a bounded timeout (a hang is a failure) from the
serial session, and reads every rank's outcome of every call.

Before the fix (c2ef9e9): skip_backward, backward_twice and skip_forward
hung (ranks 0, 2, 3 waited forever in a collective rank 1 never made);
late and late_backward ended, but rank 0 completed the calls its peers had
given up on and its moving mean differed from theirs.
"""
import os
import re
import subprocess
import sys

import pytest
from mpi4py import MPI

from mpibn.cli.launch import _RANK_VARIABLES, find_mpiexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "tests", "scripts", "failstop_job.py")
pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own mpiexec")
LINE = re.compile(r"rank (\d) step (\d) (fwd|bwd|other): (\w+) ([\d.]+) (\d+)(?:: (.*))?$")


def job(scenario, timeout=90):
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES and not k.startswith("PMI")}
    try:
        out = subprocess.run([find_mpiexec(), "-n", "4", sys.executable, "-m", "mpi4py", JOB, scenario],
                             capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hang: {scenario} still running after {timeout} s\n{exc.stdout}\n{exc.stderr}")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    calls = {r: [] for r in range(4)}       # rank -> [(step, what, outcome, seconds, allreduces, message)]
    done = {}
    for line in out.stdout.splitlines():
        m = LINE.match(line)
        if m:
            calls[int(m[1])].append((int(m[2]), m[3], m[4], float(m[5]), int(m[6]), m[7] or ""))
        elif line.endswith("=") or "done moving_mean=" in line:
            rank, hexed = re.match(r"rank (\d) done moving_mean=(\w+)", line).groups()
            done[int(rank)] = hexed
    assert sorted(done) == [0, 1, 2, 3], text          # every rank got to the end
    return calls, done, text


def after_first_failure(calls):
    """(first failure, every later outcome) of one rank."""
    failed = [i for i, c in enumerate(calls) if c[2] != "ok"]
    assert failed, calls
    return calls[failed[0]], calls[failed[0] + 1:]


def check_stopped(calls, done, first_type, says):
    for rank, mine in calls.items():
        first, later = after_first_failure(mine)
        assert first[2] == first_type and says in first[5], first
        assert "this error stops the group (fail-stop)" in first[5], first
        assert later, mine                          # it carried on, and every later call ...
        for step, what, outcome, seconds, allreduces, message in later:
            assert outcome == "GroupFailed", (rank, step, what, message)
            assert seconds < 0.05, (rank, step, what, seconds)          # ... raised at once,
            assert allreduces == first[4], (rank, step, what)          # ... without a collective,
            assert f"First failure seen by rank {rank}: {first_type}" in message, message
            assert "restore every rank from the last checkpoint" in message, message
    assert len(set(done.values())) == 1, done       # the same moving statistics on every rank


@pytest.mark.timeout(150)
@pytest.mark.parametrize("scenario, says", [
    ("skip_backward", "ranks are in different layer calls"),
    ("backward_twice", "backward() was called twice for one forward()"),
    ("skip_forward", "backward() was called twice for one forward()"),
])
def test_a_rank_out_of_step_stops_the_group_and_the_program_ends(scenario, says):
    calls, done, text = job(scenario)
    check_stopped(calls, done, "RuntimeError", says)
    # The second layer shares the group's communicator: it stops too.
    assert any(what == "other" and outcome == "GroupFailed"
               for mine in calls.values() for _, what, outcome, *_ in mine), text


@pytest.mark.timeout(150)
@pytest.mark.parametrize("scenario, where", [("late", "fwd"), ("late_backward", "bwd")])
def test_a_late_rank_stops_before_it_completes_the_call_its_peers_gave_up(scenario, where):
    calls, done, text = job(scenario)
    for rank in (1, 2, 3):
        first, _ = after_first_failure(calls[rank])
        assert (first[0], first[1], first[2]) == (1, where, "CollectiveTimeout"), first
        assert 0.9 < first[3] < 2.5 and "never arrived: [0]" in first[5], first
    first, later = after_first_failure(calls[0])
    # Rank 0 arrives 2.5 s late: it must not complete that call, and says who gave up.
    assert (first[0], first[1], first[2]) == (1, where, "GroupFailed"), first
    assert re.search(r"rank [123] stopped the group: its collective timed out \(debug_timeout\) in "
                     rf"layer 1 {'forward' if where == 'fwd' else 'backward'} call 2", first[5]), first
    assert first[3] < 0.5, first                    # found the notice, did not wait for a deadline
    for step, what, outcome, seconds, allreduces, message in later:
        assert outcome == "GroupFailed" and seconds < 0.05 and allreduces == first[4], later
    # No step after the peers gave up: the moving statistics are the same everywhere.
    assert len(set(done.values())) == 1, text
    assert "this process ends in 60 s unless it constructs new layers" in text, text
