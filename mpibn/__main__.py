"""``python -m mpibn COMMAND``: the command line lives in ``mpibn.cli``."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
