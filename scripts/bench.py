#!/usr/bin/env python3
"""Refresh the committed numbers: ``mpibn bench --out docs`` of this checkout (mpibn/cli/bench/).

``mpibn bench`` itself writes into the current directory; this script, run
from a checkout to update docs/performance.* (or docs/performance-grid.*
with ``--grid``), passes ``--out <checkout>/docs`` unless given an ``--out``.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mpibn.cli.bench.run import main  # noqa: E402


def with_docs_out(argv):
    """``argv`` with ``--out <checkout>/docs`` added unless it names an ``--out``, asks for
    help, or is a ``--smoke`` run (whose numbers must never replace the committed ones)."""
    if any(a == "--out" or a.startswith("--out=") or a in ("-h", "--help", "--smoke") for a in argv):
        return list(argv)
    return list(argv) + ["--out", os.path.join(ROOT, "docs")]


if __name__ == "__main__":
    sys.exit(main(with_docs_out(sys.argv[1:])))
