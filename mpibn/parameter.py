"""``Parameter``: a named array, as MindSpore's, held by the layer and by checkpoints.

Its own module so that ``mpibn.layer`` (which holds parameters) and
``mpibn.checkpoint`` (which reads them back from a file) both import it at
the top, and neither imports the other for it.
"""

__all__ = ["Parameter"]


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
