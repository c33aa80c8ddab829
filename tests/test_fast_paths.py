"""The blocked fast paths of the math room against straightforward formulas.

``mpibn.functional`` works block by block (``mpibn.blocks``). These tests
make the blocks tiny, so that small arrays are cut into many blocks,
partial blocks and split rows, and check every function against the
textbook float64 formulas and against exact arithmetic (tests/oracle.py),
including |mean|/std = 1e8, float16/float32 results to 1 ulp, empty shards
and 2-D input. None of them depends on the number of ranks.
"""
import tracemalloc

import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm, blocks
from mpibn import functional as F
from oracle import exact_batch_norm, plain_batch_norm, ulp_distance

EPS = 1e-5
SHAPES = [(5, 3, 4, 6), (7, 5), (2, 3, 300), (1, 2, 1000), (9, 1)]


@pytest.fixture(params=[7, 64, blocks.BLOCK, None], ids=["block7", "block64", "blocked", "default"])
def block(request, monkeypatch):
    """The block plans. 7 and 64 (values per block) cut small arrays into
    many (partial) blocks; "blocked" sends them through the blocked plan
    with the default block size (one block, or one per channel); "default"
    leaves them to the whole plan (``blocks.WHOLE``). Except by default,
    batch_norm_stats also takes its shift from the head (the first 1/16 of
    the samples) as it does for big arrays."""
    if request.param is not None:
        monkeypatch.setattr(blocks, "BLOCK", request.param)
        monkeypatch.setattr(blocks, "WHOLE", 0)
        monkeypatch.setattr(F, "SMALL_SHARD", 0)
    return request.param


def ncl(a):
    return F.as_ncl(a) if a.ndim != 3 else a


def data(shape, dtype, offset=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    return x, dy, np.linspace(0.5, 2.0, c), np.linspace(-1.0, 1.0, c)


def fast(x, dy, gamma, beta):
    """The math room's functions, as the layer composes them on one rank."""
    x3, dy3 = ncl(x), ncl(dy)
    n, mean, m2 = F.batch_norm_stats(x3)
    inv_std = F.inv_std_from_var(m2 / n, EPS)
    y = F.batch_norm_elemt(x3, mean, inv_std, gamma, beta)
    sum_dy, sum_dy_xhat = F.batch_norm_backward_reduce(dy3, x=x3, mean=mean, inv_std=inv_std)
    dx = F.batch_norm_backward_elemt(dy3, None, gamma, inv_std, sum_dy / n, sum_dy_xhat / n,
                                     x=x3, mean=mean)
    return mean, m2 / n, y.reshape(x.shape), dx.reshape(x.shape), sum_dy, sum_dy_xhat


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fast_paths_match_textbook_formulas(block, shape, dtype):
    x, dy, gamma, beta = data(shape, dtype, offset=3.0)
    mean, var, y, dx, sum_dy, sum_dy_xhat = fast(x, dy, gamma, beta)
    y_ref, dx_ref, mean_ref, var_ref = plain_batch_norm(x, dy, gamma, beta, EPS)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-14)
    np.testing.assert_allclose(var, var_ref, rtol=1e-12)
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == x.shape
    if dtype == np.float64:
        np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
    else:
        # One rounding from (nearly) the float64 result: within 1 ulp.
        assert ulp_distance(y, y_ref.astype(dtype)).max() <= 1
        assert ulp_distance(dx, dx_ref.astype(dtype)).max() <= 1
    xhat = (ncl(x).astype(np.float64) - mean[:, None]) / np.sqrt(var + EPS)[:, None]
    np.testing.assert_allclose(sum_dy, ncl(dy).astype(np.float64).sum(axis=(0, 2)), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(sum_dy_xhat, np.einsum("ncl,ncl->c", ncl(dy).astype(np.float64), xhat),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.0, 1e4, 1e8])
def test_float64_within_the_bar_of_exact_results(block, ratio):
    """float64 y and dx within 64 eps (1 + |mean|/std) of exact, |mean|/std up to 1e8."""
    x, dy, gamma, beta = data((20, 3, 9), np.float64, offset=ratio, seed=1)
    mean, var, y, dx, _, _ = fast(x, dy, gamma, beta)
    y_ex, dx_ex, means, variances = exact_batch_norm(x, dy, gamma, beta, EPS)
    bar = 64 * np.finfo(np.float64).eps * (1 + ratio)
    assert np.abs(y - y_ex).max() <= bar * np.abs(y_ex).max()
    assert np.abs(dx - dx_ex).max() <= bar * np.abs(dx_ex).max()
    # The statistics themselves lose nothing to |mean|/std (centred m2).
    for c in range(3):
        assert abs(var[c] - float(variances[c])) <= 64 * np.finfo(float).eps * float(variances[c])
        assert abs(mean[c] - float(means[c])) <= 4 * np.finfo(float).eps * (abs(float(means[c])) + 1)


@pytest.mark.parametrize("dtype, ratio", [(np.float32, 0.0), (np.float32, 1e3), (np.float16, 0.0),
                                          (np.float16, 10.0)])
def test_low_precision_outputs_within_one_ulp_of_exact(block, dtype, ratio):
    x, dy, gamma, beta = data((6, 2, 11), dtype, offset=ratio, seed=2)
    _, _, y, dx, _, _ = fast(x, dy, gamma, beta)
    y_ex, dx_ex, _, _ = exact_batch_norm(x, dy, gamma, beta, EPS)
    assert ulp_distance(y, y_ex.astype(dtype)).max() <= 1
    assert ulp_distance(dx, dx_ex.astype(dtype)).max() <= 1


def test_negative_control_folded_float32_misses_the_ulp_bar():
    # x*scale + shift in float32 (no x - mean first) is far outside 1 ulp
    # here, so the ulp test above can fail.
    x, dy, gamma, beta = data((6, 2, 11), np.float32, offset=1e3, seed=2)
    y_ex = exact_batch_norm(x, dy, gamma, beta, EPS)[0].astype(np.float32)
    mean = x.astype(np.float64).mean(axis=(0, 2))
    scale = (gamma / np.sqrt(x.astype(np.float64).var(axis=(0, 2)) + EPS)).astype(np.float32)
    shift = (beta - mean * scale).astype(np.float32)
    folded = x * scale[None, :, None] + shift[None, :, None]
    assert ulp_distance(folded, y_ex).max() > 100


def test_xhat_path_and_kept_x_path_agree(block):
    x, dy, gamma, beta = data((5, 3, 70), np.float32, offset=2.0, seed=3)
    x3, dy3 = ncl(x), ncl(dy)
    n, mean, m2 = F.batch_norm_stats(x3)
    inv_std = F.inv_std_from_var(m2 / n, EPS)
    xhat = (x3 - mean[:, None]) * inv_std[:, None]
    a = F.batch_norm_backward_reduce(dy3, xhat)
    b = F.batch_norm_backward_reduce(dy3, x=x3, mean=mean, inv_std=inv_std)
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-12)
    dx_a = F.batch_norm_backward_elemt(dy3, xhat, gamma, inv_std, a[0] / n, a[1] / n)
    dx_b = F.batch_norm_backward_elemt(dy3, None, gamma, inv_std, a[0] / n, a[1] / n, x=x3, mean=mean)
    assert ulp_distance(dx_a, dx_b).max() <= 1


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_empty_shard(block, dtype):
    x = np.zeros((0, 3, 4), dtype)
    count, mean, m2 = F.batch_norm_stats(x)
    assert count == 0 and not mean.any() and not m2.any()
    y = F.batch_norm_elemt(x, np.ones(3), np.ones(3), np.ones(3), np.ones(3))
    assert y.shape == x.shape and y.dtype == dtype
    sums = F.batch_norm_backward_reduce(x, x=x, mean=np.ones(3), inv_std=np.ones(3))
    assert [s.tolist() for s in sums] == [[0.0] * 3, [0.0] * 3]
    dx = F.batch_norm_backward_elemt(x, None, np.ones(3), np.ones(3), np.ones(3), np.ones(3), x=x, mean=np.ones(3))
    assert dx.shape == x.shape and dx.dtype == dtype


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6, 5)])
def test_layer_2d_and_4d_against_textbook(block, shape):
    x, dy, _, _ = data(shape, np.float32, offset=1.5, seed=5)
    with SyncBatchNorm(shape[1], comm=MPI.COMM_SELF).set_train() as bn:
        y = bn(x)
        dx = bn.backward(dy)
    y_ref, dx_ref, _, _ = plain_batch_norm(x, dy, np.ones(shape[1]), np.zeros(shape[1]), 1e-5)
    assert ulp_distance(y, y_ref.astype(np.float32)).max() <= 1
    assert ulp_distance(dx, dx_ref.astype(np.float32)).max() <= 1


def test_no_full_size_float64_temporary():
    """Peak temporary memory per pass at most 1x the input beyond y or dx
    (a float64 copy of a float32 input alone would be 2x), for inputs of
    8 MiB or more (the bar's range), the reused scratch memory included."""
    x, dy, _, _ = data((32, 8, 128, 64), np.float32, seed=6)
    assert x.nbytes == 8 << 20
    with SyncBatchNorm(8, comm=MPI.COMM_SELF).set_train() as bn:
        bn(x)
        bn.backward(dy)                                  # warm-up: caches, plans
        peaks = []
        for fn in (lambda: bn(x), lambda: bn.backward(dy)):
            blocks._POOL.__dict__.clear()                # count the scratch it allocates
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            out = fn()
            peaks.append(tracemalloc.get_traced_memory()[1] - base - out.nbytes)
            tracemalloc.stop()
        assert np.shares_memory(bn._saved.x, x)          # backward keeps x itself, no copy
    assert max(peaks) <= x.nbytes, [p / x.nbytes for p in peaks]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_arrays_are_filled_and_returned(block, dtype):
    x, dy, gamma, beta = data((4, 3, 5), dtype, offset=1.0, seed=7)
    n, mean, m2 = F.batch_norm_stats(x)
    inv_std = F.inv_std_from_var(m2 / n, EPS)
    y_out, dx_out = np.full_like(x, np.nan), np.full_like(x, np.nan)
    y = F.batch_norm_elemt(x, mean, inv_std, gamma, beta, out=y_out)
    dx = F.batch_norm_backward_elemt(dy, None, gamma, inv_std, mean, m2, x=x, mean=mean, out=dx_out)
    assert y is y_out and dx is dx_out
    assert np.array_equal(y, F.batch_norm_elemt(x, mean, inv_std, gamma, beta))
    assert np.array_equal(dx, F.batch_norm_backward_elemt(dy, None, gamma, inv_std, mean, m2, x=x, mean=mean))


@pytest.mark.parametrize("layout", ["transposed", "reversed", "fortran"])
def test_non_contiguous_input_gives_the_same_results(block, layout):
    x, dy, _, _ = data((12, 3, 4, 5), np.float32, offset=2.0, seed=8)
    if layout == "transposed":
        x2, dy2 = np.ascontiguousarray(x[:, :, 0, 0].T).T, np.ascontiguousarray(dy[:, :, 0, 0].T).T
        x, dy = x[:, :, 0, 0], dy[:, :, 0, 0]
    elif layout == "reversed":
        x2, dy2 = x[::-1].copy()[::-1], dy[::-1].copy()[::-1]
    else:
        x2, dy2 = np.asfortranarray(x), np.asfortranarray(dy)
    results = []
    for a, b in ((x, dy), (x2, dy2)):
        with SyncBatchNorm(3, comm=MPI.COMM_SELF).set_train() as bn:
            results.append((bn(a), bn.backward(b), bn.gamma.grad, bn.beta.grad))
    assert not (x2.flags.c_contiguous and dy2.flags.c_contiguous)
    for u, v in zip(*results):
        assert ulp_distance(u, v).max() <= 1


def body_calls(shape):
    """How many blocks ``blocks.each`` hands its body for a (N, C, L) array."""
    calls = []
    x = np.zeros(shape, np.float32)
    blocks.each((x,), 1, lambda b, s, v: calls.append(s[0].shape), (np.zeros(shape[1]),), np.empty_like(x))
    return len(calls)


def test_plan_boundary_small_arrays_are_one_block():
    """Up to blocks.WHOLE values one call of the body does the whole array
    (never a Python loop over the channels of a small array); above, the
    blocked plan with blocks of at most BLOCK values."""
    whole = blocks.WHOLE
    for shape in [(2, 4, 9), (8, 64, 64), (128, 1024, 1), (4, 512, 49), (1, whole, 1), (whole // 64, 1, 64)]:
        assert blocks.plan(shape) == "whole" and body_calls(shape) == 1, shape
    for shape in [(1, whole + 1, 1), (whole // 64 + 1, 1, 64), (256, 1024, 1), (16, 64, 784)]:
        nb, cb, lb = blocks.plan(shape)
        assert nb * cb * lb <= blocks.BLOCK
        assert body_calls(shape) == -(-shape[0] // nb) * -(-shape[1] // cb) * -(-shape[2] // lb)
    assert body_calls((0, 3, 4)) == 0


@pytest.mark.parametrize("shape", [(256, 513), (64, 16, 130), (3, 2, 1 << 16)])
def test_blocked_plan_above_whole_matches_textbook(shape):
    """Arrays just above blocks.WHOLE, with their real block sizes."""
    x, dy, gamma, beta = data(shape, np.float32, offset=3.0, seed=9)
    assert blocks.plan(ncl(x).shape) != "whole"
    mean, var, y, dx, _, _ = fast(x, dy, gamma, beta)
    y_ref, dx_ref, mean_ref, var_ref = plain_batch_norm(x, dy, gamma, beta, EPS)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-14)
    np.testing.assert_allclose(var, var_ref, rtol=1e-12)
    assert ulp_distance(y, y_ref.astype(np.float32)).max() <= 1
    assert ulp_distance(dx, dx_ref.astype(np.float32)).max() <= 1


def test_whole_and_blocked_plans_give_the_same_results(monkeypatch):
    """The same array through both plans: y and dx within 1 ulp of each other,
    the statistics equal to 1e-14 (only the order of the sums differs)."""
    x, dy, gamma, beta = data((8, 6, 5, 7), np.float32, offset=2.0, seed=10)
    whole = fast(x, dy, gamma, beta)
    monkeypatch.setattr(blocks, "WHOLE", 0)
    monkeypatch.setattr(blocks, "BLOCK", 16)
    blocked = fast(x, dy, gamma, beta)
    for a, b in zip(whole[:2] + whole[4:], blocked[:2] + blocked[4:]):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)
    for a, b in zip(whole[2:4], blocked[2:4]):
        assert ulp_distance(a, b).max() <= 1


def test_scratch_is_reused_and_per_thread():
    import threading
    first = blocks._scratch(2, 100)
    again = blocks._scratch(1, 50)
    assert np.shares_memory(first[0], again[0])          # no new allocation
    assert not np.shares_memory(first[0], first[1])
    other = []
    t = threading.Thread(target=lambda: other.append(blocks._scratch(2, 100)))
    t.start()
    t.join()
    assert not np.shares_memory(other[0][0], first[0])   # threads never share scratch


def test_merge_stats_one_rank_matches_the_general_formula():
    """The one-rank shortcut of merge_stats gives bitwise what the general
    formula gives (a second, empty rank with a zero m2 row, as empty ranks
    send, takes it down the general path),
    non-finite moments included."""
    means = np.array([[3.25, -0.0, np.inf, np.nan, 1e300]])
    m2s = np.array([[2.0, 0.0, np.nan, 1.0, np.inf]])
    with np.errstate(invalid="ignore", over="ignore"):
        one = F.merge_stats([7], means, m2s)
        two = F.merge_stats([7, 0], np.vstack([means, [[5.0] * 5]]), np.vstack([m2s, [[0.0] * 5]]))
    assert one[0] == two[0] == 7
    for a, b in zip(one[1:], two[1:]):
        assert np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(b))


def _layer_step(x, dy):
    bn = SyncBatchNorm(x.shape[1], dtype=x.dtype.name, comm=MPI.COMM_SELF).set_train(True)
    bn.gamma.data[...] = np.linspace(0.5, 1.5, x.shape[1])
    bn.beta.data[...] = np.linspace(-0.2, 0.2, x.shape[1])
    try:
        y = bn(x)
        dx = bn.backward(dy)
        return [a.tobytes() for a in (y, dx, bn.gamma.grad, bn.beta.grad, bn.moving_mean.data,
                                      bn.moving_variance.data, bn.batch_mean, bn.batch_var)]
    finally:
        bn.close()


def _takes_wide_rows(shape):
    s3 = (shape[0], shape[1], 1)
    if blocks.whole(s3):
        return blocks._whole(s3, 1)[4] is not None
    return blocks._blocked_wide(blocks.plan_for(s3), [], lambda *a: None)[0] is not None


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(256, 256), (64, 512), (96, 384), (512, 1024), (1000, 300)])
def test_wide_rows_give_the_same_bits(monkeypatch, shape, dtype):
    # blocks.Wide shows 2-D blocks (the whole plan's one, or the blocked
    # plan's, the last one partial for (1000, 300)) to the element-wise
    # formulas in rows of about 8192 values: the same operations on the same
    # values, so every output must be bitwise what the (B, C) rows give.
    assert _takes_wide_rows(shape)
    x, dy, _, _ = data(shape, dtype, offset=3.0, seed=4)
    wide = _layer_step(x, dy)
    monkeypatch.setattr(blocks, "WIDE", 1 << 30)                         # no wide rows
    monkeypatch.setattr(blocks._POOL, "views", {})
    assert not _takes_wide_rows(shape)
    assert _layer_step(x, dy) == wide


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (8, 64, 8, 8), (16, 300), (256, 256)])
def test_kept_x_gives_the_same_y(shape, dtype):
    # batch_norm_stats(keep=True) hands x, converted to float64, to
    # batch_norm_elemt(kept=...): y must be bitwise what converting x again gives.
    x, _, gamma, beta = data(shape, dtype, offset=2.0, seed=5)
    x3 = ncl(x)
    n, mean, m2, kept = F.batch_norm_stats(x3, keep=True)
    inv_std = F.inv_std_from_var(m2 / n, EPS)
    if len(shape) == 2 and dtype == "float64":
        assert kept is None                     # read in place, never converted: nothing to keep
    else:
        assert kept == x3.shape
    y_kept = F.batch_norm_elemt(x3, mean, inv_std, gamma, beta, kept=kept)
    assert np.array_equal(F.batch_norm_stats(x3)[1], mean)
    assert y_kept.tobytes() == F.batch_norm_elemt(x3, mean, inv_std, gamma, beta).tobytes()


def test_kept_x_is_none_for_a_blocked_array():
    x3 = ncl(data((64, 8, 32, 32), "float32")[0])           # 524288 values: the blocked plan
    assert blocks.plan(x3.shape) != "whole"
    assert F.batch_norm_stats(x3, keep=True)[3] is None
