"""mpibn: reference synchronized batch normalization (MindSpore's nn.SyncBatchNorm)
in pure NumPy with explicit forward and backward passes, synchronised over MPI.

Rooms: ``mpibn.functional`` (the math, no MPI), ``mpibn.comm`` (group
communicators and the one Allreduce per pass), ``mpibn.layer`` (the
MindSpore-shaped object), ``mpibn.init`` (initializers),
``mpibn.checkpoint`` (state and atomic checkpoints), ``mpibn.agree`` (ranks
agree on the construction arguments).
"""
__version__ = "0.1.0"

from .layer import Parameter, SyncBatchNorm  # noqa: E402
from . import functional, init  # noqa: E402
from .checkpoint import load_checkpoint, load_param_into_net, save_checkpoint  # noqa: E402

__all__ = ["SyncBatchNorm", "Parameter", "functional", "init", "save_checkpoint", "load_checkpoint",
           "load_param_into_net", "__version__"]
