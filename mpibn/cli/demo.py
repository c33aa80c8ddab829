"""``python -m mpibn demo``: synced statistics equal those of the concatenated batch.

Every rank draws the same global batch (seeded), keeps an uneven slice of
it (the last rank may get none), runs one training forward and backward of
``SyncBatchNorm`` over all ranks, and compares with a plain float64 batch
norm of the whole batch (``mpibn.cli.textbook``), independent of mpibn's code.
"""
import numpy as np

from . import textbook


def shard_bounds(total, size, rank):
    """Uneven shards in proportion size-1, ..., 1, 0: the last rank is empty (size > 1)."""
    weights = np.arange(size, dtype=float)[::-1] + (size == 1)
    cuts = np.concatenate([[0], np.floor(np.cumsum(weights) / weights.sum() * total)]).astype(int)
    return cuts[rank], cuts[rank + 1]


def tolerance(x, var):
    """How far two correct float64 batch norms of x may differ: relative, not absolute.

    Both round x - mean, whose error is about u * |x| (u = 2^-53), and the
    normalisation divides it by the std: y and dx may differ by about
    u * max|x| / std (a few ulps of y near offset 0, a thousand times that at
    |mean|/std = 1000), the mean by u * max|x|, the variance by u * max|x| / std
    relative. 1e-12 = 4500 u leaves room for the sums' own rounding."""
    ratio = max(1.0, float(np.abs(x).max() / np.sqrt(var.min())))
    return {"y": 1e-12 * ratio, "mean": 1e-13 * max(1.0, float(np.abs(x).max())),
            "var": 1e-13 * ratio * float(var.max())}


def run(args):
    from mpi4py import MPI
    from ..layer import SyncBatchNorm

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.channels, 4, 4)
    x = rng.normal(args.offset, 1.0, shape)
    dy = rng.normal(size=shape)
    gamma, beta = rng.normal(1.0, 0.1, args.channels), rng.normal(0.0, 0.1, args.channels)
    lo, hi = shard_bounds(args.batch, size, rank)

    bn = SyncBatchNorm(args.channels, gamma_init=gamma, beta_init=beta, dtype=np.float64).set_train()
    y = bn(x[lo:hi])
    dx = bn.backward(dy[lo:hi])
    y_ref, dx_ref, mean_ref, var_ref, _ = textbook.batch_norm(x, dy, gamma, beta, bn.eps)

    err_y = float(np.abs(y - y_ref[lo:hi]).max(initial=0.0))
    err_dx = float(np.abs(dx - dx_ref[lo:hi]).max(initial=0.0))
    tol = tolerance(x, var_ref)
    line = (f"rank {rank}/{size}: {hi - lo:2d} of {args.batch} samples | "
            f"mean[0] {bn.batch_mean[0]:+.12f} var[0] {bn.batch_var[0]:.12f} | "
            f"max|y - y_concat| {err_y:.1e}  max|dx - dx_concat| {err_dx:.1e} | "
            f"Allreduce calls {bn.group_comm.allreduce_calls}")
    lines = comm.gather(line, root=0)
    ok = comm.allreduce(int(err_y <= tol["y"] and err_dx <= tol["y"]
                            and np.abs(bn.batch_mean - mean_ref).max() <= tol["mean"]
                            and np.abs(bn.batch_var - var_ref).max() <= tol["var"]), op=MPI.MIN)
    if rank == 0:
        print(f"SyncBatchNorm over {size} ranks, uneven shards, x ~ N({args.offset}, 1), shape {shape}")
        print(f"concatenated batch:            mean[0] {mean_ref[0]:+.12f} var[0] {var_ref[0]:.12f}")
        print("\n".join(lines))
        print(f"synced statistics, y and dx equal the concatenated batch's (to 1e-12 x max|x|/std "
              f"= {tol['y']:.1e})" if ok else f"MISMATCH with the concatenated batch (tolerances {tol})")
    bn.close()
    return 0 if ok else 1
