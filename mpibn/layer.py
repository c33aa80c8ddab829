"""The layer room: MindSpore's ``nn.SyncBatchNorm`` as a NumPy object.

It validates arguments, keeps parameters and moving statistics, decides
between batch and moving statistics, and composes math -> comm -> math.
It holds no formula of its own (those are in ``mpibn.functional``) and no
MPI call of its own (those are in ``mpibn.comm``).

Construction is a **collective** over ``comm``: every rank of ``comm``
must construct the layer, in the same order relative to other layers,
because the group communicator is made with ``Comm.Split`` (and then shared
by every later layer with the same ``process_groups``).
"""
import math
import numbers

import numpy as np

from . import functional as F
from .comm import RowExchange, group_comm_for, local_problem
from .errors import BACKWARD_TWICE, NO_FORWARD, Problem, check_grad, check_input
from .init import initializer

__all__ = ["SyncBatchNorm", "Parameter"]

_DTYPES = (np.float16, np.float32, np.float64)


class Parameter:
    """A named array, as MindSpore's Parameter: ``.name``, ``.data`` (C,),
    ``.requires_grad`` and ``.grad`` (None until a backward fills it)."""

    def __init__(self, data, name, requires_grad):
        self.data = data
        self.name = name
        self.requires_grad = requires_grad
        self.grad = None

    def __repr__(self):
        return (f"Parameter(name={self.name!r}, shape={self.data.shape}, dtype={self.data.dtype}, "
                f"requires_grad={self.requires_grad})")


def _check_args(num_features, eps, momentum, affine, use_batch_statistics, dtype, nonfinite):
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be an int, got {type(num_features).__name__}: {num_features!r}")
    if num_features < 1:
        raise ValueError(f"num_features must be at least 1, got {num_features}")
    if isinstance(eps, bool) or not isinstance(eps, (float, np.floating)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}: {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1], got {type(momentum).__name__}: {momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in range [0, 1], got {momentum!r}")
    if not isinstance(affine, (bool, np.bool_)):
        raise TypeError(f"affine must be a bool, got {type(affine).__name__}: {affine!r}")
    if not (use_batch_statistics is None or isinstance(use_batch_statistics, (bool, np.bool_))):
        raise ValueError(f"use_batch_statistics must be None, True or False, got {use_batch_statistics!r}")
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float16, float32 or float64, got {dtype!r}") from None
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
    if nonfinite not in ("raise", "propagate"):
        raise ValueError(f"nonfinite must be 'raise' or 'propagate', got {nonfinite!r}")
    return int(num_features), float(eps), float(momentum), bool(affine), dtype


class SyncBatchNorm:
    """Batch normalization synchronised over the ranks of each process group.

    Arguments, defaults and exceptions as MindSpore's ``nn.SyncBatchNorm``;
    keyword-only extras:

    * ``dtype``: dtype of the parameters and moving statistics (float32).
    * ``comm``: parent MPI communicator (default ``MPI.COMM_WORLD``); ranks
      in ``process_groups`` are ranks of ``comm``.
    * ``nonfinite``: ``'raise'`` (default) makes NaN or Inf in a training
      batch a FloatingPointError on every rank of the group, with the moving
      statistics left as they were; ``'propagate'`` lets IEEE values through
      as other frameworks do.

    The layer starts in eval mode (``training`` is False), as in MindSpore.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.9, affine=True, gamma_init="ones",
                 beta_init="zeros", moving_mean_init="zeros", moving_var_init="ones",
                 use_batch_statistics=None, process_groups=None, *, dtype=np.float32, comm=None,
                 nonfinite="raise"):
        num_features, eps, momentum, affine, dtype = _check_args(
            num_features, eps, momentum, affine, use_batch_statistics, dtype, nonfinite)
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.use_batch_statistics = use_batch_statistics
        self.process_groups = process_groups
        self.dtype = dtype
        self.nonfinite = nonfinite
        self.training = False

        shape = (num_features,)
        self.gamma = Parameter(initializer(gamma_init, shape, dtype, "gamma", "gamma_init"), "gamma", affine)
        self.beta = Parameter(initializer(beta_init, shape, dtype, "beta", "beta_init"), "beta", affine)
        self.moving_mean = Parameter(
            initializer(moving_mean_init, shape, dtype, "mean", "moving_mean_init"), "mean", False)
        self.moving_variance = Parameter(
            initializer(moving_var_init, shape, dtype, "variance", "moving_var_init"), "variance", False)
        if (self.moving_variance.data < 0).any():
            raise ValueError(f"moving_var_init gives negative variances: {self.moving_variance.data}")

        if comm is None:
            from mpi4py import MPI
            comm = MPI.COMM_WORLD
        if not hasattr(comm, "Split"):
            raise TypeError(f"comm must be an mpi4py intracommunicator, got {type(comm).__name__}")
        self.group_comm = group_comm_for(comm, process_groups)     # collective on first use
        self._stats_exchange = RowExchange(self.group_comm, num_features, 2)  # [mean, m2] per rank
        self._grad_exchange = RowExchange(self.group_comm, num_features, 2)   # [sum_dy, sum_dy_xhat]
        self._saved = None
        self._backward_done = False
        self.batch_mean = None     # float64 (C,) statistics of the last training forward
        self.batch_var = None

    # -- MindSpore-style surface --------------------------------------------------------

    def set_train(self, mode=True):
        """Training mode on (default) or off; returns the layer."""
        self.training = bool(mode)
        return self

    def trainable_params(self):
        return [p for p in (self.gamma, self.beta) if p.requires_grad]

    def get_parameters(self):
        return [self.gamma, self.beta, self.moving_mean, self.moving_variance]

    def __repr__(self):
        return (f"SyncBatchNorm(num_features={self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, use_batch_statistics={self.use_batch_statistics}, "
                f"process_groups={self.process_groups}, dtype={self.dtype})")

    def _context(self, what):
        return f"SyncBatchNorm(num_features={self.num_features}).{what}"

    @property
    def uses_batch_statistics(self):
        """True when the next forward normalises with (synchronised) batch statistics."""
        if self.use_batch_statistics is None:
            return self.training
        return self.use_batch_statistics

    def close(self):
        """Release this layer's share of the group communicator."""
        if self.group_comm is not None:
            self.group_comm.release()
            self.group_comm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- forward ------------------------------------------------------------------------

    def __call__(self, x):
        return self.construct(x)

    def construct(self, x):
        """y = gamma * (x - mean) / sqrt(var + eps) + beta, x (N, C) or (N, C, H, W)."""
        self._saved = None
        if self.uses_batch_statistics:
            mean, inv_std, count = self._batch_statistics(x)
        else:
            local_problem(check_input(x, self.num_features), self.group_comm, self._context("construct"))
            mean = self.moving_mean.data.astype(np.float64)
            inv_std = F.inv_std_from_var(self.moving_variance.data, self.eps)
            count = None
        x3 = F.as_ncl(x)
        y = F.batch_norm_elemt(x3, mean, inv_std, self.gamma.data, self.beta.data)
        self._saved = (x3, x.shape, mean, inv_std, count)
        self._backward_done = False
        return y.reshape(x.shape)

    def _batch_statistics(self, x):
        """Local moments -> the one Allreduce -> group statistics; updates moving stats."""
        problem = check_input(x, self.num_features)
        count, local = 0, None
        if problem is None:
            count, mean, m2 = F.batch_norm_stats(F.as_ncl(x))
            local = (mean, m2)
        counts, rows = self._stats_exchange.exchange(problem, count, local, self._context("construct"))
        total, mean, m2 = F.merge_stats(counts, rows[:, 0], rows[:, 1])
        if total <= 1:
            raise ValueError(f"{self._context('construct')}: expected more than 1 value per channel in "
                             f"training, got {total} over group ranks {list(self.group_comm.ranks)} "
                             f"(per-rank counts {counts.astype(int).tolist()})")
        if self.nonfinite == "raise":
            self._check_finite(rows)
        var = m2 / total
        # Only now, with every check passed on every rank, does state change.
        self.moving_mean.data = F.running_update(
            self.moving_mean.data, mean, self.momentum).astype(self.dtype)
        self.moving_variance.data = F.running_update(
            self.moving_variance.data, m2 / (total - 1), self.momentum).astype(self.dtype)
        self.batch_mean, self.batch_var = mean, var
        return mean, F.inv_std_from_var(var, self.eps), total

    def _check_finite(self, rows):
        bad = ~np.isfinite(rows).all(axis=1)          # (P, C)
        if bad.any():
            where = [(self.group_comm.ranks[r], c) for r, c in zip(*np.nonzero(bad))]
            listed = ", ".join(f"rank {r} channel {c}" for r, c in where[:8])
            more = f" and {len(where) - 8} more" if len(where) > 8 else ""
            raise FloatingPointError(f"{self._context('construct')}: NaN or Inf in the training batch at "
                                     f"{listed}{more}; moving statistics left unchanged "
                                     f"(pass nonfinite='propagate' to let IEEE values through)")

    # -- backward -----------------------------------------------------------------------

    def backward(self, dy):
        """dx for the last forward; sets gamma.grad and beta.grad (this rank's share)."""
        saved = self._saved
        synced = saved[4] is not None if saved is not None else self.uses_batch_statistics
        if saved is None:
            problem = Problem(NO_FORWARD)
        elif self._backward_done:
            problem = Problem(BACKWARD_TWICE)
        else:
            problem = check_grad(dy, saved[1])
        context = self._context("backward")
        if not synced:
            local_problem(problem, self.group_comm, context)

        sums = None
        if problem is None:
            x3, shape, mean, inv_std, count = saved
            dy3 = F.as_ncl(dy)
            xhat = (x3 - mean[:, None]) * inv_std[:, None]
            sums = F.batch_norm_backward_reduce(dy3, xhat)
        if synced:
            _, rows = self._grad_exchange.exchange(problem, 0, sums, context)
            group_sum_dy, group_sum_dy_xhat = rows.sum(axis=0)    # rank order: reproducible
            mean_dy, mean_dy_xhat = group_sum_dy / count, group_sum_dy_xhat / count
        else:
            mean_dy = mean_dy_xhat = np.zeros(self.num_features)
        dx = F.batch_norm_backward_elemt(dy3, xhat, self.gamma.data, inv_std, mean_dy, mean_dy_xhat,
                                         out_dtype=x3.dtype)
        if self.affine:
            self.gamma.grad = sums[1].astype(self.dtype)
            self.beta.grad = sums[0].astype(self.dtype)
        self._backward_done = True
        return dx.reshape(shape)
