"""Deprecated: moved to ``mpibn.cli.bench.grid`` (``mpibn bench --grid``); this alias is removed in the next release."""
from .cli.bench.grid import best_of, run_grid, torch_step, verdicts  # noqa: F401
