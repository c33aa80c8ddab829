"""The math room: synchronized batch norm as pure functions on NumPy arrays.

No MPI here (this module never imports mpi4py), so it can be read, tested
and called by other frameworks' test suites without a communicator.

The whole picture, per channel c, over a group of P ranks, rank r holding
n_r = N_r * H * W values of channel c (n_r may be 0):

forward::

    local moments   n_r, mean_r = sum(x)/n_r, m2_r = sum((x - mean_r)^2)
                                                     batch_norm_stats
    ONE Allreduce   every rank gets every rank's (n_r, mean_r, m2_r)
    global moments  N = sum n_r
                    mean = sum n_r mean_r / N
                    M2 = sum m2_r + sum n_r (mean_r - mean)^2
                                                     merge_stats
    normalise       var = M2 / N (biased), inv_std = 1/sqrt(var + eps)
                    xhat = (x - mean) * inv_std
                    y = gamma * xhat + beta         batch_norm_elemt

backward (loss L = sum over ranks of each rank's loss)::

    local sums      sum_dy_r = sum(dy), sum_dy_xhat_r = sum(dy * xhat)
                                                     batch_norm_backward_reduce
    ONE Allreduce   every rank gets every rank's two sums; add them in rank order
    dx              dx = gamma * inv_std * (dy - sum_dy/N - xhat * sum_dy_xhat/N)
                                                     batch_norm_backward_elemt
    dgamma, dbeta   this rank's own sum_dy_xhat_r and sum_dy_r (local: data
                    parallelism sums parameter gradients later, as PyTorch does)

Numerical choices:

* Everything accumulates in float64, whatever the input dtype.
* The second moment travels *centred* (m2_r about the rank's own mean),
  never as a raw sum of squares: sum(x^2)/N - mean^2 cancels every digit
  when |mean| >> std. m2_r is the corrected two-pass sum (Chan, Golub and
  LeVeque 1983), and the merge adds only non-negative terms.
* Moving variance uses the unbiased variance M2 / (N - 1) with the group's
  total count N (MindSpore's Ascend kernel uses the local count: a defect).

Shapes: x is (N, C) or (N, C, H, W). Internally every function works on a
(N, C, L) view (L = H * W, or 1 for 2-D input); per-channel vectors are (C,).
"""
import numpy as np

__all__ = [
    "as_ncl", "batch_norm_stats", "merge_stats", "inv_std_from_var",
    "batch_norm_elemt", "batch_norm_backward_reduce",
    "batch_norm_backward_elemt", "running_update",
]


def as_ncl(x):
    """View x of shape (N, C) or (N, C, H, W) as (N, C, L) without copying
    (when x is C-contiguous)."""
    if x.ndim == 4:
        return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
    return x[:, :, None]


def batch_norm_stats(x):
    """Local moments of one shard, per channel, in float64.

    ::

        n     = N * L                               (int, same for every channel)
        mean  = sum_{n,l} x[n, c, l] / n            (C,)
        m2    = sum_{n,l} (x[n, c, l] - mean)^2     (C,)

    Computed in two passes with the correction term of Chan, Golub and
    LeVeque: with mean0 the first-pass mean and d = x - mean0,
    ``mean = mean0 + sum(d)/n`` and ``m2 = sum(d^2) - sum(d)^2/n``. The first
    pass's rounding error (of order eps*|mean|) is removed, so the result is
    accurate even when |mean| >> std. An empty shard gives (0, 0, 0).

    x: (N, C, L) of any float dtype. Returns (n, mean, m2).
    """
    num, channels, length = x.shape
    count = num * length
    if count == 0:
        return 0, np.zeros(channels), np.zeros(channels)
    mean0 = np.add.reduce(x, axis=(0, 2), dtype=np.float64) / count
    d = x - mean0[:, None]                     # float64 (N, C, L)
    d_sum = d.sum(axis=(0, 2))
    m2 = np.einsum("ncl,ncl->c", d, d) - d_sum * d_sum / count
    return count, mean0 + d_sum / count, np.maximum(m2, 0.0)


def merge_stats(counts, means, m2s):
    """Moments of the concatenated batch from every rank's local moments.

    ::

        N    = sum_r n_r                                    (scalar)
        mean = sum_r n_r mean_r / N                         (C,)
        M2   = sum_r m2_r + sum_r n_r (mean_r - mean)^2     (C,)

    ("within-rank plus between-rank" sum of squares: every term is >= 0, so
    nothing cancels). The mean is formed as ``shift + sum n_r (mean_r -
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
    present = counts > 0
    shift = means[np.argmax(present)]
    weights = counts[:, None]
    # Empty ranks carry zero rows; masking keeps a stray non-finite value
    # on an empty rank from poisoning the sum.
    offsets = np.where(present[:, None], means - shift, 0.0)
    mean = shift + (weights * offsets).sum(axis=0) / total
    between = np.where(present[:, None], weights * (means - mean) ** 2, 0.0)
    return int(total), mean, m2s.sum(axis=0) + between.sum(axis=0)


def inv_std_from_var(var, eps):
    """inv_std = 1 / sqrt(var + eps), float64, (C,)."""
    return 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)


def batch_norm_elemt(x, mean, inv_std, gamma, beta, out_dtype=None):
    """Normalise with given statistics, then scale and shift.

    ::

        xhat = (x - mean) * inv_std                   (N, C, L)
        y    = gamma * xhat + beta                    (N, C, L)

    x - mean is taken first, in float64: it is exact or nearly so when x is
    close to the mean, which is where a folded ``x*scale + shift`` would
    cancel. Returns y in ``out_dtype`` (default: x's dtype).

    x: (N, C, L); mean, inv_std, gamma, beta: (C,).
    """
    scale = (np.asarray(gamma, np.float64) * inv_std)[:, None]
    y = (x - np.asarray(mean, np.float64)[:, None]) * scale
    y += np.asarray(beta, np.float64)[:, None]
    return y.astype(out_dtype or x.dtype, copy=False)


def batch_norm_backward_reduce(dy, xhat):
    """This rank's two per-channel sums for the backward pass, in float64.

    ::

        sum_dy      = sum_{n,l} dy[n, c, l]                 (C,)
        sum_dy_xhat = sum_{n,l} dy[n, c, l] * xhat[n, c, l] (C,)

    They are also this rank's dbeta and dgamma.
    dy, xhat: (N, C, L).
    """
    sum_dy = np.add.reduce(dy, axis=(0, 2), dtype=np.float64)
    sum_dy_xhat = np.einsum("ncl,ncl->c", dy, xhat, dtype=np.float64)
    return sum_dy, sum_dy_xhat


def batch_norm_backward_elemt(dy, xhat, gamma, inv_std, mean_dy, mean_dy_xhat,
                              out_dtype=None):
    """Input gradient of batch norm from the group's sums.

    With y = gamma * xhat + beta, xhat = (x - mean) * inv_std and mean, var
    taken over the group's N values (derivation in docs/derivation.md)::

        dx = gamma * inv_std * (dy - mean_dy - xhat * mean_dy_xhat)   (N, C, L)

    where mean_dy = sum_dy / N and mean_dy_xhat = sum_dy_xhat / N are the
    group's sums over its count N. With constant statistics (eval mode, or
    use_batch_statistics=False) pass mean_dy = mean_dy_xhat = 0, which gives
    dx = gamma * inv_std * dy.

    dy, xhat: (N, C, L); gamma, inv_std, mean_dy, mean_dy_xhat: (C,).
    """
    scale = (np.asarray(gamma, np.float64) * inv_std)[:, None]
    dx = dy - np.asarray(mean_dy, np.float64)[:, None]
    dx -= xhat * np.asarray(mean_dy_xhat, np.float64)[:, None]
    dx *= scale
    return dx.astype(out_dtype or dy.dtype, copy=False)


def running_update(moving, batch_stat, momentum):
    """MindSpore's convention: momentum is the weight of the *old* value.

    ::

        moving_new = momentum * moving + (1 - momentum) * batch_stat   (C,)

    (PyTorch's momentum=0.1 is the same update as MindSpore's 0.9.)
    """
    return momentum * np.asarray(moving, np.float64) + (1.0 - momentum) * batch_stat


def __getattr__(name):
    # The stateless synced functions compose this module with mpibn.comm,
    # which imports mpi4py; import them only when asked for, so that the
    # math stays importable (and testable) without MPI.
    if name in ("sync_batch_norm", "sync_batch_norm_backward"):
        from . import sync
        return getattr(sync, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
