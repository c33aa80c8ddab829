"""A training job in which one rank fails mid-step, for the dead-rank tests.

    mpiexec -n 4 python -m mpi4py scripts/fault_job.py --fault kill --rank 2 --step 3 --stamp /tmp/t

Every rank runs training steps (forward, then backward) of a SyncBatchNorm
over COMM_WORLD. At step ``--step``, between forward and backward (so its
peers are already waiting in the backward Allreduce), rank ``--rank``:

* ``raise``: raises RuntimeError; ``python -m mpi4py`` turns an uncaught
  exception into MPI_Abort, which ends every rank;
* ``kill``: sends itself SIGKILL (no Python cleanup at all); mpiexec sees a
  rank die and ends the others;
* ``exit``: calls sys.exit(3) (a rank that gives up quietly);
* ``badx`` / ``nan``: passes an int32 x / an x holding a NaN to forward:
  every rank raises the same agreed TypeError / FloatingPointError, and
  ``python -m mpi4py`` ends the job;
* ``none``: does nothing (the control: the job ends normally with 0).

Before failing, the rank writes the wall-clock time to ``--stamp`` so the
caller can measure how long the job took to end after the fault.
"""
import argparse
import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fault", choices=["raise", "kill", "exit", "badx", "nan", "none"], required=True)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--step", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stamp", default=None)
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    rng = np.random.default_rng(rank)
    bn = SyncBatchNorm(4, comm=comm).set_train()
    for step in range(args.steps):
        x = rng.normal(size=(int(rng.integers(0, 6)) + 1, 4, 3, 3)).astype(np.float32)
        faulty = step == args.step and rank == args.rank and args.fault != "none"
        if faulty:
            if args.stamp:
                with open(args.stamp, "w") as f:
                    f.write(repr(time.time()))
            print(f"fault_job: rank {rank} step {step}: {args.fault}", flush=True)
            if args.fault == "badx":
                x = x.astype(np.int32)
            if args.fault == "nan":
                x[0, 1, 0, 0] = np.nan
        bn(x)
        if faulty:
            if args.fault == "raise":
                raise RuntimeError(f"injected fault on rank {rank} at step {step}")
            if args.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.fault == "exit":
                sys.exit(3)
        bn.backward(rng.normal(size=x.shape).astype(np.float32))
    bn.close()
    if rank == 0:
        print(f"fault_job: {args.steps} steps done on {comm.Get_size()} ranks", flush=True)


if __name__ == "__main__":
    main()
