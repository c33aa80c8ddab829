"""Emulated hosts (``scripts/hosts.py``): isolation, traffic on the links,
teardown, and mpibn across hosts (issue 14, parts 1 and 2).

Marker ``system``: run serially with ``pytest -m system`` (as root). Each
test starts its own ``hosts.py`` and is bounded by a timeout.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import hosts_support as hs
from hosts_support import Harness, leftovers, root_links, run, wait_for_no_leftovers

PY = sys.executable
MB16 = 16 * 1024 * 1024


pytestmark = hs.marks


@pytest.mark.timeout(60)
def test_refuses_clearly_without_capabilities():
    """Without CAP_NET_ADMIN and CAP_SYS_ADMIN: exit 77 and a message naming them."""
    cmd = [PY, hs.HOSTS, "--", "true"]
    message = "hosts.py: cannot emulate hosts: needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN"
    if not hs.AVAILABLE:               # this machine: the reason it gave
        message = hs.REASON
    elif os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop capabilities")
        # Root without the two capabilities in its bounding set loses them at exec.
        cmd = ["setpriv", "--bounding-set", "-net_admin,-sys_admin", "--inh-caps", "-all", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert done.returncode == hs.UNAVAILABLE, done
    assert message in done.stderr and message.startswith("hosts.py: cannot emulate hosts: ")
    assert not any(n.startswith("mpibn-") and "probe" in n for n in
                   subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())



@hs.needs_hosts
@pytest.mark.timeout(120)
def test_traffic_crosses_the_links_and_a_cut_stops_it(tmp_path):
    """The proof the issue asks for: the links' byte counters.

    A 16 MB Allreduce over all ranks moves >= 16 MB each way over every
    host's link; the same Allreduce within one host moves nothing over it
    (shared memory); with the last host's link down the Allreduce does not
    complete and no link carries more than a trickle; back up, it completes
    with the right sum.
    """
    before = root_links()
    out = tmp_path / "traffic.json"
    rc, text, prefix = run([PY, "-m", "mpi4py", "scripts/hosts_traffic.py", "--out", out],
                           "--hosts", 2, "--per-host", 2, timeout=100)
    assert rc == 0, text
    report = json.loads(out.read_text())
    print(json.dumps(report))
    assert [h for h, *_ in report["world"]] == ["host1", "host1", "host2", "host2"]
    for host, rx, tx, correct in report["world"]:
        assert correct and rx >= MB16 and tx >= MB16, (host, rx, tx)
    for host, rx, tx, correct in report["local"]:
        assert correct and rx < 64 * 1024 and tx < 64 * 1024, (host, rx, tx)
    for rank in report["cut"]:
        assert not rank["done_during_cut"], rank
        assert rank["rx_during"] < 16 * 1024 and rank["tx_during"] < 16 * 1024, rank
        assert rank["rx_after"] >= MB16 and rank["correct"], rank
    assert report["cut_host"] == "host2"
    assert leftovers(prefix) == []
    assert root_links() == before           # nothing was added to the machine's own namespace


@hs.needs_hosts
@pytest.mark.timeout(60)
def test_exit_status_is_passed_through():
    rc, text, prefix = run(["sh", "-c", "exit 3"], timeout=50)
    assert rc == 3, text
    assert "hosts.py: job exited with status 3" in text
    assert leftovers(prefix) == []


@hs.needs_hosts
@pytest.mark.timeout(60)
def test_hostnames_and_isolation():
    """Own hostname per host; PID and /dev/shm private to the host."""
    probe = ("import os, socket; from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "open(f'/dev/shm/mpibn-probe-{c.rank}', 'w').close(); c.Barrier(); "
             "line = ' '.join(map(str, ('rank', c.rank, socket.gethostname(), os.getpid() < 100, "
             "sorted(f for f in os.listdir('/dev/shm') if f.startswith('mpibn-probe'))))); "
             # one writer: four ranks printing to one pipe can run their lines together
             "lines = c.gather(line); c.rank or print(*lines, sep='\\n', flush=True); "
             "c.Barrier(); os.remove(f'/dev/shm/mpibn-probe-{c.rank}')")
    rc, text, prefix = run([PY, "-m", "mpi4py", "-c", probe], timeout=50)
    assert rc == 0, text
    lines = sorted(line.split() for line in text.splitlines() if line.startswith("rank "))
    assert lines == [["rank", "0", "host1", "True", "['mpibn-probe-0',", "'mpibn-probe-1']"],
                     ["rank", "1", "host1", "True", "['mpibn-probe-0',", "'mpibn-probe-1']"],
                     ["rank", "2", "host2", "True", "['mpibn-probe-2',", "'mpibn-probe-3']"],
                     ["rank", "3", "host2", "True", "['mpibn-probe-2',", "'mpibn-probe-3']"]], text
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("mpibn-probe")]
    assert leftovers(prefix) == []


@hs.needs_hosts
@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_tears_everything_down(sig, status):
    before = root_links()
    harness = Harness(["sleep", "60"])
    end = time.monotonic() + 60
    while len(harness.pids("host2")) < 2 and time.monotonic() < end:
        time.sleep(0.1)
    assert harness.pids("host2"), harness.output
    assert leftovers(harness.prefix)          # there is something to tear down
    harness.proc.send_signal(sig)
    assert harness.wait(30) == status, harness.output
    assert leftovers(harness.prefix) == []
    assert root_links() == before


@hs.needs_hosts
@pytest.mark.timeout(90)
def test_sigkill_of_the_harness_is_cleaned_up_by_its_watchdog():
    harness = Harness(["sleep", "60"])
    end = time.monotonic() + 60
    while len(harness.pids("host2")) < 2 and time.monotonic() < end:
        time.sleep(0.1)
    assert harness.pids("host2"), harness.output
    harness.proc.kill()
    harness.proc.wait()
    assert wait_for_no_leftovers(harness.prefix, timeout=15) == []


@hs.needs_hosts
@pytest.mark.timeout(90)
def test_stale_namespaces_of_dead_runs_are_removed_and_live_ones_kept():
    dead = subprocess.Popen(["true"])
    dead.wait()                                   # its pid is now free (not reused this fast)
    stale, alive = f"mpibn-{dead.pid}-sw", f"mpibn-{os.getpid()}-keep"
    for name in (stale, alive):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        rc, text, prefix = run(["true"], timeout=60)
        assert rc == 0, text
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        assert stale not in names and alive in names, names
        assert f"removing mpibn-{dead.pid}-* left by a run that is gone" in text
    finally:
        for name in (stale, alive):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@hs.needs_hosts
@pytest.mark.timeout(120)
def test_groups_within_and_across_hosts_equal_one_host_bitwise(tmp_path):
    """Groups inside one host, spanning hosts, a rank alone, uneven and empty
    shards, default and exact mode: every array bitwise equal to the same
    4 ranks on one host."""
    across, one = tmp_path / "across", tmp_path / "one"
    across.mkdir(), one.mkdir()
    rc, text, prefix = run([PY, "-m", "mpi4py", "scripts/hosts_groups.py", "--out", across], timeout=100)
    assert rc == 0, text
    single = subprocess.run([os.path.join(os.path.dirname(PY), "mpiexec"), "-n", "4", PY, "-m", "mpi4py",
                             "scripts/hosts_groups.py", "--out", str(one)], cwd=hs.ROOT, env=hs.clean_env(),
                            capture_output=True, text=True, timeout=100)
    assert single.returncode == 0, single.stdout + single.stderr
    for rank in range(4):
        assert (across / f"rank{rank}.host").read_text() == ("host1" if rank < 2 else "host2")
        a, b = np.load(across / f"rank{rank}.npz"), np.load(one / f"rank{rank}.npz")
        assert sorted(a.files) == sorted(b.files) and len(a.files) == 90
        differ = [k for k in a.files if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
        assert differ == [], (rank, differ)
    assert leftovers(prefix) == []


@hs.needs_hosts
@pytest.mark.timeout(240)
def test_demo_and_golden_across_hosts(tmp_path):
    """``python -m mpibn demo`` and ``golden`` under mpiexec across hosts; the
    golden files are byte for byte those of one host."""
    rc, text, prefix = run([PY, "-m", "mpi4py", "-m", "mpibn", "demo"], timeout=100)
    assert rc == 0, text
    assert "SyncBatchNorm over 4 ranks" in text
    assert "synced statistics, y and dx equal the concatenated batch's (to 1e-12 x max|x|/std" in text
    assert leftovers(prefix) == []
    rc, text, prefix = run([PY, "-m", "mpi4py", "-m", "mpibn", "golden", "--out", tmp_path / "hosts"],
                           timeout=100)
    assert rc == 0, text
    single = subprocess.run([PY, "-m", "mpibn", "golden", "--out", str(tmp_path / "one")], cwd=hs.ROOT,
                            env=hs.clean_env(), capture_output=True, text=True, timeout=100)
    assert single.returncode == 0, single.stdout + single.stderr
    files = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) > 10
    assert files == sorted(str(p.relative_to(tmp_path / "hosts"))
                           for p in (tmp_path / "hosts").rglob("*") if p.is_file())
    differ = [f for f in files if (tmp_path / "one" / f).read_bytes() != (tmp_path / "hosts" / f).read_bytes()]
    assert differ == []
    assert leftovers(prefix) == []


# Per-process, not per-host: MPICH's pool of communicator contexts. 100 s
# here; it passed across hosts in the full-suite run of docs/hosts.md.
SINGLE_HOST_ONLY = "tests/test_resources.py::test_many_layers_with_distinct_groupings_do_not_run_out_of_contexts"


@hs.needs_hosts
@pytest.mark.timeout(400)
def test_mpi_suite_across_hosts():
    """The MPI-marked tests (the ones that communicate over COMM_WORLD) on
    2 hosts x 2 ranks: ranks 0, 1 on host1, 2, 3 on host2, over TCP."""
    rc, text, prefix = run([PY, "-m", "mpi4py", "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider",
                            "-m", "mpi", "--deselect", SINGLE_HOST_ONLY], timeout=380)
    assert rc == 0, text[-5000:]
    # Four ranks write to one pipe: two summaries can share a line, so count
    # them in the whole text rather than line by line.
    summaries = re.findall(r"\d+ passed[^=\n]*? in [\d.]+s", text)
    assert len(summaries) == 4, text[-5000:]
    assert re.findall(r"\d+ (?:failed|errors?)\b", text) == [], text[-5000:]
    print(summaries[0])
    assert leftovers(prefix) == []
