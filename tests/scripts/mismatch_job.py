"""Misuse across ranks that used to mix steps, hang or abort the job (issue 10).

Run: mpiexec -n 4 python -m mpi4py tests/scripts/mismatch_job.py SCENARIO

  eval_step1          rank 0 forgets set_train(True) for step 1 of 2 (its eval
                      forward makes no collective); lockstep comes from the
                      environment (MPIBN_LOCKSTEP), as a user would switch it on
  stateless_channels  sync_batch_norm with C = 5 on rank 1 and C = 4 elsewhere

Each rank prints one line per call it made: 'rank r step s: ok ...' or
'rank r step s: <Type>: <message>', written in one call so lines never mix.
"""
import os
import sys

import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn.comm import group_comm_for
from mpibn.sync import sync_batch_norm

comm = MPI.COMM_WORLD
rank = comm.Get_rank()


def say(step, text):
    os.write(1, f"rank {rank} step {step}: {text}\n".encode())


def eval_step1():
    bn = SyncBatchNorm(3)
    for step in (1, 2):
        bn.set_train(not (rank == 0 and step == 1))       # rank 0 forgot set_train(True)
        x = np.random.default_rng(10 * step + rank).normal(step, 1.0, (4, 3)).astype(np.float32)
        try:
            bn(x)
            bn.backward(np.ones_like(x))
        except Exception as exc:     # noqa: BLE001 - printed for the test to read
            say(step, f"{type(exc).__name__}: {exc}")
            return
        say(step, f"ok training={bn.training} mean={'-' if bn.batch_mean is None else bn.batch_mean[0]!r}")


def stateless_channels():
    channels = 5 if rank == 1 else 4
    group = group_comm_for(comm, None)
    x = np.random.default_rng(rank).normal(size=(3, channels))
    try:
        sync_batch_norm(x, np.ones(channels), np.zeros(channels), group_comm=group, training=True)
        say(1, "ok")
    except Exception as exc:         # noqa: BLE001
        say(1, f"{type(exc).__name__}: {exc}")


{"eval_step1": eval_step1, "stateless_channels": stateless_channels}[sys.argv[1]]()
