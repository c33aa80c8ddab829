"""Programs that catch an error and carry on (issue 19): they must end, on every rank.

Run: mpiexec -n 4 python -m mpi4py tests/scripts/failstop_job.py SCENARIO

  skip_backward   rank 1's loss is NaN at step 1: it skips that backward (continue)
  backward_twice  rank 1 calls backward twice at step 1
  skip_forward    rank 1 skips the forward of step 1 and calls backward alone
  late            debug_timeout=1; rank 0 is 2.5 s late for step 1's forward
  late_backward   debug_timeout=1; rank 0 is 2.5 s late for step 1's backward

Every rank runs 4 steps of "try forward, backward; except: print, continue" on
one layer (two layers for the first three, sharing the group), prints one
line per outcome ('rank r step s fwd|bwd: ok <seconds> <calls>' or
'... <Type> <seconds> <calls>: <message>', <calls> the group's Allreduce
count after the call) and at the end 'rank r done moving_mean=<hex>'.
"""
import os
import sys
import time

import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm

scenario = sys.argv[1]
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
late = scenario.startswith("late")
bn = SyncBatchNorm(3, debug_timeout=1.0 if late else None, dtype=np.float64).set_train()
other = SyncBatchNorm(3, dtype=np.float64).set_train() if not late else None


def say(text):
    os.write(1, f"rank {rank} {text}\n".encode())


def attempt(step, what, fn):
    started = time.monotonic()
    try:
        fn()
        say(f"step {step} {what}: ok {time.monotonic() - started:.3f} {bn.group_comm.allreduce_calls}")
        return True
    except Exception as exc:        # noqa: BLE001 - the program under test carries on
        message = str(exc).replace("\n", " ")
        say(f"step {step} {what}: {type(exc).__name__} {time.monotonic() - started:.3f} "
            f"{bn.group_comm.allreduce_calls}: {message}")
        return False


for step in range(4):
    x = np.random.default_rng(10 * step + rank).normal(2.0, 1.0, (4, 3))
    dy = np.random.default_rng(100 + 10 * step + rank).normal(size=x.shape)
    mine = rank == 1 and step == 1
    if scenario == "late" and rank == 0 and step == 1:
        time.sleep(2.5)
    if not (scenario == "skip_forward" and mine):
        if not attempt(step, "fwd", lambda: bn(x)):
            continue
    if scenario == "skip_backward" and mine:
        continue                                   # "the loss was NaN"
    if scenario == "late_backward" and rank == 0 and step == 1:
        time.sleep(2.5)
    attempt(step, "bwd", lambda: bn.backward(dy))
    if scenario == "backward_twice" and mine:
        attempt(step, "bwd", lambda: bn.backward(dy))
    if other is not None:
        attempt(step, "other", lambda: other(x))
say(f"done moving_mean={bn.moving_mean.data.tobytes().hex()}")
