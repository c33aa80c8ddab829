"""Synchronisation across ranks (run under mpiexec -n 4 ... --with-mpi).

Every rank builds the same global batch, keeps its shard, and checks its
own results against the concatenated batch computed independently on one
process. All collectives finish before the first assert, and every rank
asserts.
"""
import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn.comm import group_of
from conftest import allgather, global_batch, shard_slices
from oracle import exact_batch_norm, plain_batch_norm, ulp_distance

WORLD = MPI.COMM_WORLD


def shard_sizes(pattern, size):
    if pattern == "even":
        return [3] * size
    if pattern == "uneven":
        return [1 + 2 * r for r in range(size)]
    if pattern == "empty":                 # rank 1 holds nothing
        return [0 if r == 1 else 2 + r for r in range(size)]
    raise ValueError(pattern)


def run_steps(bn, x, dy, sl, steps=3):
    """Forward + backward ``steps`` times on this rank's shard."""
    out = []
    for s in range(steps):
        y = bn(x[s][sl])
        dx = bn.backward(dy[s][sl])
        out.append((y, dx, bn.gamma.grad.astype(np.float64), bn.beta.grad.astype(np.float64)))
    return out


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pattern", ["even", "uneven", "empty"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("spatial", [(), (2, 3)])
def test_equals_concatenated_batch(pattern, dtype, spatial):
    size, rank = WORLD.Get_size(), WORLD.Get_rank()
    sizes = shard_sizes(pattern, size)
    sl = shard_slices(sizes)[rank]
    shape = (sum(sizes), 3) + spatial
    xs, dys = zip(*[global_batch(10 + s, shape, offset=4.0 + s, scale=1 + s, dtype=dtype) for s in range(3)])
    gamma, beta = np.array([1.2, 0.8, 1.0]), np.array([0.1, 0.0, -0.3])
    bn = SyncBatchNorm(3, gamma_init=gamma, beta_init=beta, momentum=0.8, dtype=np.float64).set_train()
    out = run_steps(bn, xs, dys, sl)
    dgamma_sum = WORLD.allreduce(out[-1][2])
    dbeta_sum = WORLD.allreduce(out[-1][3])
    calls = bn.group_comm.allreduce_calls
    bn.close()

    mm, mv = np.zeros(3), np.ones(3)
    m = shape[0] * int(np.prod(spatial, dtype=int))
    for s, (y, dx, _, _) in enumerate(out):
        y_ref, dx_ref, mean, var = plain_batch_norm(xs[s], dys[s], gamma, beta, 1e-5)
        mm, mv = 0.8 * mm + 0.2 * mean, 0.8 * mv + 0.2 * var * m / (m - 1)
        assert y.dtype == dtype and dx.dtype == dtype and y.shape == xs[s][sl].shape
        if dtype == np.float64:
            np.testing.assert_allclose(y, y_ref[sl], rtol=0, atol=1e-12)
            np.testing.assert_allclose(dx, dx_ref[sl], rtol=0, atol=1e-12)
        else:   # within 1 ulp of the (float64-accurate) reference rounded to dtype
            assert ulp_distance(y, y_ref[sl].astype(dtype)).max(initial=0) <= 1
            assert ulp_distance(dx, dx_ref[sl].astype(dtype)).max(initial=0) <= 1
    np.testing.assert_allclose(bn.moving_mean.data, mm, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(bn.moving_variance.data, mv, rtol=1e-13)
    # Parameter gradients are this rank's share; their sum is the whole batch's.
    xhat = (y_ref.reshape(shape[0], 3, -1) - beta[:, None]) / gamma[:, None]
    np.testing.assert_allclose(dgamma_sum, (dys[-1].reshape(shape[0], 3, -1).astype(float) * xhat)
                               .sum(axis=(0, 2)), atol=1e-9)
    np.testing.assert_allclose(dbeta_sum, dys[-1].astype(float).reshape(shape[0], 3, -1).sum(axis=(0, 2)),
                               atol=1e-9)
    assert calls == 2 * 3                  # one Allreduce per forward, one per backward


@pytest.mark.mpi(min_size=2)
def test_small_case_against_exact_arithmetic():
    size, rank = WORLD.Get_size(), WORLD.Get_rank()
    sizes = [r % 3 for r in range(size)]            # 0, 1, 2, 0, ... (rank 0 empty)
    sizes[-1] += 2
    sl = shard_slices(sizes)[rank]
    x, dy = global_batch(20, (sum(sizes), 2, 2, 2), offset=7.0)
    gamma, beta = np.array([1.5, 0.5]), np.array([0.25, -0.75])
    bn = SyncBatchNorm(2, gamma_init=gamma, beta_init=beta, dtype=np.float64).set_train()
    y, dx = bn(x[sl]), None
    dx = bn.backward(dy[sl])
    y_ex, dx_ex, means, variances = exact_batch_norm(x, dy, gamma, beta, 1e-5)
    np.testing.assert_allclose(y, y_ex[sl], rtol=0, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ex[sl], rtol=0, atol=1e-12)
    np.testing.assert_allclose(bn.batch_mean, [float(m) for m in means], rtol=1e-15)
    np.testing.assert_allclose(bn.batch_var, [float(v) for v in variances], rtol=1e-14)


@pytest.mark.mpi(min_size=2)
def test_statistics_bitwise_identical_on_every_rank():
    size, rank = WORLD.Get_size(), WORLD.Get_rank()
    sizes = shard_sizes("uneven", size)
    x, dy = global_batch(30, (sum(sizes), 5, 3, 3), offset=1e4, scale=0.1, dtype=np.float32)
    bn = SyncBatchNorm(5).set_train()
    bn(x[shard_slices(sizes)[rank]])
    mine = (bn.batch_mean.tobytes(), bn.batch_var.tobytes(), bn.moving_mean.data.tobytes(),
            bn.moving_variance.data.tobytes())
    everyone = allgather(WORLD, mine)
    bn.close()
    assert all(e == mine for e in everyone)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("groups", [[[0, 1], [2, 3]], [[0, 1, 3]], [[3, 0], [1]]])
def test_process_groups(groups):
    rank = WORLD.Get_rank()
    sizes = [2, 3, 1, 4] + [2] * (WORLD.Get_size() - 4)
    slices = shard_slices(sizes)
    x, dy = global_batch(40, (sum(sizes), 2, 2, 2), offset=3.0)
    bn = SyncBatchNorm(2, process_groups=groups, dtype=np.float64).set_train()
    y = bn(x[slices[rank]])
    dx = bn.backward(dy[slices[rank]])
    calls = bn.group_comm.allreduce_calls
    bn.close()
    mine = group_of(rank, groups)
    # The group's concatenated batch, and where this rank's samples sit in it.
    idx = np.concatenate([np.arange(sum(sizes))[slices[r]] for r in sorted(mine)])
    y_ref, dx_ref, _, _ = plain_batch_norm(x[idx], dy[idx], np.ones(2), np.zeros(2), 1e-5)
    at = [idx.tolist().index(i) for i in np.arange(sum(sizes))[slices[rank]]]
    np.testing.assert_allclose(y, y_ref[at], atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref[at], atol=1e-12)
    assert calls == (2 if len(mine) > 1 else 0)       # alone: local batch norm, no communication
    if len(mine) > 1:    # negative control: plain local batch norm differs from synced
        y_local, _, _, _ = plain_batch_norm(x[slices[rank]], dy[slices[rank]], np.ones(2), np.zeros(2), 1e-5)
        assert np.abs(y - y_local).max() > 1e-3


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sizes_one_to_four(n):
    rank = WORLD.Get_rank()
    if n > WORLD.Get_size():
        pytest.skip(f"needs {n} ranks")
    sub = WORLD.Split(0 if rank < n else MPI.UNDEFINED, rank)
    if sub == MPI.COMM_NULL:
        return
    sizes = [2 + r for r in range(n)]
    x, dy = global_batch(50 + n, (sum(sizes), 3), offset=2.0)
    with SyncBatchNorm(3, comm=sub, dtype=np.float64).set_train() as bn:
        y = bn(x[shard_slices(sizes)[rank]])
        dx = bn.backward(dy[shard_slices(sizes)[rank]])
        calls = bn.group_comm.allreduce_calls
    sub.Free()
    y_ref, dx_ref, _, _ = plain_batch_norm(x, dy, np.ones(3), np.zeros(3), 1e-5)
    np.testing.assert_allclose(y, y_ref[shard_slices(sizes)[rank]], atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref[shard_slices(sizes)[rank]], atol=1e-12)
    assert calls == (2 if n > 1 else 0)


@pytest.mark.mpi(min_size=2)
def test_collective_count_per_mode():
    x, dy = global_batch(60, (4, 2))
    counts = {}
    for name, ubs, training in [("train", None, True), ("eval", None, False), ("ubs_true_eval", True, False),
                                ("ubs_false_train", False, True)]:
        with SyncBatchNorm(2, use_batch_statistics=ubs).set_train(training) as bn:
            before = bn.group_comm.allreduce_calls
            bn(x)
            after_forward = bn.group_comm.allreduce_calls
            bn.backward(dy)
            counts[name] = (after_forward - before, bn.group_comm.allreduce_calls - after_forward)
    assert counts == {"train": (1, 1), "eval": (0, 0), "ubs_true_eval": (1, 1), "ubs_false_train": (0, 0)}


@pytest.mark.mpi(min_size=2)
def test_empty_rank_gets_empty_output_and_joins():
    rank = WORLD.Get_rank()
    x, dy = global_batch(70, (6, 2, 2, 2))
    mine = x[:0] if rank == 0 else x
    bn = SyncBatchNorm(2, dtype=np.float64).set_train()
    y = bn(mine)
    dx = bn.backward(dy[:0] if rank == 0 else dy)
    bn.close()
    assert y.shape == mine.shape and dx.shape == mine.shape
    if rank == 0:
        assert y.size == 0 and bn.gamma.grad.tolist() == [0.0, 0.0]


@pytest.mark.mpi(min_size=2)
def test_group_with_one_value_raises_on_every_rank():
    rank = WORLD.Get_rank()
    bn = SyncBatchNorm(3).set_train()
    x = np.ones((1 if rank == 0 else 0, 3), np.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel in training, got 1"):
        bn(x)
    bn.close()


@pytest.mark.mpi(min_size=2)
def test_bad_input_on_one_rank_raises_same_error_everywhere():
    rank = WORLD.Get_rank()
    bn = SyncBatchNorm(3).set_train()
    x, _ = global_batch(80, (4, 3), dtype=np.float32)
    bad = np.ones((4, 5), np.float32) if rank == 1 else x
    with pytest.raises(ValueError, match=r"rank 1: x has 5 channels \(shape\[1\]\); the layer has num_features=3"):
        bn(bad)
    state = bn.moving_mean.data.tolist(), bn.moving_variance.data.tolist()
    y = bn(x)                      # the group is still usable afterwards
    bn.close()
    assert state == ([0.0] * 3, [1.0] * 3)
    assert y.shape == x.shape


@pytest.mark.mpi(min_size=2)
def test_layers_called_in_different_orders_raise_everywhere():
    rank = WORLD.Get_rank()
    a, b = SyncBatchNorm(2).set_train(), SyncBatchNorm(2).set_train()
    x, _ = global_batch(90, (4, 2), dtype=np.float32)
    first = a if rank != 0 else b
    with pytest.raises(RuntimeError, match="different layer calls"):
        first(x)
    a.close()
    b.close()
