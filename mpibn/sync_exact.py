"""The ``exact=True`` passes of ``mpibn.sync``: exact sums -> the one Allreduce -> rounded once.

Forward, per channel, over the group::

    rank r      lin_r  = limbs of sum x,  prod_r = limbs of sum x^2      exact.exact_sums
    ONE Allreduce   rows: [count_r, special_r (2, C)]   summed region: [lin | prod] (C, 202)
    group       N = sum count_r, S1 = sum lin_r, S2 = sum prod_r (integers: exact, any order)
                mean = S1 / N, var = (N S2 - S1^2) / N^2, unbiased = ... / (N (N - 1))
                each correctly rounded to float64                    exact.exact_stats

Backward: the same with u = dy and w = xhat (sum dy, sum dy * xhat), so dx
is a function of (x, dy, the rounded group sums) only: bitwise the same
however the group's batch is split. ``special_r`` carries the IEEE sums of
non-finite values (see ``mpibn.exact``), so NaN/Inf checks work as in the
default mode.
"""
import numpy as np

from . import exact as E
from . import functional as F
from .comm import RowExchange
from .errors import guarded

__all__ = ["make_exchange", "exact_statistics", "exact_backward_sums"]


def make_exchange(group_comm, channels, exact=False):
    """A layer's exchange: 2 numbers per channel and rank, plus the summed
    integer limbs (``exact.SHARED_WIDTH`` per channel) when exact."""
    return RowExchange(group_comm, channels, 2, shared=E.SHARED_WIDTH * channels if exact else 0)


def _channels_last(a3):
    """(N, C, L) -> (N * L, C), the layout ``exact.exact_sums`` takes."""
    return a3.transpose(0, 2, 1).reshape(-1, a3.shape[1])


def _exchange(exchange, problem, u3, w3, context, tag):
    """Exact local sums of u and u*w (w = u when None) -> the one Allreduce.

    Returns (counts (P,), rows (P, 2, C), the group's limbs (lin, prod),
    this rank's own (lin, prod, special) or None)."""
    if exchange.shared_width != E.SHARED_WIDTH * exchange.channels:
        raise ValueError(f"{context}: exact=True needs an exchange made by "
                         f"mpibn.sync_exact.make_exchange(..., exact=True)")
    count, local, shared, own = 0, None, None, None
    # Local work cannot skip the collective (the rule of mpibn.sync): an
    # exception in the exact sums travels as this rank's problem.
    problem, own = guarded(problem, lambda: E.exact_sums(
        _channels_last(u3), None if w3 is None else _channels_last(w3)))
    if problem is None:
        count = u3.shape[0] * u3.shape[2]
        local, shared = own[2], np.concatenate(own[:2], axis=1)
    counts, rows = exchange.exchange(problem, count, local, context, tag, shared=shared)
    limbs = exchange.shared.reshape(exchange.channels, E.SHARED_WIDTH)
    return counts, rows, (limbs[:, :E.LIN_LIMBS], limbs[:, E.LIN_LIMBS:]), own


def exact_statistics(x, problem, exchange, context, tag):
    """(counts, rows, total, mean, var, unbiased) of the group, correctly rounded."""
    problem, x3 = guarded(problem, lambda: F.as_ncl(x))
    counts, rows, (lin, prod), _ = _exchange(exchange, problem, x3, None, context, tag)
    total = int(counts.sum())
    mean, var, unbiased = E.exact_stats(total, lin, prod, rows.sum(axis=0))
    return counts, rows, total, mean, var, unbiased


def exact_backward_sums(exchange, problem, dy3, xhat, count, training, context, tag):
    """(mean_dy, mean_dy_xhat, (own sum_dy, own sum_dy_xhat)), all correctly rounded.

    training: one Allreduce for the group's sums over ``count``; otherwise
    no communication and zero means (constant statistics)."""
    if training:
        _, rows, (lin, prod), own = _exchange(exchange, problem, dy3, xhat, context, tag)
        means = E.round_sums(lin, prod, count, rows.sum(axis=0))
    else:
        own = E.exact_sums(_channels_last(dy3), _channels_last(xhat))
        means = (np.zeros(dy3.shape[1]), np.zeros(dy3.shape[1]))
    # This rank's own dbeta and dgamma: its exact sums, rounded once.
    return means[0], means[1], E.round_sums(own[0], own[1], 1, own[2])
