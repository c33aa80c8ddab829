"""Start a command under mpiexec when we are not already under one.

``python -m mpibn demo`` run by hand is a single process; the sub-commands
that need several ranks relaunch themselves, and the benchmark starts its
workers, as ``mpiexec -n N python -m mpi4py -m MODULE ...`` (``-m mpi4py``
so that an exception on one rank aborts every rank instead of leaving them
waiting). This module does not import mpi4py: deciding must not initialise MPI.
"""
import os
import shutil
import subprocess
import sys

# Variables that MPICH/Hydra, Open MPI, PMIx and Slurm set in every rank.
_RANK_VARIABLES = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def under_mpiexec():
    return any(v in os.environ for v in _RANK_VARIABLES)


def find_mpiexec():
    """mpiexec next to this Python (a venv with the ``mpich`` wheel) or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if found is None:
        raise SystemExit("mpibn: no mpiexec found; install the 'mpich' extra "
                         "(pip install 'mpibn[mpich]') or a system MPI")
    return found


def run_under_mpiexec(nprocs, module, args, env=None, timeout=None, quiet=False):
    """Run ``python -m mpi4py -m module *args`` on ``nprocs`` ranks; return its exit code.

    ``env``: the ranks' environment (default ours); ``quiet``: their standard
    output is dropped. Past ``timeout`` seconds the job is killed, said on
    stderr, and the exit code is 124.
    """
    cmd = [find_mpiexec(), "-n", str(nprocs), sys.executable, "-m", "mpi4py", "-m", module, *args]
    try:
        return subprocess.run(cmd, env=env, timeout=timeout,
                              stdout=subprocess.DEVNULL if quiet else None).returncode
    except subprocess.TimeoutExpired:
        print(f"mpibn: {' '.join(cmd)} did not finish in {timeout} s", file=sys.stderr)
        return 124
