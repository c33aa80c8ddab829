"""Rounding float64 results into the caller's dtype, once (NumPy only).

Every result is computed in float64 and rounded once into the input's
dtype. For float16/32 NumPy's own cast does that. For bfloat16
(``ml_dtypes``, optional) the cast is ml_dtypes', and ml_dtypes before 0.7
(the versions that NumPy 1.x can use) converts float64 to bfloat16 through
float32, rounding twice: 1 + 2^-8 + 2^-40 becomes 1.0 instead of
1 + 2^-7, one unit in the last place off on values just above a midpoint.
So a bfloat16 result is first rounded to bfloat16's precision here, in
float64 (exactly: ``bfloat16_grid``), and then cast, which is then exact
in any version: one answer whatever ml_dtypes is installed.

``finfo`` is ``np.finfo``, also for bfloat16, which ``np.finfo`` refuses
under those versions (ml_dtypes has its own).
"""
import numpy as np

__all__ = ["finfo", "is_bfloat16", "bfloat16_grid", "store", "cast"]

# bfloat16: 8 significant bits (float64 has 53: 45 to drop), normal from 2^-126 on,
# subnormals multiples of 2^-133.
_DROP = np.uint64(45)
_HALF_MINUS_ONE = np.uint64((1 << 44) - 1)
_KEEP = ~np.uint64((1 << 45) - 1)
_ONE = np.uint64(1)
_SMALLEST_NORMAL, _SUBNORMAL_STEP = 2.0 ** -126, 2.0 ** -133
_TOO_BIG = 2.0 ** 128               # the first value past the largest bfloat16: infinity


def is_bfloat16(dtype):
    """Whether ``dtype`` is ``ml_dtypes.bfloat16`` (the library JAX uses), read
    from the dtype itself: ml_dtypes is optional and never imported here unless
    an array already has that dtype (an array can only have it once its owner
    imported ml_dtypes)."""
    return dtype.kind == "V" and dtype.name == "bfloat16"


def finfo(dtype):
    """``np.finfo(dtype)``; ``ml_dtypes.finfo`` for bfloat16."""
    dtype = np.dtype(dtype)
    if is_bfloat16(dtype):
        import ml_dtypes
        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


def bfloat16_grid(a):
    """float64 ``a`` rounded to the nearest bfloat16 value, ties to even, as float64.

    ::

        normal  (|a| >= 2^-126):  keep 8 significant bits: add 2^44 - 1 plus the
                                  lowest kept bit to the bits of a, clear the 45
                                  below (a carry moves into the exponent); 2^128
                                  and above (bfloat16's range ends below) is +-inf
        subnormal (|a| < 2^-126): the nearest multiple of 2^-133 (np.round: ties to even)
        NaN, +-inf:               themselves

    Every result is a bfloat16 value, so casting it to bfloat16 is exact.
    """
    a = np.asarray(a, dtype=np.float64)
    bits = a.view(np.uint64)
    rounded = ((bits + (_HALF_MINUS_ONE + ((bits >> _DROP) & _ONE))) & _KEEP).view(np.float64)
    small = np.abs(a) < _SMALLEST_NORMAL
    if small.any():
        rounded[small] = np.round(a[small] * 2.0 ** 133) * _SUBNORMAL_STEP
    over = np.abs(rounded) >= _TOO_BIG
    if over.any():
        rounded[over] = np.copysign(np.inf, a[over])
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = a[nan]
    return rounded


def store(dst, src):
    """``dst[...] = src`` (src float64), rounded once into dst's dtype."""
    dst[...] = bfloat16_grid(src) if dst.dtype.kind == "V" and is_bfloat16(dst.dtype) else src


def cast(a, dtype):
    """``a.astype(dtype)`` for float64 ``a``, rounded once."""
    dtype = np.dtype(dtype)
    return (bfloat16_grid(a) if is_bfloat16(dtype) else a).astype(dtype)
