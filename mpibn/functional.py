"""The math room: synchronized batch norm as pure functions on NumPy arrays.

No MPI here (this module never imports mpi4py), so it can be read, tested
and called by other frameworks' test suites without a communicator.

The whole picture, per channel c, over a group of P ranks, rank r holding
n_r values of channel c (n_r = B_r * H * W for a shard of B_r samples; n_r
may be 0), N = sum_r n_r values in the group. docs/derivation.md derives
every line; s = 1/sqrt(var + eps) is called ``inv_std`` in the code.

forward::

    local moments   n_r, mean_r = sum(x)/n_r, m2_r = sum((x - mean_r)^2)
                                                     batch_norm_stats
    ONE Allreduce   every rank gets every rank's (n_r, mean_r, m2_r)
    group moments   N, mean, M2 (Chan's merge)      merge_stats
    normalise       var = M2 / N (biased), s = 1/sqrt(var + eps)
                    y = gamma * (x - mean) * s + beta
                                                     batch_norm_elemt

backward (loss L = sum over ranks of each rank's loss)::

    local sums      sum_dy_r = sum(dy), sum_dy_xhat_r = sum(dy * xhat)
                                                     batch_norm_backward_reduce
    ONE Allreduce   every rank gets every rank's two sums; add them in rank order
    dx              dx = gamma * s * (dy - sum_dy/N - xhat * sum_dy_xhat/N)
                                                     batch_norm_backward_elemt
    dgamma, dbeta   this rank's own sum_dy_xhat_r and sum_dy_r: its share of
                    dL/dgamma and dL/dbeta. The training step sums the shares
                    over the ranks with every other parameter gradient (why,
                    and how this differs from DDP's averaging: derivation.md,
                    "gamma and beta stay local").

Numerical choices (the accuracy argument, with measurements:
docs/derivation.md, "Accuracy"):

* Everything accumulates in float64, whatever the input dtype.
* The second moment travels *centred* (m2_r about the rank's own mean),
  never as a raw sum of squares, whose variance has a relative error of
  about u * (mean/std)^2 (u the unit roundoff). m2_r is the corrected
  two-pass sum (Chan, Golub and LeVeque 1983), and the merge adds only
  non-negative terms.
* Moving variance uses the unbiased variance M2 / (N - 1) with the group's
  total count N.

Speed without a lost digit:

* Each function walks its array in cache-sized blocks (``mpibn.blocks``):
  a block is converted to float64 in a small scratch buffer, the formula is
  applied there, and the result is rounded once into the output. No
  full-size float64 temporary exists, so a float32 activation is streamed
  from memory about once per formula instead of once per operation.
* Backward keeps x (by reference, no copy), not xhat: a float64 xhat would
  cost twice a float32 input in memory, and an xhat rounded to the input
  dtype would throw away the digits that x - mean in float64 keeps.
  Recomputing x - mean costs one subtraction per value in each backward
  pass, done in cache.

Shapes: x is (B, C) or (B, C, H, W), B the batch dimension (the API's N;
here N is the group's count of values). Internally every function works on a
(B, C, L) view (L = H * W, or 1 for 2-D input); per-channel vectors are (C,).
"""
import warnings
from typing import TYPE_CHECKING

import numpy as np

from . import blocks

# A shard whose array holds at most this many numbers (x.size: all channels
# together, since the point is how much memory is read twice) is its own head
# in batch_norm_stats (tests set it to 0 to exercise the head on small arrays).
SMALL_SHARD = 1 << 16

__all__ = [
    "as_ncl", "batch_norm_stats", "merge_stats", "inv_std_from_var",
    "batch_norm_elemt", "batch_norm_backward_reduce",
    "batch_norm_backward_elemt", "running_update",
]


def as_ncl(x):
    """View x of shape (B, C) or (B, C, H, W) as (B, C, L) without copying
    (when x is C-contiguous)."""
    if x.ndim == 4:
        return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
    return x[:, :, None]


def batch_norm_stats(x):
    """Local moments of one shard, per channel, in float64.

    ::

        n     = B * L                               (int, same for every channel)
        mean  = sum_{b,l} x[b, c, l] / n            (C,)
        m2    = sum_{b,l} (x[b, c, l] - mean)^2     (C,)

    Computed with the corrected two-pass sum of Chan, Golub and LeVeque
    about a shift K (C,)::

        d = x - K,   mean = K + sum(d)/n,   m2 = sum(d^2) - sum(d)^2/n

    Its relative rounding error is of order u * f(n) * (1 + kappa), with
    kappa = n (mean - K)^2 / m2 (Chan, Golub and LeVeque's bound for the
    textbook formula on data shifted by K; u the unit roundoff, f(n) the
    growth of rounding error with the length of the sums, which the block
    plan of ``mpibn.blocks`` decides), whatever |mean|/std: x - K is
    (nearly) exact where x is close to K. K is the mean of the first
    ceil(B/16) samples (the head; all of x when x.size <= SMALL_SHARD,
    counting every channel: then this is the classic two-pass algorithm),
    and the head's own deviations bound kappa: n_head (K - mean)^2 <=
    sum_head (x - mean)^2 <= m2, so kappa <= n / n_head <= 16 for any data,
    a factor of at most 17 over the error with the exact mean as shift.
    x is read from memory once (plus the head), one cache-sized block at a
    time. The analysis, f(n) for each plan and the measured errors:
    docs/ground-truth.md, "One shard's moments". An empty shard gives
    (0, 0, 0).

    (One shift for all blocks, not a mean per block: block means merged like
    rank means would each carry a rounding error of order u*|mean|, which
    the between-block term turns into an error of order u*|mean|/std in m2.)

    x: (B, C, L) of any float dtype. Returns (n, mean, m2).
    """
    num, channels, length = x.shape
    count = num * length
    if count == 0:
        return 0, np.zeros(channels), np.zeros(channels)
    # A small shard is its own head (K = its first-pass mean): the extra pass
    # costs nothing there, and it keeps sum(d) from drifting on few values.
    head = x if x.size <= SMALL_SHARD else x[:-(-num // 16)]
    shift = np.add.reduce(head, axis=(0, 2), dtype=np.float64) / (head.shape[0] * length)
    d_sum, d_sq = np.zeros(channels), np.zeros(channels)

    def block(b, vectors, scratch):
        (shift,), (d,) = vectors, scratch
        d[...] = x[b.index]                         # float64 copy of the block
        d -= shift                                  # d = x - K
        d_sum[b.c] += blocks.sums(d)
        d_sq[b.c] += blocks.dots(d, d)
    blocks.each(x, (shift,), 1, block)
    m2 = d_sq - d_sum * d_sum / count
    # >= 0 in exact arithmetic; only rounding or underflow can make it
    # negative, and then by no more than their size (a constant channel
    # near 1.7e-147 gives -5e-324, the smallest subnormal), so 0 is the
    # better value. Unlike a clamp of E[x^2] - E[x]^2 this hides no lost
    # digits (docs/ground-truth.md, "The clamp on m2").
    return count, shift + d_sum / count, np.maximum(m2, 0.0)


def merge_stats(counts, means, m2s):
    """Moments of the concatenated batch from every rank's local moments.

    ::

        N    = sum_r n_r                                    (scalar)
        mean = sum_r n_r mean_r / N                         (C,)
        M2   = sum_r m2_r + sum_r n_r (mean_r - mean)^2     (C,)

    ("within-rank plus between-rank" sum of squares: every term is >= 0, so
    nothing cancels; derivation in docs/derivation.md). Rows with count 0
    are masked in every column (mean and m2 alike), so whatever an empty
    rank's row holds cannot reach the result. The mean is formed as ``shift + sum n_r (mean_r -
    shift) / N`` about the first non-empty rank's mean, so its rounding
    error scales with the spread of the rank means, not with |mean|. Ranks
    are visited in a fixed order (rows of the arrays), so every rank that
    calls this with the same table gets bitwise the same result.

    counts: (P,), means: (P, C), m2s: (P, C). Returns (N, mean, M2).
    """
    counts = np.asarray(counts, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    m2s = np.asarray(m2s, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return 0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    if counts.shape[0] == 1:
        # One rank: the lines below add an exact 0 to its own mean and m2
        # (NaN where its mean is not finite); so does this, in 3 calls not 15.
        zero = means[0] - means[0]
        return int(total), means[0] + zero, m2s[0] + zero
    weights = counts[:, None]
    # Empty ranks carry zero rows; masking every column keeps a stray
    # non-finite value on an empty rank from poisoning the sums (0 * nan is
    # nan). Without an empty rank (the usual case) there is nothing to mask.
    present = None if counts.all() else counts[:, None] > 0
    shift = means[0] if present is None else means[np.argmax(present[:, 0])]
    offsets = means - shift
    if present is not None:
        offsets = np.where(present, offsets, 0.0)
    mean = shift + (weights * offsets).sum(axis=0) / total
    between = weights * (means - mean) ** 2
    if present is not None:
        between = np.where(present, between, 0.0)
        m2s = np.where(present, m2s, 0.0)
    return int(total), mean, m2s.sum(axis=0) + between.sum(axis=0)


def inv_std_from_var(var, eps):
    """s = inv_std = 1 / sqrt(var + eps), float64, (C,)."""
    return 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)


def batch_norm_elemt(x, mean, inv_std, gamma, beta, out_dtype=None, out=None):
    """Normalise with given statistics, then scale and shift.

    ::

        xhat = (x - mean) * inv_std                   (B, C, L)
        y    = gamma * xhat + beta                    (B, C, L)

    x - mean is taken first, in float64: it is exact or nearly so when x is
    close to the mean, which is where a folded ``x*scale + shift`` would
    cancel. Computed as ``(x - mean) * (gamma * inv_std) + beta`` in float64,
    one cache-sized block at a time, and rounded once into y. Returns y in
    ``out_dtype`` (default: x's dtype), written into ``out`` when given.

    x: (B, C, L); mean, inv_std, gamma, beta: (C,).
    """
    scale = np.asarray(gamma, np.float64) * inv_std
    y = np.empty(x.shape, out_dtype or x.dtype) if out is None else out
    direct = y.dtype == np.float64          # then y is its own scratch

    def block(b, vectors, scratch):
        (m, scale, be), d = vectors, y[b.index] if direct else scratch[0]
        d[...] = x[b.index]                 # float64
        d -= m                              # x - mean
        d *= scale                          # gamma * inv_std
        d += be
        if not direct:
            y[b.index] = d                  # rounded once
    blocks.each(x, (mean, scale, beta), 0 if direct else 1, block)
    return y


def _xhat_source(xhat, x, mean):
    """Either xhat itself, or x and mean to form x - mean block by block."""
    if xhat is not None:
        return xhat, None
    return x, np.asarray(mean, np.float64)


def batch_norm_backward_reduce(dy, xhat=None, *, x=None, mean=None, inv_std=None):
    """This rank's two per-channel sums for the backward pass, in float64.

    ::

        sum_dy      = sum_{n,l} dy[n, c, l]                 (C,)
        sum_dy_xhat = sum_{n,l} dy[n, c, l] * xhat[n, c, l] (C,)

    They are also this rank's dbeta and dgamma.

    Pass ``xhat``, or ``x``, ``mean`` and ``inv_std`` (what forward kept):
    then ``sum_dy_xhat = inv_std * sum(dy * (x - mean))``, with x - mean
    formed in float64 one block at a time, so xhat never exists in full.
    dy, xhat, x: (B, C, L); mean, inv_std: (C,).
    """
    src, mean = _xhat_source(xhat, x, mean)
    sum_dy = np.zeros(dy.shape[1])
    sum_dy_xhat = np.zeros(dy.shape[1])

    def block(b, vectors, scratch):
        g, h = scratch
        g[...] = dy[b.index]                        # float64 dy
        h[...] = src[b.index]
        if vectors:
            h -= vectors[0]                         # x - mean
        sum_dy[b.c] += blocks.sums(g)
        sum_dy_xhat[b.c] += blocks.dots(g, h)
    blocks.each(dy, () if mean is None else (mean,), 2, block)
    if mean is not None:
        sum_dy_xhat *= inv_std
    return sum_dy, sum_dy_xhat


def batch_norm_backward_elemt(dy, xhat, gamma, inv_std, mean_dy, mean_dy_xhat,
                              out_dtype=None, *, x=None, mean=None, out=None):
    """Input gradient of batch norm from the group's sums.

    With y = gamma * xhat + beta, xhat = (x - mean) * inv_std and mean, var
    taken over the group's N values (derivation in docs/derivation.md)::

        dx = gamma * inv_std * (dy - mean_dy - xhat * mean_dy_xhat)   (B, C, L)

    where mean_dy = sum_dy / N and mean_dy_xhat = sum_dy_xhat / N are the
    group's sums over its count N of values per channel. With constant
    statistics (the moving statistics were used) pass mean_dy =
    mean_dy_xhat = 0, which gives dx = gamma * inv_std * dy.

    Pass ``xhat``, or xhat=None with ``x`` and ``mean``: then
    ``xhat * mean_dy_xhat = (x - mean) * (inv_std * mean_dy_xhat)``, formed
    in float64 one block at a time. dx is rounded once, into ``out`` when
    given (default: a new array of ``out_dtype``, default dy's dtype).

    dy, xhat, x: (B, C, L); gamma, inv_std, mean_dy, mean_dy_xhat, mean: (C,).
    """
    inv_std = np.asarray(inv_std, np.float64)
    src, mean = _xhat_source(xhat, x, mean)
    scale = np.asarray(gamma, np.float64) * inv_std
    coef = np.asarray(mean_dy_xhat, np.float64)
    if mean is None:
        mean = np.zeros_like(coef)                  # src is xhat already
    else:
        coef = coef * inv_std
    dx = np.empty(dy.shape, out_dtype or dy.dtype) if out is None else out

    def block(b, vectors, scratch):
        (m, cf, mdy, scale), (t, h) = vectors, scratch
        t[...] = dy[b.index]
        t -= mdy                                    # dy - mean_dy
        h[...] = src[b.index]
        h -= m
        h *= cf                                     # xhat * mean_dy_xhat
        t -= h
        t *= scale                                  # gamma * inv_std
        dx[b.index] = t                             # rounded once
    blocks.each(dy, (mean, coef, mean_dy, scale), 2, block)
    return dx


def running_update(moving, batch_stat, momentum):
    """MindSpore's convention: momentum is the weight of the *old* value.

    ::

        moving_new = momentum * moving + (1 - momentum) * batch_stat   (C,)

    (PyTorch's momentum=0.1 is the same update as MindSpore's 0.9.)
    """
    return momentum * np.asarray(moving, np.float64) + (1.0 - momentum) * batch_stat


# -- Deprecated, one release: the synced passes are in mpibn.sync ---------------------------

_MOVED_TO_SYNC = ("sync_batch_norm", "sync_batch_norm_backward")

if TYPE_CHECKING:        # for IDEs and type checkers only (go-to-definition); never run
    from .sync import sync_batch_norm, sync_batch_norm_backward  # noqa: F401


def __getattr__(name):
    """Deprecated shim: ``mpibn.functional.sync_batch_norm`` and ``sync_batch_norm_backward``.

    The stateless synced passes compose this module with ``mpibn.comm``, so
    they live in ``mpibn.sync`` (and are exported from ``mpibn``): import
    them from there. The names are resolved only when asked for, so this
    module still never imports mpibn.sync, nor mpi4py, at import time. The
    shim warns (DeprecationWarning) and goes in the next release.
    """
    if name in _MOVED_TO_SYNC:
        warnings.warn(f"mpibn.functional.{name} is deprecated and goes in the next release: import it "
                      f"from mpibn.sync (or from mpibn)", DeprecationWarning, stacklevel=2)
        from . import sync
        return getattr(sync, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
