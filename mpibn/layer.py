"""The layer room: MindSpore's ``nn.SyncBatchNorm`` as a NumPy object.

It validates arguments, keeps parameters and moving statistics, and decides
between batch and moving statistics; the stateless functions of
``mpibn.sync`` compose math -> comm -> math for it. It holds no formula of
its own (those are in ``mpibn.functional``) and no MPI call of its own
(those are in ``mpibn.comm``).

Construction is a **collective** over ``comm``: every rank of ``comm``
must construct the layer, in the same order relative to other layers,
because the group communicator is made with ``Comm.Split`` (and then shared
by every later layer with the same ``process_groups``). Before the Split,
one allgather checks that the ranks agree on the arguments (``mpibn.agree``).
"""
import inspect
import math
import numbers

import numpy as np

from . import checkpoint
from . import env, rounding, watchdog
from .agree import agree_construction
from .comm import _mpi, cached_group, forward_tag, group_comm_for, make_exchange, validate_process_groups
from .fingerprint import digest
from .init import initializer
from .parameter import Parameter
from .sync import sync_batch_norm, sync_batch_norm_backward

__all__ = ["SyncBatchNorm", "Parameter"]

_DTYPES = (np.float16, np.float32, np.float64)


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
    * ``debug_timeout``: seconds. Debug mode for the group (all layers that
      share its communicator): each collective becomes a non-blocking one
      with a deadline, and a rank that waits longer raises
      ``mpibn.CollectiveTimeout`` naming the ranks that never arrived.
      Also set by the environment variable ``MPIBN_DEBUG_TIMEOUT``.
      A timeout stops the group (fail-stop, docs/reliability.md): every
      later call on its layers raises ``mpibn.GroupFailed``, a rank that was
      only late stops at its next call, and a process that neither recovers
      nor ends is ended after ``MPIBN_FAILSTOP_GRACE`` s (``mpibn.watchdog``).
    * ``lockstep``: False (default) or True; None reads the environment
      variable ``MPIBN_LOCKSTEP`` (``1``/``0``). True is a promise that every
      rank of the group makes the same sequence of forward calls on this
      layer, eval ones included. Each row's call number then counts eval
      forwards too, so a rank that ran a forward in eval mode while its
      peers trained (it forgot ``set_train(True)``) arrives one call ahead
      at the next training collective, and every rank raises RuntimeError
      there instead of mixing statistics of two steps. Evaluating on some
      ranks only is then an error: leave it off for that. Why the default
      cannot catch this: docs/reliability.md.
    * ``exact``: False (default) or True: batch mean and variance correctly
      rounded from exact integer sums (``mpibn.exact``), still one Allreduce
      per pass; y and dx then do not depend, bit for bit, on how the group's
      batch is split across its ranks. Slower, and the integer limbs
      (``exact.SUMMED_WIDTH`` float64 per channel) travel on top of the rows
      (costs: docs/ground-truth.md). Every rank must pass the same value.

    The layer starts in eval mode (``training`` is False), as in MindSpore.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.9, affine=True, gamma_init="ones",
                 beta_init="zeros", moving_mean_init="zeros", moving_var_init="ones",
                 use_batch_statistics=None, process_groups=None, *, dtype=np.float32, comm=None,
                 nonfinite="raise", debug_timeout=None, exact=False, lockstep=None):
        if comm is None:
            comm = _mpi().COMM_WORLD       # one clear line when no MPI library can be loaded
        if not hasattr(comm, "Split"):
            raise TypeError(f"comm must be an mpi4py intracommunicator, got {type(comm).__name__}")
        self.comm = comm
        # Check this rank's arguments, then agree with every rank of comm
        # (one allgather) BEFORE the Split: a bad argument on one rank, or
        # ranks that disagree, raise on every rank instead of hanging.
        try:
            self._init_local(num_features, eps, momentum, affine, gamma_init, beta_init, moving_mean_init,
                             moving_var_init, use_batch_statistics, process_groups, dtype, nonfinite,
                             debug_timeout, exact, lockstep)
            self._shared_group = cached_group(comm, self._canonical_groups) is not None
            error = None
        except (TypeError, ValueError) as exc:
            error = exc
        agree_construction(comm, None if error else self.agreed_fields(), error,
                           "SyncBatchNorm construction")
        watchdog.disarm()          # every rank of comm answered: a stopped group's program recovered
        self._join(group_comm_for(comm, process_groups))     # collective on first use

    @classmethod
    def _on_group(cls, group_comm, *args, **kwargs):
        """``SyncBatchNorm(*args, **kwargs)`` on a group communicator made by the caller: no MPI.

        For ``mpibn.testing``, whose simulated ranks are threads of one
        process. ``comm=`` is required and only needs ``Get_size()``
        (process_groups are checked against it); every argument is checked
        as the constructor checks it. Skipped: the Split (``group_comm`` is
        the group, always a new one) and the allgather of the construction
        agreement (``mpibn.testing`` compares ``agreed_fields()`` of its
        simulated ranks itself).
        """
        bound = inspect.signature(cls).bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        layer = cls.__new__(cls)
        layer.comm = arguments.pop("comm")
        layer._shared_group = False
        layer._init_local(**arguments)
        layer._join(group_comm)
        return layer

    def _join(self, group_comm):
        """Take this rank's group communicator, the layer's exchange and serial on it."""
        self.group_comm = group_comm
        if self.debug_timeout is not None:
            self.group_comm.debug_timeout = self.debug_timeout
        # The group's one preallocated buffer serves both passes: forward sends
        # [mean, m2] per rank, backward [sum_dy, sum_dy_xhat]; tags tell the
        # layers and passes apart.
        self._exchange = make_exchange(self.group_comm, self.num_features, self.exact)
        self._serial = self.group_comm.new_layer_serial()
        self._calls = 0
        self._saved = None
        self.batch_mean = None     # float64 (C,) statistics of the last training forward
        self.batch_var = None

    #: Construction arguments every rank of ``comm`` must agree on (mpibn.agree).
    #: debug_timeout too: a non-blocking Iallreduce does not match a blocking Allreduce.
    #: The initial values of the four parameters are compared too (``agreed_fields``).
    AGREED_FIELDS = ("num_features", "eps", "momentum", "dtype", "affine", "use_batch_statistics",
                     "process_groups", "nonfinite", "debug_timeout", "exact", "lockstep")

    def agreed_fields(self):
        """{field: plain comparable value} for the construction agreement."""
        canon = {"dtype": lambda d: np.dtype(d).name,
                 "process_groups": lambda g: self._canonical_groups,
                 "use_batch_statistics": lambda u: None if u is None else bool(u),
                 # the group-wide environment switch counts too (see mpibn.comm)
                 "debug_timeout": lambda t: t if t is not None else env.debug_timeout()}
        fields = {f: canon.get(f, lambda v: v)(getattr(self, f)) for f in self.AGREED_FIELDS}
        # A rank that shares a communicator its peers no longer have (it missed
        # that the group stopped, or closed its layers differently) would skip
        # the Split they make: a hang. Compared here, it is an agreed error.
        fields["group communicator"] = "shared" if self._shared_group else "new"
        # A rank-dependent initializer (an ndarray that differs per rank) would
        # make the ranks train different models: compare a digest of the values.
        for arg, p in zip(("gamma_init", "beta_init", "moving_mean_init", "moving_var_init"),
                          self.get_parameters()):
            fields[f"initial {p.name} ({arg})"] = digest(p.data)
        return fields

    def _init_local(self, num_features, eps, momentum, affine, gamma_init, beta_init, moving_mean_init,
                    moving_var_init, use_batch_statistics, process_groups, dtype, nonfinite, debug_timeout,
                    exact=False, lockstep=None):
        """Argument checks and parameters: local, no communication."""
        num_features, eps, momentum, affine, dtype = _check_args(
            num_features, eps, momentum, affine, use_batch_statistics, dtype, nonfinite)
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.use_batch_statistics = use_batch_statistics
        self.process_groups = process_groups
        self.dtype = dtype
        self.nonfinite = nonfinite
        if not isinstance(exact, (bool, np.bool_)):
            raise TypeError(f"exact must be a bool, got {type(exact).__name__}: {exact!r}")
        self.exact = bool(exact)
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

        self.debug_timeout = env.check_debug_timeout(debug_timeout)
        env.debug_timeout()                  # a bad MPIBN_DEBUG_TIMEOUT is this rank's argument error
        self.lockstep = env.check_lockstep(lockstep)
        self._canonical_groups = validate_process_groups(process_groups, self.comm.Get_size())

    # -- MindSpore-style surface --------------------------------------------------------

    def set_train(self, mode=True):
        """Training mode on (default) or off; returns the layer."""
        self.training = bool(mode)
        return self

    def trainable_params(self):
        return [p for p in (self.gamma, self.beta) if p.requires_grad]

    def get_parameters(self):
        return [self.gamma, self.beta, self.moving_mean, self.moving_variance]

    def state_dict(self):
        """{parameter name: copy of its array}; see ``mpibn.checkpoint``."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state):
        """Load a ``state_dict()``: every name, shape and dtype checked first, all or nothing."""
        checkpoint.load_state_dict(self, state)

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

    def _check_open(self, what):
        # A closed layer's group has no communicator: computing would give
        # local statistics silently, so refuse (no peer waits: nothing was sent).
        if self.group_comm is None:
            raise RuntimeError(f"{self._context(what)}: the layer is closed; close() released its "
                               f"group communicator")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- forward and backward: the stateless functions in mpibn.sync do the work ---------

    def __call__(self, x):
        return self.construct(x)

    def construct(self, x):
        """y = gamma * (x - mean) / sqrt(var + eps) + beta, x (B, C) or (B, C, H, W),
        B the batch size (MindSpore writes N).

        With batch statistics: one Allreduce over the group, then the moving
        statistics are updated. With moving statistics: no communication.
        """
        self._check_open("construct")
        self._saved = None
        training = self.uses_batch_statistics
        # The call number in the row counts training forwards; with lockstep
        # eval forwards too, which no collective sees until the next
        # training call (where a rank that evaluated instead of training
        # shows up one call ahead).
        if training or self.lockstep:
            self._calls += 1
        y, saved = sync_batch_norm(
            x, self.gamma.data, self.beta.data, group_comm=self.group_comm, eps=self.eps,
            training=training, running_mean=self.moving_mean.data,
            running_var=self.moving_variance.data, momentum=self.momentum,
            nonfinite=self.nonfinite, exchange=self._exchange, tag=forward_tag(self._serial, self._calls),
            exact=self.exact)
        self._saved = saved
        if training:
            self.batch_mean, self.batch_var = saved.mean, saved.var
        return y

    def backward(self, dy):
        """dx for the last forward; sets gamma.grad and beta.grad (this rank's share).

        After a forward with batch statistics: one Allreduce over the group.
        """
        self._check_open("backward")
        dx, dgamma, dbeta = sync_batch_norm_backward(
            dy, self._saved, exchange=self._exchange, training=self.uses_batch_statistics)
        if self.affine:
            self.gamma.grad = rounding.cast(dgamma, self.dtype)
            self.beta.grad = rounding.cast(dbeta, self.dtype)
        return dx
