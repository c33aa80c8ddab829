"""Statistics of process groups within and across hosts, saved for comparison.

    python scripts/hosts.py --hosts 2 --per-host 2 -- python -m mpi4py scripts/hosts_groups.py --out DIR
    mpiexec -n 4 python -m mpi4py scripts/hosts_groups.py --out DIR2     # one host

On 4 ranks (2 hosts x 2: ranks 0, 1 on host1 and 2, 3 on host2), one
training step (forward and backward) of a SyncBatchNorm per grouping:
all ranks; [[0, 1], [2, 3]] (a group per host); [[0, 2], [1, 3]] (every
group spans both hosts); [[0, 1, 2]] (spans, rank 3 alone); [[3, 1]];
each with uneven shards including an empty one, in the default and the
``exact=True`` mode. Each rank saves everything it computed to
``DIR/rank<r>.npz`` and its host name to ``DIR/rank<r>.host``;
``tests/test_hosts.py`` requires the two runs to be bitwise equal.
"""
import argparse
import os
import socket

import numpy as np
from mpi4py import MPI

from mpibn import SyncBatchNorm

GROUPINGS = {"all": None, "per-host": [[0, 1], [2, 3]], "across": [[0, 2], [1, 3]],
             "three": [[0, 1, 2]], "pair-31": [[3, 1]]}
SHARDS = [3, 0, 5, 2]          # rank 1 is empty (and no group above is all empty)
C = 3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    if world.Get_size() != 4:
        raise SystemExit(f"hosts_groups.py needs 4 ranks, got {world.Get_size()}")
    rng = np.random.default_rng(7)
    x = rng.normal(40.0, 3.0, (sum(SHARDS), C, 2, 3)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    lo = sum(SHARDS[:rank])
    mine = slice(lo, lo + SHARDS[rank])
    saved = {}
    for name, groups in GROUPINGS.items():
        for exact in (False, True):
            key = f"{name}-{'exact' if exact else 'default'}"
            in_group = groups is None or any(rank in g for g in groups)
            bn = SyncBatchNorm(C, process_groups=groups, exact=exact).set_train()
            y = bn(x[mine])
            dx = bn.backward(dy[mine])
            saved.update({f"{key}/y": y, f"{key}/dx": dx, f"{key}/mean": bn.batch_mean,
                          f"{key}/var": bn.batch_var, f"{key}/moving_mean": bn.moving_mean.data,
                          f"{key}/moving_var": bn.moving_variance.data,
                          f"{key}/dgamma": bn.gamma.grad, f"{key}/dbeta": bn.beta.grad,
                          f"{key}/in_group": np.array(in_group)})
            bn.close()
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), **saved)
    with open(os.path.join(args.out, f"rank{rank}.host"), "w") as f:
        f.write(socket.gethostname())


if __name__ == "__main__":
    main()
