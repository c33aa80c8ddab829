#!/usr/bin/env python3
"""Emulated hosts on one Linux machine: run an MPI job across K "hosts".

    python scripts/hosts.py --hosts 2 --per-host 2 -- python -m mpi4py prog.py

Each host is a network namespace (``mpibn-<pid>-h<i>``) with one veth link
``eth0`` to a bridge; the bridge, and ``mpiexec`` itself, live in one more
namespace of their own (``mpibn-<pid>-sw``, the "switch"). Every process of
a host runs in that host's network namespace and in fresh UTS (hostname
``host<i>``), IPC, mount (a private ``/dev/shm``) and PID namespaces, so the
ranks of two hosts cannot share memory: they talk over TCP across the links
(``UCX_TLS=tcp,self``, set unless the caller set it), and ranks of one host
use MPICH's shared memory as on a real node.

``mpiexec`` (Hydra) starts one proxy per host through
``-launcher ssh -launcher-exec <script>``; Hydra calls the script as
``<script> [ssh flags] <host> <command...>``, like ssh, and the script
runs the command inside that host's namespaces. ``-localhost <bridge
address>`` makes the proxies call mpiexec back on the bridge.

Nothing is created in the machine's own network namespace, so no existing
interface is touched: the bridge and every link live in namespaces this
run created, and deleting those namespaces deletes them. Teardown (kill
every process in our namespaces, delete them, remove their /etc/netns
files) runs when the job ends, fails, times out, on Ctrl-C, SIGTERM and
SIGHUP; a watchdog process runs it when the harness itself is SIGKILLed
(it waits for EOF on a pipe only the harness holds); and every start first
removes ``mpibn-<pid>-*`` namespaces whose pid is no longer alive.

The job sees, in its environment: ``MPIBN_HOSTS_PREFIX`` (namespace
prefix), ``MPIBN_HOSTS`` (K), ``MPIBN_HOSTS_PER_HOST``; a rank reads its
host's link counters in ``/sys/class/net/eth0/statistics`` and may cut its
own link (``ip link set eth0 down``), as the fault tests do.

Exit status: the job's (128 + signal when mpiexec was killed by one), 124
when ``--timeout`` expired, 130/143 on SIGINT/SIGTERM, and 77 (printed
reason) when the machine cannot emulate hosts: needs root, or
CAP_NET_ADMIN and CAP_SYS_ADMIN, and the ``ip`` (iproute2) and ``unshare``
(util-linux) commands. ``--check`` only tests that (exit 0 or 77).
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

UNAVAILABLE = 77                 # exit status: this machine cannot emulate hosts
LINGER = 3.0                     # seconds the hosts' processes get to end after mpiexec
PREFIX_RE = re.compile(r"^mpibn-(\d+)-")
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
ETC_NETNS = "/etc/netns"

LAUNCHER = r"""#!/bin/sh
# Hydra's ssh launcher calls: <this script> [ssh flags] <host> <command...>
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
host=$1; shift
case $host in host[0-9]*) ;; *) echo "hosts.py launcher: unknown host '$host'" >&2; exit 255 ;; esac
# ssh joins the remote command with spaces and hands it to a shell: so do we.
exec ip netns exec "@PREFIX@-$host" unshare --uts --ipc --mount --pid --fork --kill-child \
    --propagation private sh -c 'printf %s "$1" > /proc/sys/kernel/hostname && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec sh -c "$2"' \
    sh "$host" "$*"
"""


def why_unavailable():
    """None when hosts can be emulated here, else the reason (one line)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    missing = [c for c in ("ip", "unshare", "mount") if shutil.which(c) is None]
    if missing:
        return (f"missing command(s) {', '.join(missing)} (Debian packages iproute2, util-linux, mount)")
    caps = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    lacking = [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
               if not caps >> bit & 1]
    if lacking:
        return f"needs root, or {' and '.join(lacking)} (effective capabilities here: {caps:#x})"
    probe = f"mpibn-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: ip netns add: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ours(prefix):
    """Namespaces named ``<prefix>-*`` (this run's, or a dead run's)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0].startswith(prefix + "-")]


def pids_in(ns):
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def teardown(prefix, grace=5.0, verbose=False):
    """Kill every process in our namespaces, then delete them and their files.

    Returns the number of processes that were still alive and had to be killed.
    """
    names = ours(prefix)
    killed = 0
    for ns in names:
        for pid in pids_in(ns):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    what = f.read().replace(b"\0", b" ").decode(errors="replace")[:100]
                os.kill(pid, signal.SIGKILL)
                killed += 1
                if verbose:
                    print(f"hosts.py: killed {pid} in {ns}: {what}", file=sys.stderr, flush=True)
            except (ProcessLookupError, FileNotFoundError):
                pass
    end = time.monotonic() + grace
    while any(pids_in(ns) for ns in names) and time.monotonic() < end:
        time.sleep(0.05)
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for name in os.listdir(ETC_NETNS) if os.path.isdir(ETC_NETNS) else []:
        if name.startswith(prefix + "-"):
            shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)
    return killed


def reap_stale():
    """Remove namespaces ``mpibn-<pid>-*`` left by runs whose pid is dead."""
    dead = set()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    etc = os.listdir(ETC_NETNS) if os.path.isdir(ETC_NETNS) else []
    for name in names + etc:
        m = PREFIX_RE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            dead.add(f"mpibn-{m.group(1)}")
    for prefix in sorted(dead):
        print(f"hosts.py: removing {prefix}-* left by a run that is gone", file=sys.stderr)
        teardown(prefix)


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def build(prefix, hosts, subnet):
    """The switch namespace with its bridge, and one namespace per host."""
    sw = f"{prefix}-sw"
    bridge_ip = f"{subnet}.1"
    names = {f"host{i}": f"{subnet}.{10 + i}" for i in range(1, hosts + 1)}
    etc_hosts = "127.0.0.1 localhost\n" + f"{bridge_ip} launcher\n" + \
        "".join(f"{ip} {name}\n" for name, ip in names.items())
    sh("ip", "netns", "add", sw)
    sh("ip", "-n", sw, "link", "set", "lo", "up")
    sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", sw, "addr", "add", f"{bridge_ip}/24", "dev", "br0")
    sh("ip", "-n", sw, "link", "set", "br0", "up")
    for i, (name, ip) in enumerate(names.items(), 1):
        ns = f"{prefix}-{name}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Created inside our namespaces: the veth never exists in the machine's.
        sh("ip", "-n", sw, "link", "add", f"vh{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", sw, "link", "set", f"vh{i}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
    for ns in [sw] + [f"{prefix}-{n}" for n in names]:
        # ip netns exec bind-mounts /etc/netns/<ns>/hosts over /etc/hosts.
        os.makedirs(os.path.join(ETC_NETNS, ns), exist_ok=True)
        with open(os.path.join(ETC_NETNS, ns, "hosts"), "w") as f:
            f.write(etc_hosts)
    return sw, bridge_ip, list(names)


def find_mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


def start_watchdog(prefix):
    """A process that tears down ``prefix`` when this one dies, however it dies."""
    read_end, write_end = os.pipe()
    watchdog = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--watchdog", prefix],
                                stdin=read_end, start_new_session=True)
    os.close(read_end)
    return watchdog, write_end


def watchdog_main(prefix):
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sys.stdin.buffer.read()          # EOF: the harness closed the pipe or died
    teardown(prefix)


class Stop(Exception):
    def __init__(self, signum):
        self.signum = signum


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] -- command ...")
    parser.add_argument("--hosts", type=int, default=2, help="number of emulated hosts K (default 2)")
    parser.add_argument("--per-host", type=int, default=2, help="ranks per host (default 2)")
    parser.add_argument("--subnet", default="10.147.0",
                        help="first three octets of the hosts' /24 (private to our namespaces)")
    parser.add_argument("--timeout", type=float, default=None, help="kill the job after this many s (exit 124)")
    parser.add_argument("--linger", type=float, default=LINGER,
                        help=f"seconds the hosts' processes get to end by themselves after mpiexec ends, "
                             f"before teardown kills them (default {LINGER:g})")
    parser.add_argument("--check", action="store_true", help="exit 0 if hosts can be emulated here, else 77")
    parser.add_argument("--watchdog", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.watchdog:
        return watchdog_main(args.watchdog)
    reason = why_unavailable()
    if reason:
        print(f"hosts.py: cannot emulate hosts: {reason}", file=sys.stderr)
        return UNAVAILABLE
    if args.check:
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.hosts < 1 or args.per_host < 1:
        parser.error(f"--hosts and --per-host must be >= 1, got {args.hosts} and {args.per_host}")
    if not args.linger >= 0:
        parser.error(f"--linger must be >= 0, got {args.linger}")
    if not re.fullmatch(r"10\.\d{1,3}\.\d{1,3}", args.subnet):
        parser.error(f"--subnet must look like 10.X.Y, got {args.subnet!r}")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        print("hosts.py: no mpiexec found (pip install 'mpibn[mpich]')", file=sys.stderr)
        return UNAVAILABLE

    prefix = f"mpibn-{os.getpid()}"
    reap_stale()
    watchdog, lifeline = start_watchdog(prefix)

    def stop(signum, frame):
        raise Stop(signum)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    tmp = tempfile.mkdtemp(prefix=prefix + "-")
    job = None
    try:
        sw, bridge_ip, names = build(prefix, args.hosts, args.subnet)
        launcher = os.path.join(tmp, "launch")
        with open(launcher, "w") as f:
            f.write(LAUNCHER.replace("@PREFIX@", prefix))
        os.chmod(launcher, 0o755)
        hostfile = os.path.join(tmp, "hostfile")
        with open(hostfile, "w") as f:
            f.write("".join(f"{n}:{args.per_host}\n" for n in names))
        env = dict(os.environ, MPIBN_HOSTS_PREFIX=prefix, MPIBN_HOSTS=str(args.hosts),
                   MPIBN_HOSTS_PER_HOST=str(args.per_host))
        env.setdefault("UCX_TLS", "tcp,self")
        cmd = ["ip", "netns", "exec", sw, mpiexec, "-launcher", "ssh", "-launcher-exec", launcher,
               "-f", hostfile, "-localhost", bridge_ip, "-n", str(args.hosts * args.per_host), *command]
        print(f"hosts.py: {args.hosts} hosts x {args.per_host} ranks on {args.subnet}.0/24: "
              + shlex.join(command), file=sys.stderr, flush=True)
        job = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            rc = job.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"hosts.py: job still running after {args.timeout} s; killed", file=sys.stderr)
            rc = 124
        rc = 128 - rc if rc < 0 else rc
        print(f"hosts.py: job exited with status {rc}", file=sys.stderr, flush=True)
        # mpiexec is gone; its proxies end their ranks when they notice. Give them
        # a moment, so that "teardown killed" below means a process really stayed.
        end = time.monotonic() + args.linger
        while any(pids_in(ns) for ns in ours(prefix)) and time.monotonic() < end:
            time.sleep(0.05)
        return rc
    except Stop as stopped:
        print(f"hosts.py: {signal.Signals(stopped.signum).name}; tearing down", file=sys.stderr)
        return 128 + stopped.signum
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if job is not None and job.poll() is None:
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = teardown(prefix, verbose=True)
        if left:
            print(f"hosts.py: teardown killed {left} process(es) still running in the hosts",
                  file=sys.stderr, flush=True)
        if job is not None:
            job.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lifeline)
        watchdog.wait()


if __name__ == "__main__":
    sys.exit(main())
