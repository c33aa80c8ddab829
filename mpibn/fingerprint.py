"""Fingerprints of arrays: has an array changed, do two ranks hold the same one?

NumPy only. Two uses:

* ``fingerprint(x3)``: backward keeps forward's x by reference (no copy,
  for speed and memory). NumPy has no version counter on arrays (PyTorch
  bumps one on every in-place write and checks it in backward), so forward
  takes this fingerprint and backward compares it before using x: a change
  in between is an error instead of a silently wrong dx.
* ``digest(a)``: a short text that is equal on two ranks exactly when their
  arrays are bitwise equal (the construction agreement compares initial
  parameter values with it, ``mpibn.agree``).
"""
import hashlib
from functools import lru_cache

import numpy as np

__all__ = ["fingerprint", "digest"]

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

# Positions per (sample, channel) plane kept by value, and at most this many in all.
_PER_PLANE = 4
_MAX_SAMPLED = 1 << 13


def fingerprint(x3, full=True):
    """(word sum, sampled values) of a (N, C, L) array; compare with ``==``.

    ::

        word sum  = sum of x's raw bits, as unsigned integers, modulo 2^64
                    (None when not ``full``)
        sampled   = x[n, c, l] at up to 4 positions l of every plane (n, c)
                    (every s-th n when there would be more than 2^13 values), by value

    Changing any single element changes the word sum (its bits change by a
    non-zero amount below 2^64), so ``x *= 10``, ``x[0] += 1`` and
    ``x[...] = other`` are all caught. The sum cannot see where a value
    sits, so the sampled values are there to catch reorderings across
    samples and channels (``x[[0, 1]] = x[[1, 0]]``). Not caught: a
    reordering confined to unsampled positions, and the rare combination
    of several changes whose bit differences cancel modulo 2^64 while no
    sampled value changes.

    Cost: one read of x at memory speed (integer adds, no float64
    conversion) when x is C-contiguous, a strided read otherwise; with
    ``full=False`` only the samples (a few values per plane), which sees
    ``x *= 10`` or ``x[...] = other`` but not a change at an unsampled position.
    """
    if x3.size == 0:
        return 0, b""
    total = None
    if full and x3.flags.c_contiguous and x3.nbytes % 8 == 0:
        words = x3.reshape(-1).view(np.uint64)       # 8 bytes per add: the fastest read
        total = int(np.add.reduce(words, axis=None, dtype=np.uint64))   # wraps modulo 2^64
    elif full:
        words = x3.view(_UINT[x3.dtype.itemsize])    # same item size: any strides work
        total = int(np.add.reduce(words, axis=None, dtype=np.uint64))
    num, channels, length = x3.shape
    positions = _positions(length)
    step = max(1, -(-num * channels * positions.size // _MAX_SAMPLED))
    return total, x3[::step][:, :, positions].tobytes()


@lru_cache(maxsize=64)
def _positions(length):
    """Up to _PER_PLANE positions spread over [0, length), first and last included."""
    return np.unique(np.linspace(0, length - 1, _PER_PLANE).astype(np.intp))


def digest(a):
    """'<16 hex digits of a hash of the bytes> [first values]': equal for bitwise-equal arrays
    of one dtype; the first values make a difference readable."""
    a = np.ascontiguousarray(a)
    head = ", ".join(f"{v:.6g}" for v in a.reshape(-1)[:3].tolist())
    more = ", ..." if a.size > 3 else ""
    return f"{hashlib.blake2b(a.tobytes(), digest_size=8).hexdigest()} [{head}{more}]"
