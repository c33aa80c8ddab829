"""Initializers: names, numbers, arrays, objects; same values on every call and rank."""
import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm, init
from mpibn.init import initializer


@pytest.mark.parametrize("name,value", [("zeros", 0.0), ("Zero", 0.0), ("ONES", 1.0), ("one", 1.0)])
def test_constant_names_case_insensitive(name, value):
    out = initializer(name, (3,), np.float32, "gamma")
    assert out.dtype == np.float32 and (out == value).all()


@pytest.mark.parametrize("name,check", [
    ("normal", lambda a: abs(a).max() < 0.06 and a.std() > 0.001),
    ("uniform", lambda a: abs(a).max() <= 0.07 and a.std() > 0.01),
    ("TruncatedNormal", lambda a: abs(a).max() <= 2.0 and a.std() > 0.001),
])
def test_random_names_are_deterministic(name, check):
    a = initializer(name, (64,), np.float64, "gamma")
    b = initializer(name, (64,), np.float64, "gamma")
    assert check(a)
    assert a.tobytes() == b.tobytes()           # no hidden global state: same on every rank
    assert a.tobytes() != initializer(name, (64,), np.float64, "beta").tobytes()


@pytest.mark.parametrize("name", ["xavier_uniform", "Xavier_Normal", "he_uniform", "he_normal"])
def test_fan_based_names_reject_1d_like_mindspore(name):
    with pytest.raises(ValueError, match="gamma_init.*fewer than 2 dimensions"):
        initializer(name, (3,), np.float32, "gamma", "gamma_init")


def test_fan_based_initializers_work_on_2d():
    w = init.XavierUniform()((8, 4), np.float64, "w")
    assert w.shape == (8, 4) and abs(w).max() <= np.sqrt(6 / 12)
    h = init.HeNormal(seed=1)((16, 8), np.float64, "w")
    assert 0.2 < h.std() < 0.8      # sqrt(2/8) = 0.5


def test_numbers_arrays_and_objects():
    assert (initializer(2, (2,), np.float32, "g") == 2).all()
    assert (initializer(0.5, (2,), np.float64, "g") == 0.5).all()
    arr = np.array([1.0, 2.0, 3.0])
    out = initializer(arr, (3,), np.float16, "g")
    assert out.dtype == np.float16 and (out == arr).all() and out is not arr
    assert (initializer(init.Constant(7), (2,), np.float32, "g") == 7).all()
    n1 = initializer(init.Normal(sigma=1.0, seed=5), (4,), np.float64, "g")
    n2 = initializer(init.Normal(sigma=1.0, seed=5), (4,), np.float64, "other")
    assert n1.tobytes() == n2.tobytes()          # an explicit seed wins over the name


@pytest.mark.parametrize("bad,exc,match", [
    ("glorot", ValueError, "gamma_init='glorot' is not a known initializer"),
    (True, TypeError, "bool"),
    (np.ones(4), ValueError, r"gamma_init has shape \(4,\); expected \(3,\)"),
    (np.array(["a", "b", "c"]), TypeError, "dtype"),
    (np.array([1.0, np.nan, 1.0]), ValueError, "NaN"),
    (float("inf"), ValueError, "not finite"),
    ([1, 2, 3], TypeError, "gamma_init must be"),
])
def test_bad_initializers_name_the_argument(bad, exc, match):
    with pytest.raises(exc, match=match):
        SyncBatchNorm(3, gamma_init=bad, comm=MPI.COMM_SELF)


def test_layer_parameters_from_initializers():
    bn = SyncBatchNorm(3, gamma_init="normal", beta_init=0.25, moving_mean_init=np.array([1., 2., 3.]),
                       moving_var_init="ones", dtype=np.float64, comm=MPI.COMM_SELF)
    again = SyncBatchNorm(3, gamma_init="normal", comm=MPI.COMM_SELF, dtype=np.float64)
    assert bn.gamma.data.tobytes() == again.gamma.data.tobytes()
    assert (bn.beta.data == 0.25).all() and list(bn.moving_mean.data) == [1, 2, 3]


def test_negative_moving_variance_rejected():
    with pytest.raises(ValueError, match="negative"):
        SyncBatchNorm(2, moving_var_init=-1.0, comm=MPI.COMM_SELF)
