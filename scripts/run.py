#!/usr/bin/env python3
"""Set up a virtual environment and run mpibn's main job or its tests.

    python3 scripts/run.py demo     # venv + install, then the 4-rank demo and the doc example
    python3 scripts/run.py test     # venv + install, then pytest serially and under mpiexec -n 4

Only the Python standard library is needed to start: the script creates
``.venv`` (or ``$MPIBN_VENV``), installs mpibn with its ``mpich`` and
``test`` extras (the ``mpich`` wheel brings ``mpiexec``), and runs.
Every MPI run is bounded by a timeout so that nothing can hang.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("MPIBN_VENV", os.path.join(ROOT, ".venv"))
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PY = os.path.join(BIN, "python")
NP = int(os.environ.get("MPIBN_NP", "4"))


def sh(*cmd, timeout=None):
    print("+", " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"run.py: timed out after {timeout} s: {' '.join(cmd)}", flush=True)
        return 124


def setup(extras):
    if not os.path.exists(PY):
        if sh(sys.executable, "-m", "venv", VENV):
            sys.exit("run.py: could not create the virtual environment")
    if sh(PY, "-m", "pip", "install", "--quiet", "-e", f".[{extras}]"):
        sys.exit("run.py: pip install failed")


def mpiexec(*args, timeout):
    return sh(os.path.join(BIN, "mpiexec"), "-n", str(NP), PY, "-m", "mpi4py", *args, timeout=timeout)


def main(argv):
    job = argv[1] if len(argv) > 1 else "demo"
    if job == "demo":
        setup("mpich")
        rc = sh(PY, "-m", "mpibn", "demo", "--np", str(NP), timeout=300)
        return rc or mpiexec("scripts/doc_example.py", timeout=120)
    if job == "test":
        setup("mpich,test")
        extra = argv[2:]
        serial = sh(PY, "-m", "pytest", "-q", *extra, timeout=1200)
        parallel = mpiexec("-m", "pytest", "-q", "--with-mpi", "-p", "no:cacheprovider", *extra,
                           timeout=1200)
        print(f"run.py: serial pytest exit {serial}, mpiexec -n {NP} pytest exit {parallel}")
        return serial or parallel
    sys.exit(f"usage: python3 scripts/run.py demo|test [pytest args]; got {job!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
