"""``python -m mpibn.cli.bench``: what ``mpibn bench`` re-executes, alone or under mpiexec."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
