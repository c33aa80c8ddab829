"""Do the emulated hosts really talk over their links? Byte counters say.

    python scripts/hosts.py --hosts 2 --per-host 2 -- python -m mpi4py scripts/hosts_traffic.py --out t.json

Run by ``tests/test_hosts.py`` inside ``scripts/hosts.py`` (K hosts, the
same number of ranks on each). Each rank reads its host's link counters
(``/sys/class/net/eth0/statistics/{rx,tx}_bytes``; inside the host's
network namespace that is the host's own link) around three phases:

1. ``world``: a 16 MB float64 Allreduce over every rank. Every host must
   see megabytes cross its link.
2. ``local``: the same Allreduce within each host only (a communicator of
   the host's ranks). It must go through shared memory: the link stays
   quiet.
3. ``cut``: the last host sets its own link down, every rank starts the
   world Allreduce and polls it for ``--cut`` seconds: it must not
   complete, and no link may carry more than a trickle. Then the link
   comes back up, the Allreduce completes (TCP retransmits), and its sum
   must be right.

Rank 0 writes the counters, times and checks to ``--out`` (JSON).
"""
import argparse
import json
import socket
import subprocess
import time

import numpy as np
from mpi4py import MPI

LINK = "/sys/class/net/eth0/statistics/"
N = 2 * 1024 * 1024          # 16 MB of float64


def counters():
    return [int(open(LINK + name).read()) for name in ("rx_bytes", "tx_bytes")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cut", type=float, default=3.0, help="seconds the link stays down")
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    host = socket.gethostname()
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)   # the ranks of my host
    hosts = world.allgather(host)
    last_host = hosts[-1]
    expected = size * (size + 1) / 2.0          # sum over ranks of (rank + 1)
    report = {}

    def phase(name, comm):
        buf = np.full(N, rank + 1.0)
        world.Barrier()
        before = counters()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        world.Barrier()
        after = counters()
        want = expected if comm is world else float(sum(r + 1 for r in range(size) if hosts[r] == host))
        report[name] = world.gather((host, after[0] - before[0], after[1] - before[1],
                                     bool((buf == want).all())), root=0)

    phase("world", world)
    phase("local", local)

    # The cut: agree on a time, the last host's first rank downs its link.
    t0 = world.bcast(time.time() + 0.5, root=0)
    cutter = host == last_host and local.Get_rank() == 0
    time.sleep(max(0.0, t0 - time.time()))
    if cutter:
        subprocess.run(["ip", "link", "set", "eth0", "down"], check=True)
    time.sleep(0.3)
    buf = np.full(N, rank + 1.0)
    before = counters()
    request = world.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    done_during_cut = False
    while time.time() < t0 + args.cut:
        done_during_cut = done_during_cut or request.Test()
        time.sleep(0.01)
    during = counters()
    if cutter:
        subprocess.run(["ip", "link", "set", "eth0", "up"], check=True)
    up = time.time()
    request.Wait()
    resumed = time.time() - up
    after = counters()
    report["cut"] = world.gather(dict(host=host, done_during_cut=done_during_cut,
                                      rx_during=during[0] - before[0], tx_during=during[1] - before[1],
                                      rx_after=after[0] - during[0], tx_after=after[1] - during[1],
                                      seconds_to_resume=resumed, correct=bool((buf == expected).all())),
                                 root=0)
    local.Free()
    if rank == 0:
        report["cut_host"] = last_host
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
