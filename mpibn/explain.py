"""Deprecated: moved to ``mpibn.cli.explain``; this alias is removed in the next release."""
from .cli.explain import BufferTap, check_setup, default_groups, make_data, run, shard_sizes  # noqa: F401
