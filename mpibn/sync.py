"""Stateless synchronized batch norm: math -> the one Allreduce -> math.

``sync_batch_norm`` and ``sync_batch_norm_backward`` compose the math room
(``mpibn.functional``) with the communication room (``mpibn.comm``) and keep
no state between calls: what backward needs travels in the returned
``Saved`` record. ``mpibn.SyncBatchNorm`` is built on these two functions,
and another framework's test suite can call them directly (both are
exported from ``mpibn``)::

    from mpi4py import MPI
    from mpibn import group_comm_for, sync_batch_norm, sync_batch_norm_backward

    group_comm = group_comm_for(MPI.COMM_WORLD, [[0, 1], [2, 3]])   # collective
    y, saved = sync_batch_norm(x, gamma, beta, group_comm=group_comm, training=True,
                               running_mean=rm, running_var=rv, momentum=0.9)
    dx, dgamma, dbeta = sync_batch_norm_backward(dy, saved)

**The rule of every pass: local work cannot skip the collective.** What a
rank computes before the Allreduce (input checks, local moments or sums,
exact mode's integer limbs) runs through ``errors.guarded``: a bad input
becomes a problem code in this rank's row, and so does any *unexpected*
exception, however deep in the math (``errors.Code.LOCAL_ERROR``, carrying the
exception's type name). The rank still joins the collective, and every
rank of the group raises the same exception (the rank that had it with
the original chained as ``__cause__``). Nothing a rank does on its own can
leave its peers waiting. (All the ways errors are agreed: ``mpibn.errors``.)

Both modes' passes are here: the default mode's helpers follow each pass,
and ``exact=True``'s (exact integer sums in the same one Allreduce) are at
the bottom of the module.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import exact as E
from . import functional as F
from .comm import FILLED, NO_FORWARD_TAG, GroupComm, RowExchange, backward_tag, make_exchange
from .errors import Code, Problem, check_alive, check_grad, check_input, guarded, local_problem, said_once
from .fingerprint import fingerprint

__all__ = ["sync_batch_norm", "sync_batch_norm_backward", "Saved"]


@dataclass(eq=False, repr=False)     # compared and printed as an object, never array by array
class Saved:
    """What backward needs from forward (never recomputed in backward); built with keywords.

    x (B, C, L) is kept by reference, with ``fingerprint`` (``mpibn.fingerprint``)
    taken in forward: backward refuses an x modified in place in between.
    ``count`` is the group's total count, or None when the statistics were
    constants (the moving statistics were used): then backward communicates
    nothing.
    """
    x: np.ndarray              # (B, C, L), the caller's memory unless a copy was needed
    shape: tuple               # x's shape as the caller passed it
    mean: np.ndarray           # (C,) float64, the statistics forward normalised with
    inv_std: np.ndarray        # (C,) float64
    var: Optional[np.ndarray]  # biased batch variance (None with constant statistics)
    gamma: np.ndarray          # (C,)
    count: Optional[int]       # the group's count of values per channel, or None (see above)
    group_comm: GroupComm
    exchange: Optional[RowExchange]
    tag: tuple                 # forward's (layer, call); backward sends comm.backward_tag of it
    exact: bool = False
    fingerprint: Any = None    # None: x is a private copy nobody else can change
    nonfinite: str = "raise"   # backward checks dy's sums as forward checked x's
    used: bool = field(default=False, init=False)     # set by the one backward it may feed


# float16/32/64 in native byte order: an x of one of these needs no further dtype check
_NATIVE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def _context(num_features, what):
    return f"SyncBatchNorm(num_features={num_features}).{what}"


def _channels(gamma):
    shape = np.shape(gamma)
    if len(shape) != 1:
        raise ValueError(f"gamma must be 1-D (C,), got shape {shape}")
    return shape[0]


def _native(a):
    """``a`` in native byte order: big-endian input is converted once (a copy)."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


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
    integer sums carried in the same one Allreduce (``exact_statistics``),
    rounded once to float64: correctly rounded statistics, and y and dx
    bitwise the same however the group's batch is split across its ranks.
    Every rank of the group must pass the same ``exact``.

    Returns (y, saved): y has x's shape and dtype (native byte order); ``saved``
    feeds backward. ``exchange`` is an optional preallocated ``comm.RowExchange``
    (two payload vectors of C numbers per row; for exact=True one made by
    ``comm.make_exchange(..., exact=True)``), made alike on every rank
    of the group (a layer makes its own at construction, when the ranks
    have agreed on num_features). Without one, a training call
    first makes one more small Allreduce (2 numbers per rank) so that the ranks
    agree on the channel count and ``exact`` before the buffer's size depends
    on them (``agreed_exchange``): two Allreduces per training forward instead
    of one.
    """
    original = x
    if group_comm is None:
        group_comm = GroupComm(None, (0,), 0)     # no peers: plain batch norm
    if type(gamma) is np.ndarray and gamma.ndim == 1:     # the usual gamma: no call needed
        problem, channels = None, gamma.shape[0]
    else:
        problem, channels = guarded(None, lambda: _channels(gamma))
    context = _context("?" if channels is None else channels, "construct")
    check_alive(group_comm, context)          # a stopped group runs nothing, eval included
    if problem is None and not (type(x) is np.ndarray and x.dtype in _NATIVE_FLOATS
                                and x.ndim in (2, 4) and x.shape[1] == channels):
        problem = check_input(x, channels)      # the usual x passed the line above: no call
    if problem is None and not x.dtype.isnative:
        problem, x = guarded(None, lambda: _native(original))
    if training:
        if exchange is None:
            exchange = agreed_exchange(group_comm, channels, exact, problem, tag)
        mean, inv_std, count, var, kept = batch_statistics(
            x, problem, exchange, eps, context, tag, running_mean, running_var, momentum, nonfinite,
            exact)
    else:
        local_problem(problem, group_comm, context)
        mean = np.asarray(running_mean, np.float64)
        inv_std = F.inv_std_from_var(running_var, eps)
        count = var = kept = None
    x3 = F.as_ncl(x)
    if training and nonfinite == "raise":
        # Every value of the batch was checked finite on every rank: no
        # invalid operation can happen here, so no error state to set.
        # kept: x as the local moments converted it to float64 (a one-block array)
        y = F.batch_norm_elemt(x3, mean, inv_std, gamma, beta, kept=kept)
    else:
        # With nonfinite='propagate', Inf - Inf = NaN is the asked-for result, not news.
        with np.errstate(invalid="ignore" if nonfinite == "propagate" else "warn"):
            y = F.batch_norm_elemt(x3, mean, inv_std, gamma, beta, kept=kept)
    # x3 shares memory with the caller's x unless as_ncl or _native copied it.
    # In eval, x feeds only this rank's dgamma (dx = gamma * inv_std * dy) and
    # the forward is one cheap pass: the sampled values only, not a full read.
    x_fingerprint = fingerprint(x3, full=training) if np.may_share_memory(x3, original) else None
    saved = Saved(x=x3, shape=x.shape, mean=mean, inv_std=inv_std, var=var, gamma=gamma, count=count,
                  group_comm=group_comm, exchange=exchange, tag=tag, exact=exact, fingerprint=x_fingerprint,
                  nonfinite=nonfinite)
    return y.reshape(x.shape), saved


def agreed_exchange(group_comm, channels, exact, problem, tag):
    """A stateless training call's exchange, once the group agrees on its size.

    The buffer's width grows with the channel count. Ranks that passed
    different counts would call Allreduce with different sizes (MPICH aborts
    the job with "Message truncated"; other MPIs may corrupt memory), so a
    fixed-size Allreduce of (channels, exact) per rank comes first and any
    difference is a ValueError on every rank. A rank whose channel count is
    unknown (bad gamma) flags its problem here.
    """
    # The context names no channel count: the ranks disagree on it, and the
    # message must be the same on every rank.
    context = "sync_batch_norm"
    probe = RowExchange(group_comm, 2, 1)
    _, rows = probe.exchange(problem if channels is None else None, 0,
                             None if channels is None else [(channels, float(bool(exact)))], context, tag)
    seen = rows[:, 0, :]
    # Every rank holds the same rows, so every rank raises alike, or none does
    # (the second way errors are agreed: mpibn/errors.py).
    if not (seen == seen[0]).all():
        said = said_once((rank, f"{int(c)} channels, exact={bool(e)}")
                         for rank, (c, e) in zip(group_comm.ranks, seen))
        raise ValueError(f"{context} (group ranks {list(group_comm.ranks)}): every rank must pass "
                         f"gamma and x with the same channel count, and the same exact; got {said}")
    return make_exchange(group_comm, channels, exact)


def _local_moments(x, out):
    """This rank's count, with its (mean, m2) written into ``out`` (2, C),
    and x in float64 for y (``F.batch_norm_stats(..., keep=True)``)
    (called under batch_statistics' errstate: inf - inf is NaN, and squares
    of 1e160 overflow, which the agreed checks after the exchange report)."""
    count, _, _, kept = F.batch_norm_stats(F.as_ncl(x), out, keep=True)
    return count, kept


def sum_overflow(a3, sums, nonfinite):
    """Problem X_SUM_OVERFLOW when ``a3``'s per-channel sums are not finite although
    its values are (|values| near 1e308), else None: without it the check after
    the exchange would call a finite input "NaN or Inf". Reads a3 again, on this
    failure path only."""
    bad = ~np.isfinite(sums)
    if nonfinite != "raise" or not bad.any():
        return None
    channels = [c for c in np.flatnonzero(bad) if np.isfinite(a3[:, c]).all()]
    return Problem(Code.X_SUM_OVERFLOW, *channels[:8]) if channels else None


def batch_statistics(x, problem, exchange, eps, context, tag, running_mean=None, running_var=None,
                     momentum=0.9, nonfinite="raise", exact=False):
    """Local moments -> the one Allreduce -> the group's (mean, inv_std, count, var),
    and ``kept`` for ``F.batch_norm_elemt`` (x already in float64, or None)."""
    group_comm = exchange.group
    # inf - inf is NaN in the local moments, and the merge and the moving
    # statistics may overflow: no warnings, the agreed checks below report
    # them (or nonfinite='propagate' asked for them).
    with np.errstate(invalid="ignore", over="ignore"):
        if exact:
            counts, rows, total, mean, var, unbiased = exact_statistics(x, problem, exchange, context, tag)
        else:
            count, payload, kept = 0, None, None
            if problem is None:
                # mean and m2 are written straight into this rank's row of the exchange
                try:
                    payload = exchange.payload()
                    count, kept = _local_moments(x, payload)
                except Exception as exc:     # noqa: BLE001 - errors.guarded, inline on every call's path
                    problem = Problem.from_exception(exc)
            if problem is None and nonfinite == "raise" and not _finite(payload[0]):
                # a sum that overflows on finite values is reported as such, not as NaN or Inf
                problem = sum_overflow(F.as_ncl(x), payload[0], nonfinite)
            counts, rows = exchange.exchange(problem, count, None if payload is None else FILLED,
                                             context, tag)
            moments = np.empty((3, rows.shape[2]))              # (mean, M2, unbiased variance)
            total, _, _ = F.merge_stats(counts, rows[:, 0], rows[:, 1], out=moments[:2])
        # The checks below read only what every rank of the group holds alike (the
        # rows, the moving statistics): they raise on every rank or on none, with
        # no communication (the second way errors are agreed: mpibn/errors.py).
        if total <= 1:
            raise ValueError(f"{context}: expected more than 1 value per channel in training, got "
                             f"{total} over group ranks {list(group_comm.ranks)} "
                             f"(per-rank counts {counts.astype(int).tolist()})")
        if not exact:
            # (mean, var, unbiased): M2 / N and M2 / (N - 1)
            mean, var = moments[0], moments[1] / float(total)
            unbiased = np.divide(moments[1], float(total - 1), out=moments[2])
            stats = moments[::2]                                # (mean, unbiased), a view
        else:
            stats = np.array((mean, unbiased))
        # Any NaN or Inf in a row with values, or an overflowing merge, makes the
        # merged moments non-finite: one reduction checks them all in the usual case.
        if nonfinite == "raise" and (exact or not _finite(moments[:2])):
            _check_finite(rows, group_comm, context, exact)
            _check_group_finite(mean, var, context)
        pair = _moving_pair(running_mean, running_var, stats, momentum)
        if pair is None:
            new = (_moving(running_mean, mean, momentum), _moving(running_var, unbiased, momentum))
        else:
            new = pair[0], pair[1]
        if nonfinite == "raise" and (pair is None or not _finite(pair)):
            _check_moving_finite(*new, context)
    # State changes only now, when every check has passed on every rank.
    if running_mean is not None:
        running_mean[...] = new[0]
    if running_var is not None:
        running_var[...] = new[1]
    return mean, F.inv_std_from_var(var, eps), total, var, None if exact else kept


def _finite(a):
    """True when every value of ``a`` is finite, in one reduction (a sum of
    finite values that overflows says False: callers then check value by value).
    A few values are checked in Python: a NumPy reduction costs about 1 us."""
    if a.size <= 16:
        return all(map(math.isfinite, a.reshape(-1).tolist()))
    return math.isfinite(np.add.reduce(a, axis=None, dtype=np.float64))


def _moving(running, batch_stat, momentum):
    """The updated moving statistic, rounded to the dtype it is kept in (None without one)."""
    if running is None:
        return None
    # (called under errstate(over="ignore"): the caller checks overflow or asks for it)
    return F.running_update(running, batch_stat, momentum).astype(np.asarray(running).dtype)


def _moving_pair(running_mean, running_var, stats, momentum):
    """Both moving statistics updated as one (2, C) array of their dtype: the
    arithmetic of ``F.running_update`` value by value, in fewer calls. ``stats``:
    (2, C) float64, the batch's (mean, unbiased variance). None when the moving
    statistics are not two ndarrays (C,) of one dtype (then ``_moving`` does each)."""
    channels = stats.shape[1]
    if type(running_mean) is not np.ndarray or type(running_var) is not np.ndarray \
            or running_mean.dtype != running_var.dtype or running_mean.shape != (channels,) \
            or running_var.shape != (channels,):
        return None
    new = np.empty((2, channels))
    new[0], new[1] = running_mean, running_var      # exact in float64
    F.running_update(new, stats, momentum, out=new)
    return new.astype(running_mean.dtype)


def _check_moving_finite(new_mean, new_var, context):
    """The batch statistics are finite here; the moving ones can still overflow in
    their own dtype (float16: above 65504). Every rank of the group holds the same
    moving statistics and updates them from the same group statistics, so this
    check gives the same answer on every rank with no communication."""
    for name, new in (("moving mean", new_mean), ("moving variance", new_var)):
        if new is not None and not np.isfinite(new).all():
            bad = np.flatnonzero(~np.isfinite(new))
            raise FloatingPointError(
                f"{context}: the {name} overflows {new.dtype} at channel(s) {bad[:8].tolist()} "
                f"(largest finite {float(np.finfo(new.dtype).max):g}); moving statistics left "
                f"unchanged (use a wider dtype, or nonfinite='propagate' to store the Inf)")


def _check_finite(rows, group_comm, context, exact=False):
    """Every rank's row finite, else the agreed FloatingPointError naming each rank and
    channel: NaN or Inf in x (its mean is not finite), or a finite x whose variance
    overflows float64 (its mean is finite, its m2 is not). Exact mode's rows carry
    only the IEEE sums of non-finite values: there any is NaN or Inf."""
    _raise_nonfinite(rows, group_comm, context, exact, "NaN or Inf in the training batch",
                     "the variance overflows float64 at {} (x is finite, but the squares of its "
                     "deviations from the mean exceed 1.8e308)",
                     "moving statistics left unchanged (pass nonfinite='propagate' to let IEEE values "
                     "through)")


def _raise_nonfinite(rows, group_comm, context, exact, nonfinite_text, overflow_text, outcome):
    """The agreed FloatingPointError of a pass whose rows (P, 2, C) are not all finite.

    Column 0 not finite: NaN or Inf in the input itself; only column 1: its
    second sum overflows. Exact mode's rows carry only the IEEE sums of
    non-finite values, so any non-finite entry means NaN or Inf."""
    if np.isfinite(rows).all():                   # every call's path: one test
        return
    nonfinite = ~np.isfinite(rows).all(axis=1) if exact else ~np.isfinite(rows[:, 0])    # (P, C)
    overflow = ~nonfinite & ~np.isfinite(rows).all(axis=1)
    said = []
    if nonfinite.any():
        said.append(f"{nonfinite_text} at {_where(nonfinite, group_comm)}")
    if overflow.any():
        said.append(overflow_text.format(_where(overflow, group_comm)))
    raise FloatingPointError(f"{context}: {'; '.join(said)}; {outcome}")


def _where(bad, group_comm):
    """'rank 3 channel 1, rank 0 channel 2' for a (P, C) mask (8 at most, then a count)."""
    where = [(group_comm.ranks[r], c) for r, c in zip(*np.nonzero(bad))]
    listed = ", ".join(f"rank {r} channel {c}" for r, c in where[:8])
    return listed + (f" and {len(where) - 8} more" if len(where) > 8 else "")


def _check_group_finite(mean, var, context):
    """Every rank's moments are finite here; merging them can still overflow (ranks
    whose means differ by 1e154 or more). The same verdict on every rank: all hold
    the same rows."""
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    if bad.any():
        raise FloatingPointError(
            f"{context}: the group's batch variance overflows float64 at channel(s) "
            f"{np.flatnonzero(bad)[:8].tolist()} (every rank's values are finite, but their spread "
            f"exceeds 1.3e154); moving statistics left unchanged (scale the input down)")


def _check_grad_finite(rows, group_comm, context, exact=False):
    """Backward's rows [sum dy, sum dy*xhat] finite, else the agreed FloatingPointError
    naming each rank and channel (sum dy not finite: NaN or Inf in dy; only
    sum dy*xhat: it overflows). Exact mode's rows carry only the IEEE sums of
    non-finite values."""
    _raise_nonfinite(rows, group_comm, context, exact, "NaN or Inf in dy",
                     "sum(dy * xhat) overflows float64 at {} (dy is finite but too large)",
                     "no gradient was computed (pass nonfinite='propagate' to the layer to let IEEE "
                     "values through)")


def _check_grad_means(mean_dy, mean_dy_xhat, context):
    """Every rank's sums are finite here; the group's can still overflow. The same
    verdict on every rank (the same rows, added in the same order)."""
    bad = ~(np.isfinite(mean_dy) & np.isfinite(mean_dy_xhat))
    if bad.any():
        raise FloatingPointError(f"{context}: the group's sums of dy and dy * xhat overflow float64 at "
                                 f"channel(s) {np.flatnonzero(bad)[:8].tolist()} (dy is finite but too "
                                 f"large); no gradient was computed")


def sync_batch_norm_backward(dy, saved, *, exchange=None, training=None):
    """(dx, dgamma, dbeta) for the forward that returned ``saved``.

    dx is the gradient of the group's loss (one Allreduce of
    [sum dy, sum dy*xhat] when the forward used batch statistics); dgamma
    and dbeta are this rank's own float64 sums (C,).

    x is kept from forward by reference, not copied. Changing it in place
    before backward (``x *= 10``, ``x[0] += 1``, ``x[...] = other``) would
    silently change dx, so backward first compares x with the fingerprint
    forward took (``mpibn.fingerprint``: the sum of x's raw bits modulo 2^64
    plus a few sampled values per (sample, channel) plane; one read of x at
    memory speed in each pass, its cost in docs/reliability.md) and raises
    RuntimeError instead, on every rank of the group in training. It cannot
    see a reordering confined to unsampled positions. After an eval forward
    (where x feeds only dgamma, not dx) only the sampled values are
    compared, so a change at an unsampled position goes unseen there. Pass
    forward a copy of x if you must reuse its memory before backward.

    ``saved`` may be None (no forward on this rank): then ``exchange`` (whose
    group and width match the peers') and ``training`` say whether the peers
    are in a collective; this rank joins it with an error flag so that every
    rank raises the same RuntimeError instead of waiting forever. The same
    for a second backward of one ``saved``. The mode (exact or not) is the
    forward's, ``saved.exact``.
    """
    problem = _backward_problem(dy, saved, training)
    exchange, training = _backward_peers(saved, exchange, training)
    channels = saved.mean.shape[0] if saved is not None else exchange.channels if exchange else "?"
    context = _context(channels, "backward")
    group = exchange.group if exchange else None
    check_alive(saved.group_comm if saved is not None else group, context)    # fail-stop
    if not training:
        local_problem(problem, group, context)      # no peer waits: raise on this rank alone
    exact = saved is not None and saved.exact     # with no usable saved only the error travels
    # This rank's local work: an exception in it travels as its problem (errors.guarded).
    nonfinite = saved.nonfinite if saved is not None else "raise"
    # NaN in dy and overflowing sums: no warnings, the agreed checks after the exchange report them.
    with np.errstate(over="ignore", invalid="ignore"):
        # In training the default mode's two sums go straight into this rank's row of the exchange.
        payload = exchange.payload() if training and not exact and problem is None else None
        dy3 = sums = kept = None
        if problem is None:
            try:                  # errors.guarded, inline: this is every backward's path
                dy3, sums, kept = _local_backward(dy, saved, exact, payload)
            except Exception as exc:     # noqa: BLE001 - reported to every rank, chained on this one
                problem = Problem.from_exception(exc)
        if not training:
            local_problem(problem, group, context)
        if problem is None and sums is not None and training and nonfinite == "raise" \
                and not _finite(payload[0]):
            problem = sum_overflow(dy3, sums[0], nonfinite)
        tag = backward_tag(saved.tag) if saved is not None else NO_FORWARD_TAG
        if exact:
            mean_dy, mean_dy_xhat, sums = exact_backward_sums(
                exchange, problem, dy3, saved, training, context, tag,
                check=(lambda rows: _check_grad_finite(rows, group, context, exact=True))
                if nonfinite == "raise" else None)
            if training and nonfinite == "raise":
                _check_grad_means(mean_dy, mean_dy_xhat, context)
        elif training:
            _, rows = exchange.exchange(problem, 0, None if sums is None else FILLED, context, tag)
            sums = rows[exchange.group.rank]            # this rank's own, as sent
            # Added in rank order on every rank: bitwise the same dx everywhere.
            group_sums = rows[0] if rows.shape[0] == 1 else np.add.reduce(rows, axis=0)
            means = group_sums / float(saved.count)
            # NaN or Inf in a row, or an overflowing group sum, makes the means
            # non-finite: one reduction checks them all in the usual case.
            if nonfinite == "raise" and not _finite(means):
                _check_grad_finite(rows, group, context)
                _check_grad_means(means[0], means[1], context)
            mean_dy, mean_dy_xhat = means
        else:
            mean_dy = mean_dy_xhat = np.zeros(saved.x.shape[1])
    # xhat = (x - mean) * inv_std is formed block by block from x, in both modes.
    # kept: dy and x - mean as this rank's sums left them (a one-block array), not formed again
    dx = F.batch_norm_backward_elemt(dy3, None, saved.gamma, saved.inv_std, mean_dy, mean_dy_xhat,
                                     out_dtype=saved.x.dtype, x=saved.x, mean=saved.mean, kept=kept)
    saved.used = True
    return dx.reshape(saved.shape), sums[1], sums[0]


def _backward_problem(dy, saved, training):
    """This rank's problem with a backward call, before any math, or None.

    The first found wins, in this order (which problem a rank reports is
    tested): no forward, a second backward of one forward, a bad dy, x
    changed in place since forward.
    """
    if saved is None:
        return Problem(Code.NO_FORWARD, 1 if training else 0)
    if saved.used:
        return Problem(Code.BACKWARD_TWICE)
    if type(dy) is np.ndarray and dy.shape == saved.shape and dy.dtype in _NATIVE_FLOATS:
        problem = None                              # the usual dy: checked without a call
    else:
        problem = check_grad(dy, saved.shape)
    if saved.fingerprint is None:
        return problem
    if problem is not None:
        return problem
    try:                      # errors.guarded, inline: this is every backward's path
        changed = _x_changed(saved)
    except Exception as exc:     # noqa: BLE001 - reported to every rank, chained on this one
        return Problem.from_exception(exc)
    return Problem(Code.X_CHANGED) if changed else None


def _x_changed(saved):
    """Whether x no longer matches the fingerprint forward took (None: x is a private copy)."""
    if saved.fingerprint is None:
        return False
    return fingerprint(saved.x, full=saved.count is not None) != saved.fingerprint


def _backward_peers(saved, exchange, training):
    """(exchange, training): which collective this backward's peers are in, if any.

    A forward knows (``saved``: its exchange, and whether its statistics
    were the batch's). A rank without a usable forward has the caller's word
    for its peers: ``exchange`` and ``training``.
    """
    if saved is None:
        return exchange, training
    if saved.used:
        return exchange or saved.exchange, saved.count is not None if training is None else training
    return saved.exchange or exchange, saved.count is not None


def _local_backward(dy, saved, exact, out=None):
    """This rank's work before the collective: (dy3, sums, kept).

    The default mode returns this rank's two sums (written into ``out``, a
    (2, C) float64 array, when given), xhat = (x - mean) * inv_std formed
    block by block from what forward kept (it never exists in full), and
    ``kept`` for batch_norm_backward_elemt (F.batch_norm_backward_reduce's
    keep=True); exact mode's sums come with its exchange
    (``exact_backward_sums``).
    """
    dy3 = F.as_ncl(_native(dy))
    if exact:
        return dy3, None, None
    sum_dy, sum_dy_xhat, kept = F.batch_norm_backward_reduce(
        dy3, x=saved.x, mean=saved.mean, inv_std=saved.inv_std, out=out, keep=True)
    return dy3, (sum_dy, sum_dy_xhat), kept


# -- exact=True: exact sums -> the one Allreduce -> rounded once ---------------------------
#
# Forward, per channel, over the group:
#
#   rank r      lin_r  = limbs of sum x,  prod_r = limbs of sum x^2       exact.exact_sums
#   ONE Allreduce   rows: [count_r, special_r (2, C)]
#                   summed region: [lin | prod] (C, exact.SUMMED_WIDTH)
#   group       N = sum count_r, S1 = sum lin_r, S2 = sum prod_r (integers: exact, any order)
#               mean = S1 / N, var = (N S2 - S1^2) / N^2, unbiased = ... / (N (N - 1))
#               each correctly rounded to float64                     exact.exact_stats
#
# Backward: the same with u = dy and w = x (T1 = sum dy, T2 = sum dy * x),
# then mean_dy = T1 / N and mean_dy_xhat = inv_std (T2 - mean T1) / N, each
# rounded once (exact.backward_means), so dx is a function of (x, dy, the
# rounded group sums) only: bitwise the same however the group's batch is
# split. special_r carries the IEEE sums of non-finite values (see
# mpibn.exact), so NaN/Inf checks work as in the default mode.

def _exact_exchange(exchange, problem, u3, w3, context, tag):
    """Exact local sums of u and u*w (w = u when None) -> the one Allreduce.

    Returns (counts (P,), rows (P, 2, C), the group's limbs (lin, prod),
    this rank's own (lin, prod, special) or None)."""
    if problem is None and exchange.summed_width != E.SUMMED_WIDTH * exchange.channels:
        # Not raised here: the peers are on their way into the Allreduce. This
        # rank joins it with the problem flagged, and every rank raises.
        problem = Problem(Code.EXCHANGE_NOT_EXACT)
    count, local, summed, own = 0, None, None, None
    # Local work cannot skip the collective (the rule of this module): an
    # exception in the exact sums travels as this rank's problem.
    problem, own = guarded(problem, lambda: E.exact_sums(u3, w3, balanced=True))
    if problem is None:
        count = u3.shape[0] * u3.shape[2]
        local, summed = own[2], np.concatenate(own[:2], axis=1)
    counts, rows = exchange.exchange(problem, count, local, context, tag, summed=summed)
    limbs = exchange.summed.reshape(exchange.channels, E.SUMMED_WIDTH)
    return counts, rows, (limbs[:, :E.LIN_LIMBS], limbs[:, E.LIN_LIMBS:]), own


def exact_statistics(x, problem, exchange, context, tag):
    """(counts, rows, total, mean, var, unbiased) of the group, correctly rounded."""
    problem, x3 = guarded(problem, lambda: F.as_ncl(x))
    counts, rows, (lin, prod), _ = _exact_exchange(exchange, problem, x3, None, context, tag)
    total = int(counts.sum())
    mean, var, unbiased = E.exact_stats(total, lin, prod, rows.sum(axis=0))
    return counts, rows, total, mean, var, unbiased


def exact_backward_sums(exchange, problem, dy3, saved, training, context, tag, check=None):
    """(mean_dy, mean_dy_xhat, (own sum_dy, own sum_dy_xhat)), all correctly rounded.

    From the exact sums T1 = sum dy and T2 = sum dy * x of the x that
    forward kept: mean_dy_xhat = inv_std (T2 - mean T1) / N
    (``exact.backward_means``). training: one Allreduce for the group's
    sums over ``saved.count``; otherwise no communication and zero means
    (constant statistics). ``check(rows)``, if given, runs on the exchanged
    rows (the IEEE sums, where non-finite values show) before they are used."""
    x3 = saved.x if saved is not None else None
    channels = exchange.channels if exchange is not None else saved.mean.shape[0]
    if training:
        _, rows, (lin, prod), own = _exact_exchange(exchange, problem, dy3, x3, context, tag)
        if check is not None:
            check(rows)
        # The group's means and this rank's own dbeta and dgamma (its exact
        # sums over a count of 1) in one pass over both sets of limbs.
        both = E.backward_means([saved.count] * channels + [1] * channels,
                                np.concatenate([lin, own[0]]), np.concatenate([prod, own[1]]),
                                np.tile(saved.mean, 2), np.tile(saved.inv_std, 2),
                                np.concatenate([rows.sum(axis=0), own[2]], axis=1))
        return both[0][:channels], both[1][:channels], (both[0][channels:], both[1][channels:])
    own = E.exact_sums(dy3, x3, balanced=True)
    zeros = np.zeros(channels)
    return zeros, zeros, E.backward_means([1] * channels, own[0], own[1], saved.mean, saved.inv_std, own[2])
