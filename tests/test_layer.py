"""The layer on one process (COMM_SELF): MindSpore semantics, dtypes, errors."""
import numpy as np
import pytest
from mpi4py import MPI

from mpibn import Parameter, SyncBatchNorm
from conftest import global_batch
from oracle import exact_batch_norm, plain_batch_norm, ulp_distance

SELF = MPI.COMM_SELF


def layer(c=3, **kw):
    kw.setdefault("comm", SELF)
    return SyncBatchNorm(c, **kw)


# -- construction -----------------------------------------------------------------------

def test_defaults_and_parameters():
    bn = layer(4)
    assert bn.training is False
    assert (bn.eps, bn.momentum, bn.affine, bn.use_batch_statistics) == (1e-5, 0.9, True, None)
    names = [(p.name, p.requires_grad) for p in bn.get_parameters()]
    assert names == [("gamma", True), ("beta", True), ("mean", False), ("variance", False)]
    for p, v in zip(bn.get_parameters(), [1, 0, 0, 1]):
        assert isinstance(p, Parameter) and p.data.shape == (4,) and p.data.dtype == np.float32
        assert (p.data == v).all() and p.grad is None
    assert bn.set_train() is bn and bn.training
    assert bn.set_train(False) is bn and not bn.training
    assert layer(2, affine=False).trainable_params() == []


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_features=2.0), TypeError, "num_features must be an int, got float: 2.0"),
    (dict(num_features=True), TypeError, "num_features must be an int"),
    (dict(num_features=0), ValueError, "num_features must be at least 1, got 0"),
    (dict(eps=1), TypeError, "eps must be a float, got int: 1"),
    (dict(eps="1e-5"), TypeError, "eps must be a float"),
    (dict(eps=-1e-5), ValueError, "eps must be a finite float > 0"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite float > 0"),
    (dict(momentum=1.5), ValueError, r"momentum must be in range \[0, 1\], got 1.5"),
    (dict(momentum=-0.1), ValueError, "momentum must be in range"),
    (dict(momentum="0.9"), TypeError, "momentum must be a float"),
    (dict(affine=1), TypeError, "affine must be a bool, got int: 1"),
    (dict(use_batch_statistics=1), ValueError, "use_batch_statistics must be None, True or False, got 1"),
    (dict(use_batch_statistics="yes"), ValueError, "use_batch_statistics"),
    (dict(dtype=np.int32), TypeError, "dtype must be float16, float32 or float64, got int32"),
    (dict(dtype="bogus"), TypeError, "dtype must be"),
    (dict(process_groups=((0,),)), TypeError, "process_groups must be a list"),
    (dict(process_groups=[(0,)]), TypeError, r"process_groups\[0\] must be a list"),
    (dict(process_groups=[[1]]), ValueError, r"rank id 1, outside \[0, 1\)"),
    (dict(process_groups=[[-1]]), ValueError, "outside"),
    (dict(process_groups=[[0], [0]]), ValueError, "rank id 0 appears twice"),
    (dict(process_groups=[[0.0]]), ValueError, "rank ids must be int"),
    (dict(process_groups=[[]]), ValueError, "empty"),
    (dict(comm="world"), TypeError, "comm must be an mpi4py intracommunicator"),
    (dict(nonfinite="ignore"), ValueError, "nonfinite must be"),
])
def test_bad_arguments_name_argument_and_value(kwargs, exc, match):
    kwargs = dict(kwargs)
    c = kwargs.pop("num_features", 3)
    kwargs.setdefault("comm", SELF)
    with pytest.raises(exc, match=match):
        SyncBatchNorm(c, **kwargs)


def test_int_momentum_and_numpy_eps_are_accepted():
    bn = layer(2, eps=np.float32(1e-3), momentum=1)
    assert bn.momentum == 1.0 and isinstance(bn.eps, float)


# -- the documented example -------------------------------------------------------------

def test_documented_example_eval_mode_values():
    bn = layer(3, process_groups=[[0]])
    out = bn(np.ones([1, 3, 2, 2], dtype=np.float32))
    assert out.dtype == np.float32 and out.shape == (1, 3, 2, 2)
    assert (out == np.float32(1 / np.sqrt(1 + 1e-5))).all()
    assert np.array2string(out.ravel()[:1]) == "[0.999995]"


# -- training, eval, use_batch_statistics, momentum --------------------------------------

def reference_step(x, dy, gamma, beta, mm, mv, momentum, eps):
    y, dx, mean, var = plain_batch_norm(x, dy, gamma, beta, eps)
    m = x.size // x.shape[1]
    return y, dx, momentum * mm + (1 - momentum) * mean, momentum * mv + (1 - momentum) * var * m / (m - 1)


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0, 1.0])
def test_training_steps_update_moving_statistics(momentum):
    bn = layer(3, momentum=momentum, dtype=np.float64).set_train()
    mm, mv = np.zeros(3), np.ones(3)
    for step in range(4):
        x, dy = global_batch(step, (5, 3, 2, 2), offset=step, scale=1 + step)
        y = bn(x)
        dx = bn.backward(dy)
        y_ref, dx_ref, mm, mv = reference_step(x, dy, np.ones(3), np.zeros(3), mm, mv, momentum, 1e-5)
        np.testing.assert_allclose(y, y_ref, atol=1e-12)
        np.testing.assert_allclose(dx, dx_ref, atol=1e-12)
        np.testing.assert_allclose(bn.moving_mean.data, mm, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(bn.moving_variance.data, mv, rtol=1e-14)


def _modes(ubs, training):
    bn = layer(2, use_batch_statistics=ubs, dtype=np.float64, moving_mean_init=np.array([1.0, -1.0]),
               moving_var_init=np.array([4.0, 0.25])).set_train(training)
    x, dy = global_batch(11, (6, 2))
    y = bn(x)
    return bn, x, dy, y


@pytest.mark.parametrize("ubs,training,uses_batch", [
    (None, True, True), (None, False, False), (True, True, True), (True, False, True),
    (False, True, False), (False, False, False)])
def test_use_batch_statistics_combinations(ubs, training, uses_batch):
    bn, x, dy, y = _modes(ubs, training)
    dx = bn.backward(dy)
    if uses_batch:
        y_ref, dx_ref, mean, var = plain_batch_norm(x, dy, np.ones(2), np.zeros(2), 1e-5)
        assert not np.allclose(bn.moving_mean.data, [1.0, -1.0])       # updated
        np.testing.assert_allclose(bn.moving_mean.data, 0.9 * np.array([1.0, -1.0]) + 0.1 * mean, rtol=1e-14)
    else:
        inv = 1 / np.sqrt(np.array([4.0, 0.25]) + 1e-5)
        y_ref = (x - [1.0, -1.0]) * inv
        dx_ref = dy * inv                                             # statistics are constants
        assert list(bn.moving_mean.data) == [1.0, -1.0] and list(bn.moving_variance.data) == [4.0, 0.25]
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-12)
    np.testing.assert_allclose(bn.gamma.grad, (dy * (y_ref - 0)).sum(axis=0), atol=1e-12)
    np.testing.assert_allclose(bn.beta.grad, dy.sum(axis=0), atol=1e-12)


def test_eval_mode_makes_no_collective_even_in_a_group():
    bn, *_ = _modes(None, False)
    assert bn.group_comm.allreduce_calls == 0


# -- dtypes and accuracy -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7, 3), (3, 3, 2, 2)])
def test_output_dtype_and_one_ulp_of_exact(dtype, shape):
    rng = np.random.default_rng(12)
    x = (5 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = rng.normal(1, 0.1, 3), rng.normal(0, 0.1, 3)
    bn = layer(3, gamma_init=gamma, beta_init=beta, dtype=np.float64).set_train()
    y = bn(x)
    dx = bn.backward(dy)
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == shape
    y_ex, dx_ex, _, _ = exact_batch_norm(x, dy, gamma, beta, 1e-5)
    if dtype == np.float64:
        np.testing.assert_allclose(y, y_ex, rtol=0, atol=1e-12)
        np.testing.assert_allclose(dx, dx_ex, rtol=0, atol=1e-12)
    else:
        assert ulp_distance(y, y_ex.astype(dtype)).max() <= 1
        assert ulp_distance(dx, dx_ex.astype(dtype)).max() <= 1


def test_parameter_dtype_is_layer_dtype():
    bn = layer(2, dtype=np.float16).set_train()
    x, dy = global_batch(3, (4, 2), dtype=np.float32)
    bn(x)
    bn.backward(dy)
    for p in bn.get_parameters():
        assert p.data.dtype == np.float16
    assert bn.gamma.grad.dtype == np.float16


def test_affine_false_leaves_grads_empty():
    bn = layer(2, affine=False).set_train()
    x, dy = global_batch(4, (4, 2))
    bn(x)
    bn.backward(dy)
    assert bn.gamma.grad is None and bn.beta.grad is None and not bn.gamma.requires_grad


# -- input errors (no peers here: raised at once) ----------------------------------------

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x,exc,match", [
    (np.ones((2, 3, 4)), ValueError, "must be 2-D .* got a 3-D array"),
    (np.ones((2, 4)), ValueError, "x has 4 channels .* num_features=3"),
    (np.ones((2, 3), dtype=np.int64), TypeError, "x has dtype int64; expected float16, float32, float64 or bfloat16"),
    ([[1.0, 2.0, 3.0]], TypeError, "x must be a numpy.ndarray"),
])
def test_bad_input(training, x, exc, match):
    bn = layer(3).set_train(training)
    with pytest.raises(exc, match=match):
        bn(x)


def test_too_few_values_per_channel_in_training():
    bn = layer(3).set_train()
    with pytest.raises(ValueError, match="more than 1 value per channel.*got 1"):
        bn(np.ones((1, 3)))
    with pytest.raises(ValueError, match="got 0"):
        bn(np.ones((0, 3)))
    assert (bn.moving_mean.data == 0).all() and (bn.moving_variance.data == 1).all()
    assert bn.set_train(False)(np.ones((1, 3))).shape == (1, 3)   # eval: fine


def test_backward_misuse():
    bn = layer(2).set_train()
    x, dy = global_batch(5, (4, 2))
    with pytest.raises(RuntimeError, match="without a training forward"):
        bn.backward(dy)
    bn(x)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 3\); the forward input had shape \(4, 2\)"):
        bn.backward(np.ones((4, 3)))
    with pytest.raises(TypeError, match="dy has dtype int32"):
        bn.backward(np.ones((4, 2), np.int32))
    bn.backward(dy)
    with pytest.raises(RuntimeError, match="called twice"):
        bn.backward(dy)


def test_failed_forward_keeps_state_and_clears_saved():
    bn = layer(2).set_train()
    x, dy = global_batch(6, (4, 2))
    bn(x)
    before = [p.data.copy() for p in bn.get_parameters()]
    with pytest.raises(ValueError):
        bn(np.ones((4, 5)))
    assert all((a == p.data).all() for a, p in zip(before, bn.get_parameters()))
    with pytest.raises(RuntimeError, match="without a training forward"):
        bn.backward(dy)


def test_nonfinite_training_batch():
    bn = layer(2, dtype=np.float64).set_train()
    x, _ = global_batch(7, (4, 2))
    x[2, 1] = np.nan
    with pytest.raises(FloatingPointError, match="rank 0 channel 1"):
        bn(x)
    assert (bn.moving_mean.data == 0).all() and (bn.moving_variance.data == 1).all()
    out = layer(2, nonfinite="propagate").set_train()(x)
    assert np.isnan(out[:, 1]).all() and np.isfinite(out[:, 0]).all()


def test_context_manager_releases_group():
    with layer(2) as bn:
        group = bn.group_comm
        assert group._users >= 1
    assert bn.group_comm is None
