"""The benchmark's harness, shared by ``mpibn bench`` (``run``) and ``mpibn bench --grid`` (``grid``).

Data and layers, torch when installed, the two timers, the peak-memory
probe, the progress line, where results go, and workers started under
mpiexec that answer in a JSON file. No module state: every setting comes in
as an argument. ``python -m mpibn.cli.bench`` runs ``__main__``, which
nothing imports, so no module is ever loaded twice.
"""
import json
import math
import os
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from ..launch import run_under_mpiexec

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# best_of: a batch of calls per timed sample lasts at least this long.
SAMPLE_S = 2e-3


def load_torch(threads):
    """torch and torch.nn.functional, on ``threads`` threads; (None, None) without torch."""
    try:
        import torch
        import torch.nn.functional as functional
    except ImportError:
        return None, None
    torch.set_num_threads(threads)
    return torch, functional


def progress(text):
    sys.stderr.write(f"\r\033[K{text}")
    sys.stderr.flush()


def data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def layer(channels, dtype, comm=None, **kw):
    from mpibn.comm import _mpi
    from mpibn.layer import SyncBatchNorm
    MPI = _mpi()                  # one clear line (MPIUnavailable) when there is no MPI library
    bn = SyncBatchNorm(channels, dtype=dtype, comm=comm or MPI.COMM_SELF, **kw).set_train(True)
    bn.gamma.data[...] = np.linspace(0.5, 1.5, channels)
    bn.beta.data[...] = np.linspace(-0.2, 0.2, channels)
    return bn


# -- timers ---------------------------------------------------------------------------

def interleaved(candidates, repeats, warmup, barrier=None):
    """{name: median seconds}: each repeat runs every candidate once, in turn."""
    times = {name: [] for name in candidates}
    for i in range(warmup + repeats):
        for name, fn in candidates.items():
            if barrier:
                barrier()
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def best_of(candidates, rounds, barrier=None, agree=None, clock=time.perf_counter, sample=SAMPLE_S):
    """{name: best seconds per call}: rounds of interleaved batches of calls.

    Under MPI, ``agree`` makes every rank use rank 0's batch sizes (a
    collective must be called the same number of times on every rank)."""
    inner = {}
    for name, fn in candidates.items():
        fn()                                           # warm-up: caches, plans, buffers
        t0 = clock()
        fn()
        inner[name] = max(1, int(sample / max(clock() - t0, 1e-6)))
    if agree:
        inner = agree(inner)
    best = {name: math.inf for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            n = inner[name]
            if barrier:
                barrier()
            t0 = clock()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (clock() - t0) / n)
    return best


def peak_temp(fn, keep_bytes):
    """Peak bytes allocated while fn runs, less keep_bytes (its result)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del out
    return max(0, peak - keep_bytes)


# -- processes and files ----------------------------------------------------------------

def pinned(threads):
    """Thread counts must be fixed before NumPy, BLAS or torch start their pools,
    that is before this process imported NumPy: a fresh process gets them."""
    return all(os.environ.get(var) == str(threads) for var in THREAD_VARS)


def default_out(smoke):
    """Where results go without ``--out``: the current directory (a smoke run: a new
    temporary directory). Never docs/ of a checkout: the committed numbers change
    only when asked, with ``--out docs``."""
    if smoke:
        return tempfile.mkdtemp(prefix="mpibn-bench-smoke-")
    return os.getcwd()


def worker_json(nprocs, module, flag, args, env=None, timeout=None, quiet=False):
    """Run ``module flag PATH *args`` under ``mpiexec -n nprocs``; the JSON its rank 0
    wrote to PATH, or None when the job failed (exit code, time out, no JSON)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        rc = run_under_mpiexec(nprocs, module, [flag, path, *args], env=env, timeout=timeout,
                               quiet=quiet)
        if rc != 0:
            return None
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return None
    finally:
        os.unlink(path)
