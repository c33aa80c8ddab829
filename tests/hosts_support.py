"""Running ``scripts/hosts.py`` from tests: start, watch, bound, check teardown.

The emulated-host tests (marker ``system``) need root, or CAP_NET_ADMIN and
CAP_SYS_ADMIN, plus ``ip`` and ``unshare``; ``hosts.py --check`` says
whether this machine has them, and the tests skip with its message when
not. They launch their own mpiexec, so they skip under ``mpiexec ...
--with-mpi`` too (they run in the serial ``pytest -m system`` stage).
"""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from mpi4py import MPI

from mpibn.cli.launch import _RANK_VARIABLES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = os.path.join(ROOT, "scripts", "hosts.py")
UNAVAILABLE = 77


def check():
    """(True, '') when hosts can be emulated here, else (False, reason)."""
    done = subprocess.run([sys.executable, HOSTS, "--check"], capture_output=True, text=True)
    return done.returncode == 0, done.stderr.strip()


AVAILABLE, REASON = check() if MPI.COMM_WORLD.Get_size() == 1 else (False, "")

# Every emulated-host test: marker system, and not under mpiexec.
marks = [pytest.mark.system,
         pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1,
                            reason="launches its own mpiexec; runs in the serial pytest -m system stage")]
needs_hosts = pytest.mark.skipif(not AVAILABLE, reason=REASON)


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES and not k.startswith("PMI")}
    env.update(extra)
    return env


class Harness:
    """``hosts.py`` running in the background; its output lines with arrival times."""

    def __init__(self, command, *options, env=None):
        cmd = [sys.executable, HOSTS, *map(str, options), "--", *map(str, command)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT, env=env or clean_env(), start_new_session=True)
        self.prefix = f"mpibn-{self.proc.pid}"
        self.lines = []           # (time.time(), line)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    @property
    def output(self):
        return "".join(line for _, line in self.lines)

    def when(self, text):
        """time.time() of the first output line containing ``text``, or None."""
        return next((t for t, line in self.lines if text in line), None)

    def wait(self, timeout):
        """Exit status; a harness still running after ``timeout`` s is a hang: it is
        stopped (SIGTERM: it tears down) and the test fails."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.reader.join(5)
            pytest.fail(f"hang: hosts.py still running after {timeout} s\n{self.output}")
        self.reader.join(10)
        return rc

    def pids(self, host):
        """Processes now running in ``host``'s namespace (e.g. 'host2')."""
        out = subprocess.run(["ip", "netns", "pids", f"{self.prefix}-{host}"],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


def run(command, *options, timeout=120):
    harness = Harness(command, *options)
    rc = harness.wait(timeout)
    return rc, harness.output, harness.prefix


def root_links():
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def leftovers(prefix):
    """Everything of the run ``prefix`` still on the machine (must be empty)."""
    found = []
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    found += [f"namespace {n}" for n in names if n.startswith(prefix + "-")]
    if os.path.isdir("/etc/netns"):
        found += [f"/etc/netns/{n}" for n in os.listdir("/etc/netns") if n.startswith(prefix + "-")]
    marker = f"MPIBN_HOSTS_PREFIX={prefix}\0".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker in env or f"--watchdog\0{prefix}\0".encode() in cmdline:
            what = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"process {pid}: {what}")
    return found


def wait_for_no_leftovers(prefix, timeout=10.0):
    end = time.monotonic() + timeout
    while leftovers(prefix) and time.monotonic() < end:
        time.sleep(0.1)
    return leftovers(prefix)
