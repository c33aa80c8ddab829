"""mpibn: reference synchronized batch normalization (MindSpore's nn.SyncBatchNorm)
in pure NumPy with explicit forward and backward passes, synchronised over MPI.

Rooms: ``mpibn.functional`` (the math, no MPI), ``mpibn.comm`` (group
communicators and the one Allreduce per pass), ``mpibn.sync`` (math -> comm
-> math, stateless), ``mpibn.layer`` (the MindSpore-shaped object),
``mpibn.errors`` (every cross-rank error), ``mpibn.init`` (initializers),
``mpibn.agree`` (ranks agree on how a layer is built), ``mpibn.checkpoint``
(state, atomic checkpoints), ``mpibn.testing`` (the reference in one
process, without MPI, for other frameworks' test suites).

The public API is ``__all__``: the names below and the modules
``functional``, ``init``, ``testing``, ``golden`` and ``verify``. Every
other module stays importable, with no compatibility promise. The names
load on first use, so ``import mpibn`` imports neither NumPy nor mpi4py.
"""
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["SyncBatchNorm", "Parameter", "sync_batch_norm", "sync_batch_norm_backward", "group_comm_for",
           "make_exchange", "save_checkpoint", "load_checkpoint", "load_param_into_net", "AgreementError",
           "CollectiveTimeout", "GroupFailed", "MPIUnavailable", "__version__", "functional", "init", "testing", "golden", "verify"]

# Public name -> the module that defines it (its one home).
_HOMES = {
    "SyncBatchNorm": "layer",
    "Parameter": "parameter",
    "sync_batch_norm": "sync",
    "sync_batch_norm_backward": "sync",
    "group_comm_for": "comm",
    "make_exchange": "comm",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "load_param_into_net": "checkpoint",
    "AgreementError": "errors",
    "CollectiveTimeout": "errors",
    "GroupFailed": "errors",
    "MPIUnavailable": "comm",
}

# Submodules reachable as attributes (``mpibn.functional``) without an import of their own.
_MODULES = ("functional", "init", "testing", "golden", "verify", "comm", "sync", "layer", "agree",
            "checkpoint", "errors", "parameter", "env", "watchdog")

if TYPE_CHECKING:        # for IDEs and type checkers only (go-to-definition); never run
    from . import functional, golden, init, testing, verify  # noqa: F401
    from .checkpoint import load_checkpoint, load_param_into_net, save_checkpoint  # noqa: F401
    from .comm import MPIUnavailable, group_comm_for, make_exchange  # noqa: F401
    from .errors import AgreementError, CollectiveTimeout, GroupFailed  # noqa: F401
    from .layer import SyncBatchNorm  # noqa: F401
    from .parameter import Parameter  # noqa: F401
    from .sync import sync_batch_norm, sync_batch_norm_backward  # noqa: F401


def __getattr__(name):
    # Imported on first use (PEP 562), so that ``import mpibn.functional``
    # (the math) does not import the rest, nor initialise MPI.
    import importlib
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_MODULES))
