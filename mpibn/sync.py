"""Stateless synchronized batch norm: math -> the one Allreduce -> math.

``sync_batch_norm`` and ``sync_batch_norm_backward`` compose the math room
(``mpibn.functional``) with the communication room (``mpibn.comm``) and keep
no state between calls: what backward needs travels in the returned
``Saved`` record. ``mpibn.SyncBatchNorm`` is built on these two functions,
and another framework's test suite can call them directly (they are also
reachable as ``mpibn.functional.sync_batch_norm``)::

    from mpi4py import MPI
    from mpibn.comm import group_comm_for
    from mpibn.functional import sync_batch_norm, sync_batch_norm_backward

    group_comm = group_comm_for(MPI.COMM_WORLD, [[0, 1], [2, 3]])   # collective
    y, saved = sync_batch_norm(x, gamma, beta, group_comm=group_comm, training=True,
                               running_mean=rm, running_var=rv, momentum=0.9)
    dx, dgamma, dbeta = sync_batch_norm_backward(dy, saved)
"""
import numpy as np

from . import functional as F
from .comm import GroupComm, local_problem
from .errors import BACKWARD_TWICE, NO_FORWARD, Problem, check_grad, check_input
from .sync_exact import exact_backward_sums, exact_statistics, make_exchange

__all__ = ["sync_batch_norm", "sync_batch_norm_backward", "Saved"]


class Saved:
    """What backward needs from forward (never recomputed in backward).

    x (B, C, L) is kept by reference: do not modify it before backward.
    ``count`` is the group's total count, or None when the statistics were
    constants (the moving statistics were used): then backward communicates
    nothing.
    """

    def __init__(self, x, shape, mean, inv_std, var, gamma, count, group_comm, exchange, tag, exact=False):
        self.x, self.shape, self.mean, self.inv_std, self.gamma = x, shape, mean, inv_std, gamma
        self.var = var            # biased batch variance (None with constant statistics)
        self.count = count
        self.group_comm, self.exchange, self.tag = group_comm, exchange, tag
        self.exact = exact
        self.used = False


def _context(num_features, what):
    return f"SyncBatchNorm(num_features={num_features}).{what}"


def sync_batch_norm(x, gamma, beta, *, group_comm, eps=1e-5, training=True, running_mean=None,
                    running_var=None, momentum=0.9, nonfinite="raise", exchange=None, tag=(0, 0),
                    exact=False):
    """Batch norm of x with statistics over the ranks of ``group_comm``.

    training=True: batch statistics of the group's concatenated batch (one
    Allreduce; every rank of the group must call; ``group_comm=None``: this
    rank's batch alone); ``running_mean`` and
    ``running_var`` (arrays (C,), may be None) are then updated in place
    with MindSpore's momentum convention, only once every check has passed
    on every rank. training=False: ``running_mean``/``running_var`` are the
    statistics and nothing is communicated. (The layer decides ``training``
    from ``use_batch_statistics``, not from its mode alone.)

    exact=True: mean and variance (and backward's two sums) come from exact
    integer sums carried in the same one Allreduce (``mpibn.sync_exact``),
    rounded once to float64: correctly rounded statistics, and y and dx
    bitwise the same however the group's batch is split across its ranks.
    Every rank of the group must pass the same ``exact``.

    Returns (y, saved): y has x's shape and dtype; ``saved`` feeds backward.
    ``exchange`` is an optional preallocated ``comm.RowExchange`` (two
    payload vectors of C numbers per row; for exact=True one made by
    ``sync_exact.make_exchange(..., exact=True)``).
    """
    channels = np.shape(gamma)[0]
    context = _context(channels, "construct")
    if group_comm is None:
        group_comm = GroupComm(None, (0,), 0)     # no peers: plain batch norm
    problem = check_input(x, channels)
    if training:
        exchange = exchange or make_exchange(group_comm, channels, exact)
        mean, inv_std, count, var = batch_statistics(
            x, problem, exchange, eps, context, tag, running_mean, running_var, momentum, nonfinite,
            exact)
    else:
        local_problem(problem, group_comm, context)
        mean = np.asarray(running_mean, np.float64)
        inv_std = F.inv_std_from_var(running_var, eps)
        count = var = None
    x3 = F.as_ncl(x)
    # With nonfinite='propagate', Inf - Inf = NaN is the asked-for result, not news.
    with np.errstate(invalid="ignore" if nonfinite == "propagate" else "warn"):
        y = F.batch_norm_elemt(x3, mean, inv_std, gamma, beta)
    saved = Saved(x3, x.shape, mean, inv_std, var, gamma, count, group_comm, exchange, tag, exact)
    return y.reshape(x.shape), saved


def batch_statistics(x, problem, exchange, eps, context, tag, running_mean=None, running_var=None,
                     momentum=0.9, nonfinite="raise", exact=False):
    """Local moments -> the one Allreduce -> the group's (mean, inv_std, count, var)."""
    group_comm = exchange.group
    if exact:
        counts, rows, total, mean, var, unbiased = exact_statistics(x, problem, exchange, context, tag)
    else:
        count, local = 0, None
        if problem is None:
            # inf - inf is NaN here: no warning, the agreed check below reports it
            with np.errstate(invalid="ignore"):
                count, mean, m2 = F.batch_norm_stats(F.as_ncl(x))
            local = (mean, m2)
        counts, rows = exchange.exchange(problem, count, local, context, tag)
        total, mean, m2 = F.merge_stats(counts, rows[:, 0], rows[:, 1])
    if total <= 1:
        raise ValueError(f"{context}: expected more than 1 value per channel in training, got "
                         f"{total} over group ranks {list(group_comm.ranks)} "
                         f"(per-rank counts {counts.astype(int).tolist()})")
    if nonfinite == "raise":
        _check_finite(rows, group_comm, context)
    if not exact:
        var, unbiased = m2 / total, m2 / (total - 1)
    # State changes only now, when every check has passed on every rank.
    if running_mean is not None:
        running_mean[...] = F.running_update(running_mean, mean, momentum)
    if running_var is not None:
        running_var[...] = F.running_update(running_var, unbiased, momentum)
    return mean, F.inv_std_from_var(var, eps), total, var


def _check_finite(rows, group_comm, context):
    bad = ~np.isfinite(rows).all(axis=1)          # (P, C)
    if bad.any():
        where = [(group_comm.ranks[r], c) for r, c in zip(*np.nonzero(bad))]
        listed = ", ".join(f"rank {r} channel {c}" for r, c in where[:8])
        more = f" and {len(where) - 8} more" if len(where) > 8 else ""
        raise FloatingPointError(f"{context}: NaN or Inf in the training batch at {listed}{more}; "
                                 f"moving statistics left unchanged (pass nonfinite='propagate' "
                                 f"to let IEEE values through)")


def sync_batch_norm_backward(dy, saved, *, exchange=None, training=None):
    """(dx, dgamma, dbeta) for the forward that returned ``saved``.

    dx is the exact gradient of the group's loss (one Allreduce of
    [sum dy, sum dy*xhat] when the forward used batch statistics); dgamma
    and dbeta are this rank's own float64 sums (C,).

    ``saved`` may be None (no forward on this rank): then ``exchange`` (whose
    group and width match the peers') and ``training`` say whether the peers
    are in a collective; this rank joins it with an error flag so that every
    rank raises the same RuntimeError instead of waiting forever.
    """
    if saved is None:
        problem = Problem(NO_FORWARD)
    elif saved.used:
        problem = Problem(BACKWARD_TWICE)
    else:
        problem = check_grad(dy, saved.shape)
        exchange, training = saved.exchange or exchange, saved.count is not None
    context = _context(exchange.channels if exchange else "?", "backward")
    if not training:
        local_problem(problem, exchange.group if exchange else None, context)

    sums = dy3 = xhat = None
    exact = saved.exact if saved is not None else bool(exchange and exchange.shared_width)
    if problem is None:
        dy3 = F.as_ncl(dy)
        if exact:
            # The exact sums need xhat itself (float64, full size).
            xhat = (saved.x - saved.mean[:, None]) * saved.inv_std[:, None]
        else:
            # xhat = (x - mean) * inv_std is formed block by block from what
            # forward kept; it never exists in full.
            sums = F.batch_norm_backward_reduce(dy3, x=saved.x, mean=saved.mean, inv_std=saved.inv_std)
    if exact:
        tag = (saved.tag[0] + 1, saved.tag[1]) if saved is not None else (-1, -1)
        mean_dy, mean_dy_xhat, sums = exact_backward_sums(
            exchange, problem, dy3, xhat, saved.count if saved else None, training, context, tag)
    elif training:
        tag = (saved.tag[0] + 1, saved.tag[1]) if saved is not None else (-1, -1)
        _, rows = exchange.exchange(problem, 0, sums, context, tag)
        # Added in rank order on every rank: bitwise the same dx everywhere.
        group_sum_dy, group_sum_dy_xhat = rows.sum(axis=0)
        mean_dy, mean_dy_xhat = group_sum_dy / saved.count, group_sum_dy_xhat / saved.count
    else:
        mean_dy = mean_dy_xhat = np.zeros(saved.x.shape[1])
    # xhat is None (formed block by block from x) unless the exact path made it.
    dx = F.batch_norm_backward_elemt(dy3, xhat, saved.gamma, saved.inv_std, mean_dy, mean_dy_xhat,
                                     out_dtype=saved.x.dtype, x=saved.x, mean=saved.mean)
    saved.used = True
    return dx.reshape(saved.shape), sums[1], sums[0]
