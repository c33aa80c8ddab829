"""Independent references for the tests: no code from mpibn is used here.

* ``exact_batch_norm``: exact rational arithmetic (fractions) for mean and
  variance, mpmath at 60 digits for the square root: the "true" y and dx of
  the concatenated batch, for small cases.
* ``plain_batch_norm``: the textbook float64 formulas on the concatenated
  batch (what a student would write), for larger cases.
* ``fraction_stats`` and ``as_float``: exact mean and variances of values,
  and their correct rounding to float64 (exact mode's tests).
"""
from fractions import Fraction

import mpmath
import numpy as np

mpmath.mp.dps = 60


def _ncl(x):
    x = np.asarray(x)
    return x.reshape(x.shape[0], x.shape[1], -1)


def exact_batch_norm(x, dy, gamma, beta, eps):
    """Exact y, dx, mean, var (biased) of batch norm over axis (0, 2, 3) / (0,).

    Returns float64 arrays of y and dx rounded once from 60-digit values,
    and mpmath values for mean and var (per channel lists).
    """
    x3, dy3 = _ncl(np.asarray(x, np.float64)), _ncl(np.asarray(dy, np.float64))
    n, c, l = x3.shape
    m = n * l
    y = np.empty(x3.shape)
    dx = np.empty(x3.shape)
    means, variances = [], []
    eps_f = Fraction(float(eps))
    for ch in range(c):
        xs = [Fraction(float(v)) for v in x3[:, ch, :].ravel()]
        ds = [Fraction(float(v)) for v in dy3[:, ch, :].ravel()]
        mean = sum(xs) / m
        var = sum((v - mean) ** 2 for v in xs) / m
        means.append(mean)
        variances.append(var)
        inv_std = 1 / mpmath.sqrt(mpmath.mpf(var.numerator) / var.denominator
                                  + mpmath.mpf(eps_f.numerator) / eps_f.denominator)
        g, b = mpmath.mpf(float(gamma[ch])), mpmath.mpf(float(beta[ch]))
        xhat = [(mpmath.mpf(v.numerator) / v.denominator - mpmath.mpf(mean.numerator) / mean.denominator)
                * inv_std for v in xs]
        dys = [mpmath.mpf(float(v)) for v in ds]
        mean_dy = mpmath.fsum(dys) / m
        mean_dy_xhat = mpmath.fsum(a * h for a, h in zip(dys, xhat)) / m
        yv = [g * h + b for h in xhat]
        dxv = [g * inv_std * (a - mean_dy - h * mean_dy_xhat) for a, h in zip(dys, xhat)]
        y[:, ch, :] = np.array([float(v) for v in yv]).reshape(n, l)
        dx[:, ch, :] = np.array([float(v) for v in dxv]).reshape(n, l)
    return y.reshape(np.shape(x)), dx.reshape(np.shape(x)), means, variances


def plain_batch_norm(x, dy, gamma, beta, eps):
    """Textbook float64 batch norm of a whole batch: y, dx, mean, biased var."""
    x3, dy3 = _ncl(np.asarray(x, np.float64)), _ncl(np.asarray(dy, np.float64))
    mean = x3.mean(axis=(0, 2), keepdims=True)
    var = ((x3 - mean) ** 2).mean(axis=(0, 2), keepdims=True)
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = (x3 - mean) * inv_std
    g = np.asarray(gamma, np.float64)[None, :, None]
    y = g * xhat + np.asarray(beta, np.float64)[None, :, None]
    dx = g * inv_std * (dy3 - dy3.mean(axis=(0, 2), keepdims=True)
                        - xhat * (dy3 * xhat).mean(axis=(0, 2), keepdims=True))
    shape = np.shape(x)
    return y.reshape(shape), dx.reshape(shape), mean.ravel(), var.ravel()


def ulp_distance(a, b):
    """Distance in units in the last place between arrays of one float dtype."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype
    itype = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    ia, ib = a.view(itype).astype(np.int64), b.view(itype).astype(np.int64)
    # Map the sign-magnitude float ordering onto a monotone integer line.
    top = np.int64(1) << (8 * a.dtype.itemsize - 1)
    ia = np.where(ia < 0, -(ia + top), ia)
    ib = np.where(ib < 0, -(ib + top), ib)
    return np.abs(ia - ib)


def fraction_stats(values):
    """(mean, biased variance, unbiased variance) of ``values``, exact (Fractions)."""
    xs = [Fraction(float(v)) for v in np.ravel(values)]
    n = len(xs)
    mean = sum(xs) / n
    m2 = sum((v - mean) ** 2 for v in xs)
    return mean, m2 / n, m2 / (n - 1)


def as_float(fraction):
    """Correctly rounded to float64 (CPython's int / int), +-inf past the largest."""
    try:
        return float(fraction)
    except OverflowError:
        return float("inf") if fraction > 0 else float("-inf")
