"""Deprecated: moved to ``mpibn.cli.launch``; this alias is removed in the next release."""
from .cli.launch import find_mpiexec, under_mpiexec  # noqa: F401
