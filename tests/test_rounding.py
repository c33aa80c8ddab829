"""mpibn.rounding: float64 rounded once into bfloat16, whatever ml_dtypes does.

The reference is independent of ml_dtypes: every bfloat16 value is built
from its bit pattern (the top 16 bits of a float32), and the nearest one
to each float64 input is found with ties to even (even = lowest bit of the
pattern 0), in exact arithmetic (fractions).
"""
from fractions import Fraction

import numpy as np
import pytest

from mpibn import rounding


def _bfloat16_values():
    """All finite non-negative bfloat16 values, ascending, with their patterns."""
    patterns = np.arange(0x7F80, dtype=np.uint32)                 # 0 .. largest finite
    return (patterns << 16).view(np.float32).astype(np.float64), patterns


VALUES, PATTERNS = _bfloat16_values()
TOP = Fraction(2) ** 128                     # the next value after the largest: rounds to inf


def reference(v):
    if np.isnan(v) or np.isinf(v):
        return v
    a = Fraction(abs(float(v)))
    i = int(np.searchsorted(VALUES, float(a), side="right")) - 1      # VALUES[i] <= a (float(a) exact)
    lo, lo_pat = Fraction(VALUES[i]), int(PATTERNS[i])
    hi, hi_pat = (Fraction(VALUES[i + 1]), lo_pat + 1) if i + 1 < len(VALUES) else (TOP, 0x7F80)
    if a == lo:
        r = lo
    elif a - lo != hi - a:
        r = lo if a - lo < hi - a else hi
    else:
        r = lo if lo_pat % 2 == 0 else hi
    out = float("inf") if r == TOP else float(r)
    return -out if np.signbit(v) else out


def cases():
    rng = np.random.default_rng(3)
    values = list(rng.standard_normal(300) * 10.0 ** rng.integers(-40, 39, 300))
    for i in rng.integers(0, len(VALUES) - 1, 300):
        lo, hi = VALUES[i], VALUES[i + 1]
        mid = (lo + hi) / 2                                  # exact in float64
        values += [mid, np.nextafter(mid, 0), np.nextafter(mid, np.inf), -mid]
    values += [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0 + 2.0 ** -8 + 2.0 ** -40, 1.0 + 2.0 ** -8,
               2.0 ** -133, 1.5 * 2.0 ** -133, 2.5 * 2.0 ** -133, 2.0 ** -134, 2.0 ** -135, 3.0e-39,
               float(VALUES[-1]), float(VALUES[-1]) * (1 + 2.0 ** -9), 3.3961e38, 1e300, -1e300, 5e-324]
    return np.array(values)


def test_bfloat16_grid_is_round_to_nearest_even():
    v = cases()
    got = rounding.bfloat16_grid(v)
    want = np.array([reference(a) for a in v])
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert same.all(), [(a, g, w) for a, g, w in zip(v[~same], got[~same], want[~same])][:5]
    assert (np.signbit(got) == np.signbit(want)).all()


def test_grid_values_cast_exactly_through_float32():
    # A value on the bfloat16 grid is a float32 value too: a cast that goes
    # float64 -> float32 -> bfloat16 (ml_dtypes before 0.7) rounds nothing twice.
    g = rounding.bfloat16_grid(cases())
    finite = np.isfinite(g)
    assert (g[finite].astype(np.float32).astype(np.float64) == g[finite]).all()


def test_cast_and_store_round_once():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    v = cases()
    want = np.array([reference(a) for a in v])
    got = rounding.cast(v, bf16).astype(np.float64)
    dst = np.empty(v.shape, bf16)
    rounding.store(dst, v)
    for out in (got, dst.astype(np.float64)):
        assert ((out == want) | (np.isnan(out) & np.isnan(want))).all()
    assert rounding.finfo(bf16).nmant == 7 and rounding.finfo(np.float32).nmant == 23
