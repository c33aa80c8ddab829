"""scripts/train_data_parallel.py: data-parallel training with SyncBatchNorm
equals one-process training on the concatenated batch (a short version).

Serially (COMM_SELF): mpibn's layer trained for a few steps equals the
script's independent textbook batch norm. Under mpiexec (2 ranks or more):
sync training equals the one-process reference to 1e-10, and per-rank batch
norm (the negative control) does not.
"""
import importlib.util
import os

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "train_data_parallel.py")


def _script():
    spec = importlib.util.spec_from_file_location("train_data_parallel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHORT = dict(steps=6, batch=40, lr=0.5, hidden=8, seed=3)


def test_synthetic_fallback_has_the_digits_shape():
    tdp = _script()
    x_train, y_train, x_test, y_test, name = tdp.load_data("synthetic")
    assert x_train.shape[1] == x_test.shape[1] == 64 and x_train.dtype == np.float64
    assert set(np.unique(y_train)) == set(range(10)) and len(y_test) == 300
    assert "synthetic" in name


def test_one_rank_layer_equals_textbook_batch_norm():
    tdp = _script()
    data = tdp.load_data("auto")
    ref = tdp.train("reference", data, **SHORT)
    sync = tdp.train("sync", data, MPI.COMM_SELF, **SHORT)
    again = tdp.train("sync", data, MPI.COMM_SELF, **SHORT)
    assert np.abs(sync["params"] - ref["params"]).max() < 1e-12
    assert np.abs(sync["loss"] - ref["loss"]).max() < 1e-12
    assert np.abs(sync["moving"] - ref["moving"]).max() < 1e-12
    assert np.array_equal(sync["params"], again["params"])           # reproducible, bit for bit
    assert sync["loss"][-1] < sync["loss"][0]                         # it does train
    assert np.abs(sync["params"][-1] - sync["params"][0]).max() > 1e-3


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_data_parallel_equals_concatenated_batch_and_local_bn_does_not():
    comm = MPI.COMM_WORLD
    tdp = _script()
    data = tdp.load_data("auto")
    batch = 10 * comm.Get_size() * (comm.Get_size() + 1) // 2       # shards >= 2 samples
    opts = dict(SHORT, batch=batch)
    ref = tdp.train("reference", data, **opts)
    sync = tdp.train("sync", data, comm, **opts)
    local = tdp.train("local", data, comm, **opts)
    first = comm.bcast(sync["params"][-1], root=0)
    # Every collective is done; assert on every rank.
    assert np.abs(sync["params"] - ref["params"]).max() < 1e-10
    assert np.abs(sync["loss"] - ref["loss"]).max() < 1e-10
    assert np.abs(sync["moving"] - ref["moving"]).max() < 1e-10
    assert np.abs(sync["params"][-1] - first).max() < 1e-14          # ranks agree
    assert np.abs(local["params"][-1] - ref["params"][-1]).max() > 1e-6
    assert np.abs(local["moving"] - ref["moving"]).max() > 1e-6
