"""mpibn: reference synchronized batch normalization (MindSpore's nn.SyncBatchNorm)
in pure NumPy with explicit forward and backward passes, synchronised over MPI.

Rooms: ``mpibn.functional`` (the math, no MPI), ``mpibn.comm`` (group
communicators and the one Allreduce per pass), ``mpibn.sync`` (math -> comm
-> math, stateless), ``mpibn.layer`` (the MindSpore-shaped object),
``mpibn.init`` (initializers), ``mpibn.agree`` (ranks agree on how a layer is
built), ``mpibn.checkpoint`` (state, atomic checkpoints), ``mpibn.testing`` (the
reference in one process, without MPI, for other frameworks' test suites).
"""
__version__ = "0.1.0"

__all__ = ["SyncBatchNorm", "Parameter", "functional", "init", "save_checkpoint", "load_checkpoint",
           "load_param_into_net", "__version__"]


def __getattr__(name):
    # Imported on first use, so that ``import mpibn.functional`` (the math)
    # does not initialise MPI.
    if name in ("SyncBatchNorm", "Parameter"):
        from . import layer
        return getattr(layer, name)
    if name in ("save_checkpoint", "load_checkpoint", "load_param_into_net"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name in ("functional", "init", "comm", "sync", "layer", "agree", "checkpoint", "testing", "verify"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
