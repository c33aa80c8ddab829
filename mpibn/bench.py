"""Deprecated: moved to ``mpibn.cli.bench`` (``mpibn bench``); this alias is removed in the next release."""
import sys

from .cli.bench.run import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
