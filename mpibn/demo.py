"""Deprecated: moved to ``mpibn.cli.demo``; this alias is removed in the next release."""
from .cli.demo import run, shard_bounds  # noqa: F401
