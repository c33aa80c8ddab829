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
* One answer on every machine: every sum is NumPy's own ``np.add.reduce``
  over float64 values, never BLAS (whose kernel, and so whose order of
  additions, OpenBLAS picks from the CPU at run time); see ``mpibn.blocks``.

Speed without a lost digit:

* Each function walks its array in blocks of at most 2^17 values
  (``mpibn.blocks``): a block is converted to float64 in a scratch buffer,
  the formula is applied there, and the result is rounded once into the
  output. No full-size float64 temporary exists, so a float32 activation
  is read from memory about once per formula instead of once per operation.
* Backward keeps x (by reference, no copy), not xhat: a float64 xhat would
  cost twice a float32 input in memory, and an xhat rounded to the input
  dtype would throw away the digits that x - mean in float64 keeps.
  Recomputing x - mean costs one subtraction per value in each backward
  pass, block by block; an array of one block forms dy and x - mean once
  for both backward formulas, and forward's y reads x as the local moments
  converted it (``keep``/``kept``).

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


def batch_norm_stats(x, out=None, keep=False):
    """Local moments of one shard, per channel, in float64.

    ::

        n     = B * L                               (int, same for every channel)
        mean  = sum_{b,l} x[b, c, l] / n            (C,)
        m2    = sum_{b,l} (x[b, c, l] - mean)^2     (C,)

    Computed with the corrected two-pass sum of Chan, Golub and LeVeque
    about a shift K (C,)::

        d = x - K,   mean = K + sum(d)/n,   m2 = sum(d^2) - sum(d) (sum(d)/n)

    Its relative rounding error is of order u * f(n) * (1 + kappa), with
    kappa = n (mean - K)^2 / m2 (Chan, Golub and LeVeque's bound for the
    textbook formula on data shifted by K; u the unit roundoff, f(n) the
    growth of rounding error with the length of the sums, which the block
    plan of ``mpibn.blocks`` decides: the sums are NumPy's own, never BLAS,
    so the same bits on every CPU), whatever |mean|/std: x - K is
    (nearly) exact where x is close to K. K is the mean of the first
    ceil(B/16) samples (the head; all of x when x.size <= SMALL_SHARD,
    counting every channel: then this is the classic two-pass algorithm),
    and the head's own deviations bound kappa: n_head (K - mean)^2 <=
    sum_head (x - mean)^2 <= m2, so kappa <= n / n_head <= 16 for any data,
    a factor of at most 17 over the error with the exact mean as shift.
    x is read from memory once (plus the head; an array of one block takes
    K from the block already converted), one block at a time.
    The analysis, f(n) for each plan and the measured errors:
    docs/ground-truth.md, "One shard's moments". An empty shard gives
    (0, 0, 0).

    (One shift for all blocks, not a mean per block: block means merged like
    rank means would each carry a rounding error of order u*|mean|, which
    the between-block term turns into an error of order u*|mean|/std in m2.)

    x: (B, C, L) of any float dtype. ``out``: an optional (2, C) float64
    array for (mean, m2). Returns (n, mean, m2), and with ``keep=True`` a
    fourth value for ``batch_norm_elemt(..., kept=...)``: x as converted to
    float64 here (an array of one block, ``blocks.whole``; else None), so
    that y need not convert it again.
    """
    num, channels, length = x.shape
    count = num * length
    out = np.empty((2, channels)) if out is None else out
    mean, m2 = out
    if count == 0:
        out[...] = 0.0
        return (0, mean, m2, None) if keep else (0, mean, m2)
    # A small shard is its own head (K = its first-pass mean): the extra pass
    # costs nothing there, and it keeps sum(d) from drifting on few values.
    head = num if x.size <= SMALL_SHARD else -(-num // 16)
    shift, sums, *kept = blocks.shifted_sums(x, head, _shifted, keep)
    d_sum, d_sq = sums
    np.divide(d_sum, float(count), out=mean)        # sum(d)/n (a float: NumPy divides faster)
    np.multiply(d_sum, mean, out=m2)
    np.subtract(d_sq, m2, out=m2)                   # sum(d^2) - sum(d) * sum(d)/n
    mean += shift                                   # K + sum(d)/n
    # >= 0 in exact arithmetic; only rounding or underflow can make it
    # negative, and then by no more than their size (a constant channel
    # near 1.7e-147 gives -5e-324, the smallest subnormal), so 0 is the
    # better value. Unlike a clamp of E[x^2] - E[x]^2 this hides no lost
    # digits (docs/ground-truth.md, "The clamp on m2").
    np.maximum(m2, 0.0, out=m2)
    return (count, mean, m2, *kept)


def _shifted(blocks_, scratch, columns):
    """One block of batch_norm_stats: from x (float64), leaves d = x - K and
    d^2 in the last two scratch buffers, the two quantities summed per
    channel (with three buffers, x stays in the first: ``keep``)."""
    (x,), (shift,), (d, sq) = blocks_, columns, scratch[-2:]
    np.subtract(x, shift, out=d)                    # d = x - K
    np.multiply(d, d, out=sq)


def merge_stats(counts, means, m2s, out=None):
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
    calls this with the same table gets bitwise the same result (the sums
    over ranks are NumPy's own, added rank after rank: no BLAS).

    counts: (P,), means: (P, C), m2s: (P, C). ``out``: an optional (2, C)
    float64 array for (mean, M2). Returns (N, mean, M2).
    """
    counts = _f64(counts)
    means = _f64(means)
    m2s = _f64(m2s)
    total = sum(counts.tolist())                    # integers: exact in any order
    out = np.empty((2, means.shape[1])) if out is None else out
    if total == 0:
        out[...] = 0.0
        return 0, out[0], out[1]
    if counts.shape[0] == 1:
        # One rank: the lines below add an exact 0 to its own mean and m2
        # (NaN where its mean is not finite); so does this, in 3 calls not 15.
        zero = np.subtract(means[0], means[0], out=out[0])
        np.add(m2s[0], zero, out=out[1])
        np.add(means[0], zero, out=out[0])
        return int(total), out[0], out[1]
    weights = counts[:, None]
    # Empty ranks carry zero rows; masking every column keeps a stray
    # non-finite value on an empty rank from poisoning the sums (0 * nan is
    # nan). Without an empty rank (the usual case) there is nothing to mask.
    present = None if counts.all() else counts[:, None] > 0
    shift = means[0] if present is None else means[np.argmax(present[:, 0])]
    offsets = means - shift
    if present is not None:
        offsets = np.where(present, offsets, 0.0)
    mean = out[0]
    np.add(shift, (weights * offsets).sum(axis=0) / total, out=mean)
    between = weights * (means - mean) ** 2
    if present is not None:
        between = np.where(present, between, 0.0)
        m2s = np.where(present, m2s, 0.0)
    np.add(m2s.sum(axis=0), between.sum(axis=0), out=out[1])
    return int(total), out[0], out[1]


def inv_std_from_var(var, eps):
    """s = inv_std = 1 / sqrt(var + eps), float64, (C,)."""
    return 1.0 / np.sqrt(_f64(var) + eps)


def batch_norm_elemt(x, mean, inv_std, gamma, beta, out_dtype=None, out=None, kept=None):
    """Normalise with given statistics, then scale and shift.

    ::

        xhat = (x - mean) * inv_std                   (B, C, L)
        y    = gamma * xhat + beta                    (B, C, L)

    x - mean is taken first, in float64: it is exact or nearly so when x is
    close to the mean, which is where a folded ``x*scale + shift`` would
    cancel. Computed as ``(x - mean) * (gamma * inv_std) + beta`` in float64,
    one block at a time, and rounded once into y. Returns y in
    ``out_dtype`` (default: x's dtype), written into ``out`` when given.
    ``kept``: the fourth value of ``batch_norm_stats(..., keep=True)`` for
    the same x, the call just before on this thread: x is then read as that
    call left it in float64 (the same values; one conversion less).

    x: (B, C, L); mean, inv_std, gamma, beta: (C,).
    """
    scale = np.multiply(gamma, inv_std, dtype=np.float64)
    y = np.empty(x.shape, out_dtype or x.dtype) if out is None else out
    if kept is not None:
        return blocks.each_kept(kept, 3, _normalise, (_f64(mean), scale, _f64(beta)), y)
    return blocks.each((x,), 1, _normalise, (_f64(mean), scale, _f64(beta)), y)


def _normalise(blocks_, scratch, columns):
    """One block of batch_norm_elemt: from x (float64), leaves y in scratch[0]."""
    x, (m, scale, be), d = blocks_[0], columns, scratch[0]
    np.subtract(x, m, out=d)                        # x - mean
    d *= scale                                      # gamma * inv_std
    d += be


_F64 = np.dtype(np.float64)


def _f64(v):
    """v as a float64 array: itself when it is one (no call: this is on every step's path)."""
    return v if type(v) is np.ndarray and v.dtype is _F64 else np.asarray(v, np.float64)


def batch_norm_backward_reduce(dy, xhat=None, *, x=None, mean=None, inv_std=None, out=None,
                               keep=False):
    """This rank's two per-channel sums for the backward pass, in float64.

    ::

        sum_dy      = sum_{n,l} dy[n, c, l]                 (C,)
        sum_dy_xhat = sum_{n,l} dy[n, c, l] * xhat[n, c, l] (C,)

    They are also this rank's dbeta and dgamma.

    Pass ``xhat``, or ``x``, ``mean`` and ``inv_std`` (what forward kept):
    then ``sum_dy_xhat = inv_std * sum(dy * (x - mean))``, with x - mean
    formed in float64 one block at a time, so xhat never exists in full.
    The sums are NumPy's own, as in ``batch_norm_stats``. ``out``: an
    optional (2, C) float64 array for the two sums.
    dy, xhat, x: (B, C, L); mean, inv_std: (C,).

    ``keep=True`` (with x and mean) returns a third value for
    ``batch_norm_backward_elemt(..., kept=...)``: an array of one block
    (``blocks.whole``) leaves dy and x - mean in float64, already formed,
    so the next call on this thread need not form them again (None for
    bigger arrays, whose blocks are formed one at a time).
    """
    out = np.empty((2, dy.shape[1])) if out is None else out
    if xhat is not None:
        blocks.reduce((dy, xhat), 2, _product, (None,), out)
        return out[0], out[1]
    kept = keep and blocks.whole(dy.shape)
    if kept:                  # dy, x - mean, and their product (the quantities summed: 0 and 2)
        blocks.reduce((dy, x), 3, _product_kept, (_f64(mean),), out, summed=_FIRST_AND_LAST, keep=True)
    else:
        blocks.reduce((dy, x), 2, _product, (_f64(mean),), out)
    out[1] *= inv_std
    if keep:
        return out[0], out[1], (dy.shape if kept else None)
    return out[0], out[1]


_FIRST_AND_LAST = slice(None, None, 2)


def _product(blocks_, scratch, columns):
    """One block of batch_norm_backward_reduce: from dy and x or xhat
    (float64), leaves dy and dy * (x - mean) (or dy * xhat) in scratch, the
    quantities summed."""
    (dy, x), (m,), (g, h) = blocks_, columns, scratch
    if m is not None:
        np.subtract(x, m, out=h)                    # x - mean
        x = h
    np.multiply(x, dy, out=h)
    if g is not dy:
        g[...] = dy


def _product_kept(blocks_, scratch, columns):
    """As ``_product``, keeping dy and x - mean: the product goes to scratch[2]."""
    (dy, x), (m,), (g, h, gh) = blocks_, columns, scratch
    np.subtract(x, m, out=h)                        # x - mean
    if g is not dy:
        g[...] = dy
    np.multiply(g, h, out=gh)


def batch_norm_backward_elemt(dy, xhat, gamma, inv_std, mean_dy, mean_dy_xhat,
                              out_dtype=None, *, x=None, mean=None, out=None, kept=None):
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
    ``kept``: the third value of ``batch_norm_backward_reduce(...,
    keep=True)`` for the same dy, x and mean, the call just before on this
    thread: dy and x - mean are then taken as it left them (the same bits).

    dy, xhat, x: (B, C, L); gamma, inv_std, mean_dy, mean_dy_xhat, mean: (C,).
    """
    inv_std = _f64(inv_std)
    scale = np.multiply(gamma, inv_std, dtype=np.float64)
    coef = _f64(mean_dy_xhat)
    if xhat is None:
        coef = coef * inv_std
        src, mean = x, _f64(mean)
    else:
        src, mean = xhat, None                      # src is xhat already
    dx = np.empty(dy.shape, out_dtype or dy.dtype) if out is None else out
    if kept is not None:                            # (dy, x - mean) already in float64
        return blocks.each_kept(kept, 3, _input_gradient, (None, coef, _f64(mean_dy), scale), dx)
    return blocks.each((dy, src), 2, _input_gradient, (mean, coef, _f64(mean_dy), scale), dx)


def _input_gradient(blocks_, scratch, columns):
    """One block of batch_norm_backward_elemt: from dy and x or xhat (float64),
    leaves dx in scratch[0]."""
    (dy, x), (m, cf, mdy, scale), (t, h) = blocks_[:2], columns, scratch[:2]
    np.subtract(dy, mdy, out=t)                     # dy - mean_dy
    if m is not None:
        np.subtract(x, m, out=h)                    # x - mean
        x = h
    np.multiply(x, cf, out=h)                       # xhat * mean_dy_xhat
    t -= h
    t *= scale                                      # gamma * inv_std


def running_update(moving, batch_stat, momentum, out=None):
    """MindSpore's convention: momentum is the weight of the *old* value.

    ::

        moving_new = momentum * moving + (1 - momentum) * batch_stat   (C,)

    (PyTorch's momentum=0.1 is the same update as MindSpore's 0.9.) In
    float64; ``out``: an optional float64 array for the result (may be ``moving``).
    """
    # (_f64: float32 moving statistics are converted exactly, then multiplied in float64)
    new = np.multiply(_f64(moving), momentum, out=out)
    return np.add(new, np.multiply(batch_stat, 1.0 - momentum), out=new)


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
