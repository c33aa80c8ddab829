"""Shared helpers. Unmarked tests must not depend on the number of ranks:
they use ``MPI.COMM_SELF`` so that they run alike serially and on every rank
under ``mpiexec -n 4 ... --with-mpi``. MPI-marked tests use COMM_WORLD."""
import numpy as np
import pytest
from mpi4py import MPI


@pytest.fixture
def world():
    return MPI.COMM_WORLD


def global_batch(seed, shape, offset=0.0, scale=1.0, dtype=np.float64):
    """The same global (x, dy) on every rank: random, never an all-ones dy."""
    rng = np.random.default_rng(seed)
    x = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def shard_slices(sizes):
    """[slice] per rank from a list of shard sizes."""
    ends = np.cumsum([0] + list(sizes))
    return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]


def allgather(comm, value):
    """Lowercase (pickle) gather of small test results: fine outside the hot path."""
    return comm.allgather(value)
