"""The math room, serially, against exact arithmetic and the textbook formulas."""
from fractions import Fraction

import numpy as np
import pytest

from mpibn import functional as F
from oracle import exact_batch_norm, plain_batch_norm


def exact_moments(values):
    xs = [Fraction(float(v)) for v in np.ravel(values)]
    mean = sum(xs) / len(xs)
    return mean, sum((v - mean) ** 2 for v in xs)


def test_functional_never_imports_mpi4py():
    import subprocess, sys
    code = "import sys, mpibn.functional; assert 'mpi4py' not in sys.modules, 'mpi4py imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("offset", [0.0, 10.0, 1e4, 1e8])
def test_stats_match_exact_moments(offset):
    rng = np.random.default_rng(1)
    x = offset + rng.standard_normal((5, 3, 7))
    count, mean, m2 = F.batch_norm_stats(x)
    assert count == 35
    for c in range(3):
        em, em2 = exact_moments(x[:, c, :])
        # mean: within a couple of ulps of the exact mean.
        assert abs(Fraction(mean[c]) - em) <= 4 * np.spacing(abs(float(em)) or 1.0)
        assert abs(m2[c] - float(em2)) <= 1e-13 * float(em2)


def test_naive_formula_is_what_we_avoid():
    # Negative control: the forbidden E[x^2] - E[x]^2 is off by orders of
    # magnitude on this data, so the bound above really tests something.
    rng = np.random.default_rng(2)
    x = 1e8 + rng.standard_normal((64, 1, 1))
    _, em2 = exact_moments(x)
    naive_var = (x ** 2).mean() - x.mean() ** 2
    _, _, m2 = F.batch_norm_stats(x)
    exact_var = float(em2) / 64
    assert abs(naive_var - exact_var) > 1e3 * abs(m2[0] / 64 - exact_var)
    assert abs(m2[0] / 64 - exact_var) <= 1e-13 * exact_var


def test_m2_is_never_negative():
    # m2 = sum(d^2) - sum(d)^2/n is >= 0 in exact arithmetic. A constant
    # channel of 48 values near 1.7e-147 has d = x - K = one ulp of x,
    # 2.8e-163 (K rounded): d^2 underflows to 0 in sum(d^2), while
    # sum(d)^2/n rounds up to the smallest subnormal, so the unclamped m2 is
    # -5e-324 (docs/ground-truth.md, "The clamp on m2", quotes these numbers).
    # The clamp returns the true 0; a constant channel in the normal range
    # gives exactly 0 without it.
    v = 1.6861509613185092e-147
    d = np.full(48, v) - np.full(48, v).sum() / 48
    assert d[0] == np.spacing(v) and d[0] * d[0] == 0.0
    assert (d * d).sum() - d.sum() ** 2 / 48 == -5e-324
    for v, n in [(1.6861509613185092e-147, 48), (0.1, 3), (1e4 + 0.1, 1000), (-7.77, 70000)]:
        x = np.full((n, 2, 1), v)
        _, mean, m2 = F.batch_norm_stats(x)
        assert m2.tolist() == [0.0, 0.0], (v, n, m2)
        assert np.signbit(m2).tolist() == [False, False]
        assert abs(mean[0] - v) <= 4 * abs(np.spacing(v))


def test_empty_shard_has_zero_moments():
    count, mean, m2 = F.batch_norm_stats(np.zeros((0, 4, 9), np.float32))
    assert count == 0 and mean.shape == (4,) and not mean.any() and not m2.any()


@pytest.mark.parametrize("offset", [0.0, 5.0, 1e6])
def test_merge_equals_concatenated_batch(offset):
    rng = np.random.default_rng(3)
    shards = [offset + rng.standard_normal((n, 2, 3)) * (1 + i) for i, n in enumerate([4, 0, 1, 7])]
    stats = [F.batch_norm_stats(s) for s in shards]
    total, mean, m2 = F.merge_stats([s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats])
    whole = np.concatenate(shards)
    assert total == whole.shape[0] * 3
    for c in range(2):
        em, em2 = exact_moments(whole[:, c, :])
        std = (float(em2) / total) ** 0.5
        # The core issue's bound: 64 eps (1 + |mean|/std), relative.
        bound = 64 * 2.2e-16 * (1 + abs(float(em)) / std)
        assert abs(mean[c] - float(em)) <= bound * std
        assert abs(m2[c] - float(em2)) <= bound * float(em2)


def test_merge_is_bitwise_deterministic_and_ignores_empty_rows():
    rng = np.random.default_rng(4)
    counts = [3, 0, 5]
    means = rng.standard_normal((3, 4))
    m2s = rng.random((3, 4))
    means[1] = np.nan               # garbage on an empty row must not leak in
    a = F.merge_stats(counts, means, m2s)
    b = F.merge_stats(counts, means.copy(), m2s.copy())
    assert np.isfinite(a[1]).all() and np.isfinite(a[2]).all()
    assert a[1].tobytes() == b[1].tobytes() and a[2].tobytes() == b[2].tobytes()


def test_merge_masks_m2_of_empty_rows():
    # The case: an empty row whose m2 holds NaN (or anything else)
    # must not reach M2; the other row alone is the group.
    total, mean, m2 = F.merge_stats([0, 3], [[0.0], [1.0]], [[np.nan], [2.0]])
    assert total == 3 and mean.tolist() == [1.0] and m2.tolist() == [2.0]
    total, mean, m2 = F.merge_stats([0, 3], [[5.0], [1.0]], [[7.0], [2.0]])
    assert total == 3 and mean.tolist() == [1.0] and m2.tolist() == [2.0]


def test_merge_of_nothing():
    total, mean, m2 = F.merge_stats([0, 0], np.zeros((2, 3)), np.zeros((2, 3)))
    assert total == 0 and mean.shape == (3,)


def _forward_backward(x, dy, gamma, beta, eps):
    x3, dy3 = F.as_ncl(x), F.as_ncl(dy)
    n, mean, m2 = F.batch_norm_stats(x3)
    inv_std = F.inv_std_from_var(m2 / n, eps)
    y = F.batch_norm_elemt(x3, mean, inv_std, gamma, beta)
    xhat = (x3 - mean[:, None]) * inv_std[:, None]
    sum_dy, sum_dy_xhat = F.batch_norm_backward_reduce(dy3, xhat)
    dx = F.batch_norm_backward_elemt(dy3, xhat, gamma, inv_std, sum_dy / n, sum_dy_xhat / n)
    return y.reshape(x.shape), dx.reshape(x.shape), sum_dy, sum_dy_xhat


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 2, 3)])
def test_forward_backward_match_exact_arithmetic(shape):
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 10) + rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    gamma, beta = rng.normal(1, 0.2, shape[1]), rng.normal(0, 0.2, shape[1])
    y, dx, _, _ = _forward_backward(x, dy, gamma, beta, 1e-5)
    y_ex, dx_ex, _, _ = exact_batch_norm(x, dy, gamma, beta, 1e-5)
    np.testing.assert_allclose(y, y_ex, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ex, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ratio", [1e2, 1e5, 1e8])
def test_large_offset_within_relative_bound(ratio):
    rng = np.random.default_rng(6)
    shape = (8, 2, 3, 1)
    std = 1e-3
    x = ratio * std + std * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    gamma, beta = np.array([1.5, 0.7]), np.array([0.1, -0.2])
    y, dx, _, _ = _forward_backward(x, dy, gamma, beta, 1e-12)
    y_ex, dx_ex, _, _ = exact_batch_norm(x, dy, gamma, beta, 1e-12)
    bound = 64 * 2.2e-16 * (1 + ratio)
    assert np.max(np.abs(y - y_ex) / np.abs(y_ex).max()) <= bound
    assert np.max(np.abs(dx - dx_ex) / np.abs(dx_ex).max()) <= bound


def test_backward_matches_central_finite_differences():
    rng = np.random.default_rng(7)
    x = 3 + rng.standard_normal((4, 2, 2, 2))
    dy = rng.standard_normal(x.shape)
    gamma, beta = np.array([1.3, 0.6]), np.array([0.2, -0.1])

    def loss(xv, g=gamma, b=beta):
        return float((_forward_backward(xv, dy, g, b, 1e-5)[0] * dy).sum())

    _, dx, sum_dy, sum_dy_xhat = _forward_backward(x, dy, gamma, beta, 1e-5)
    h = 1e-6
    num = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        num[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=0, atol=1e-7)
    for c in range(2):
        e = np.zeros(2)
        e[c] = h
        assert abs((loss(x, g=gamma + e) - loss(x, g=gamma - e)) / (2 * h) - sum_dy_xhat[c]) < 1e-7
        assert abs((loss(x, b=beta + e) - loss(x, b=beta - e)) / (2 * h) - sum_dy[c]) < 1e-7


def test_all_ones_dy_gives_zero_dx():
    # Why no test uses an all-ones dy: the input gradient is then exactly 0.
    x = np.random.default_rng(8).standard_normal((5, 2))
    _, dx, _, _ = _forward_backward(x, np.ones_like(x), np.ones(2), np.zeros(2), 1e-5)
    np.testing.assert_allclose(dx, 0, atol=1e-14)


def test_textbook_reference_agrees_with_exact_oracle():
    rng = np.random.default_rng(9)
    x, dy = rng.standard_normal((4, 3, 2, 2)), rng.standard_normal((4, 3, 2, 2))
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    y1, dx1, _, _ = plain_batch_norm(x, dy, g, b, 1e-5)
    y2, dx2, _, _ = exact_batch_norm(x, dy, g, b, 1e-5)
    np.testing.assert_allclose(y1, y2, atol=1e-12)
    np.testing.assert_allclose(dx1, dx2, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_elemt_returns_input_dtype(dtype):
    x = np.arange(12, dtype=dtype).reshape(3, 2, 2)
    y = F.batch_norm_elemt(x, np.zeros(2), np.ones(2), np.ones(2), np.zeros(2))
    assert y.dtype == dtype


def test_running_update_is_mindspore_convention():
    out = F.running_update(np.array([1.0]), np.array([3.0]), 0.9)
    assert out[0] == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
