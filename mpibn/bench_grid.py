"""Deprecated: moved to ``mpibn.cli.bench.grid`` (``mpibn bench --grid``); this alias is removed in the next release."""
from .cli.bench import best_of  # noqa: F401
from .cli.bench.grid import run_grid, torch_step, verdicts  # noqa: F401
