"""A checked training job for network faults across emulated hosts.

    python scripts/hosts.py -- python -m mpi4py scripts/hosts_train.py --out DIR \\
        [--fault none|partition|flap] [--when between|inside] [--at STEP] [--debug-timeout S]

Run by ``tests/test_hosts_faults.py`` inside ``scripts/hosts.py``. Every
rank trains one ``SyncBatchNorm(4)`` over COMM_WORLD for ``--steps`` steps
on uneven shards (one rank empty each step) of a seeded global batch, and
checks each step's statistics against the concatenated batch, which every
rank recomputes itself (float64, two passes): a silent wrong result would
exit 2. After each completed step each rank saves its checkpoint
``DIR/rank<r>-step<k>.npz``. Progress goes to ``DIR/rank<r>.log`` (one
line per step, flushed), so the test can see how far each rank got.

Faults, made by the first rank of the last host on its own link ``eth0``
at step ``--at``:

* ``partition``: the link goes down and stays down;
* ``flap``: the link goes down for ``--down`` s (default 2), then up;
The cutting rank writes the time of the cut to ``DIR/cut``.

* ``when=between``: after every rank finished step at-1 (a Barrier);
  ``when=inside``: 0.2 s after that rank entered step ``at``'s forward
  Allreduce, while the other hosts' ranks are 0.5 s late to it.

The rank that raises writes the error and the seconds since the cut to
``DIR/error-rank<r>.txt`` and re-raises (``python -m mpi4py`` aborts). With
``--catch`` it carries on instead, as a program that skips bad steps does:
it tries the remaining steps (each raises GroupFailed at once: fail-stop)
and then waits in a Barrier over every rank, a collective of its own that
cannot complete across a partition, so only mpibn's watchdog
(``MPIBN_FAILSTOP_GRACE``) ends it.
``--fault kill`` makes no fault itself: the test kills the host from
outside after ``DIR/stamp`` appears (written at step ``--at``).
"""
import argparse
import os
import socket
import subprocess
import threading
import time
import traceback

import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm, save_checkpoint

C, SHAPE = 4, (3, 3)


def shards(step, size):
    """Uneven shard sizes, rank (step % size) empty."""
    sizes = [1 + (r + step) % 3 for r in range(size)]
    sizes[step % size] = 0
    return sizes


def reference(x):
    mean = x.mean(axis=(0, 2, 3))
    var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    return mean, var


def link(state):
    subprocess.run(["ip", "link", "set", "eth0", state], check=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--fault", default="none", choices=["none", "partition", "flap", "kill"])
    parser.add_argument("--when", default="between", choices=["between", "inside"])
    parser.add_argument("--at", type=int, default=4)
    parser.add_argument("--down", type=float, default=2.0)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between steps")
    parser.add_argument("--debug-timeout", type=float, default=None)
    parser.add_argument("--catch", action="store_true", help="carry on after an error (see above)")
    args = parser.parse_args()

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    host = socket.gethostname()
    hosts = world.allgather(host)
    cutter = rank == hosts.index(hosts[-1])            # first rank of the last host
    log = open(os.path.join(args.out, f"rank{rank}.log"), "w", buffering=1)
    bn = SyncBatchNorm(C, debug_timeout=args.debug_timeout, dtype=np.float64).set_train()
    cut_at = [None]

    def cut():
        cut_at[0] = time.time()
        link("down")
        with open(os.path.join(args.out, "cut"), "w") as f:
            f.write(repr(cut_at[0]))
        if args.fault == "flap":
            time.sleep(args.down)
            link("up")

    first = 0
    while first is not None:
        first = train(args, world, bn, log, first, cutter, hosts, cut, cut_at)
    bn.close()
    log.write(f"done {args.steps} steps on {host}\n")


def train(args, world, bn, log, first, cutter, hosts, cut, cut_at):
    """Steps ``first``.. of the job; None when done, else the step after a caught error."""
    rank, size, host = world.Get_rank(), world.Get_size(), socket.gethostname()
    step = first
    try:
        for step in range(first, args.steps):
            rng = np.random.default_rng(1000 + step)
            sizes = shards(step, size)
            x = rng.normal(3.0, 2.0, (sum(sizes), C, *SHAPE))
            dy = rng.normal(size=x.shape)
            lo = sum(sizes[:rank])
            mine = slice(lo, lo + sizes[rank])
            started = time.time()
            faulty = step == args.at and args.fault in ("partition", "flap")
            if step == args.at and rank == 0:
                with open(os.path.join(args.out, "stamp"), "w") as f:
                    f.write(repr(time.time()))
            if faulty and args.when == "between":
                world.Barrier()
                if cutter:
                    cut_thread = threading.Thread(target=cut)
                    cut_thread.start()
                    while cut_at[0] is None:
                        time.sleep(0.001)
                    time.sleep(0.05)
            if faulty and args.when == "inside":
                if cutter:
                    threading.Timer(0.2, cut).start()
                elif host != hosts[-1]:
                    time.sleep(0.5)
            bn(x[mine])
            bn.backward(dy[mine])
            mean, var = reference(x)
            err = max(np.abs(bn.batch_mean - mean).max() / np.abs(mean).max(),
                      np.abs(bn.batch_var - var).max() / var.max())
            if not err < 1e-12:
                log.write(f"WRONG step {step}: relative error {err:.3g}\n")
                world.Abort(2)
            save_checkpoint(bn, os.path.join(args.out, f"rank{rank}-step{step}.npz"), rank=None)
            log.write(f"step {step} ok {err:.2e} {time.time() - started:.2f} s "
                      f"{bn.batch_mean.tobytes().hex()}\n")
            time.sleep(args.pause)
    except Exception as exc:
        if not os.path.exists(os.path.join(args.out, f"error-rank{rank}.txt")):
            with open(os.path.join(args.out, f"error-rank{rank}.txt"), "w") as f:
                f.write(f"{time.time()}\n{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        log.write(f"error at step {step}: {type(exc).__name__}: {exc}\n")
        if not args.catch:
            raise
        if step + 1 < args.steps:
            return step + 1
        log.write("waiting in a Barrier\n")
        world.Barrier()                   # never completes across a partition
    return None


if __name__ == "__main__":
    main()
