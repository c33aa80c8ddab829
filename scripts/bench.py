#!/usr/bin/env python3
"""The benchmark moved into the package: this runs ``mpibn bench`` (mpibn/cli/bench/)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpibn.cli.bench.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
