"""Exact sums for ``exact=True``: fixed-point integer limbs, correctly rounded statistics.

NumPy and the standard library only (no MPI). The idea: every finite float64
is an integer multiple of 2^-1074 (a 53-bit integer mantissa M times 2^lsb,
lsb >= -1074 with subnormals), and every product of two float64s an integer
multiple of 2^-2148. So a sum of values (or of products) is an integer on a
fixed grid, which we hold exactly as a vector of 32-bit limbs::

    sum_i v_i         = S_lin  * 2^LIN_BASE,    S_lin  = sum_k lin[k]  * 2^(32 k)
    sum_i u_i * w_i   = S_prod * 2^PROD_BASE,   S_prod = sum_k prod[k] * 2^(32 k)

The grid covers the whole float64 range (LIN_LIMBS = 68 limbs for values,
PROD_LIMBS = 134 for products, with 64 bits of headroom for the count), so
no exponent window has to be agreed between ranks before the one Allreduce.

Why it is exact and order-free: each rank normalises its limbs to [0, 2^32)
(the top limb keeps the sign and stays tiny), so the group's SUM Allreduce
of float64 limbs only ever adds integers below P * 2^32 < 2^53: every partial
sum is exact, in any order or tree the MPI library picks. Integer addition is
associative, so the global limbs, and hence the statistics, are bitwise the
same however the global batch is split across ranks (partition invariance).

Per channel the group then holds N, S1 = sum x and S2 = sum x^2 exactly, and::

    mean          = S1 / N                       rounded once to float64
    var (biased)  = (N S2 - S1^2) / N^2          rounded once to float64
    var_unbiased  = (N S2 - S1^2) / (N (N - 1))  rounded once to float64

computed with Python integers (CPython's int / int true division is
correctly rounded). Non-finite inputs cannot live on the grid; they are
summed separately in IEEE arithmetic (``special``: only 0, +-inf and NaN
occur there, and adding those is order-free too) and override the exact part.

Cost: per element about a dozen integer operations and two ``np.bincount``
scatters; per channel SUMMED_WIDTH float64 limbs travel, on top of the
per-rank rows (measured costs: docs/ground-truth.md, section "exact=True").
"""
from fractions import Fraction

import numpy as np

__all__ = ["LIN_LIMBS", "PROD_LIMBS", "SUMMED_WIDTH", "exact_sums", "limbs_to_ints",
           "round_fraction", "exact_stats", "round_sums"]

LIMB_BITS = 32
LIN_BASE = -1074            # the least subnormal
PROD_BASE = 2 * LIN_BASE    # lsb of the product of two mantissas
HEADROOM = 64               # bits for the count of summed terms, and the sign
# Highest bit of a value: offset of its lsb (<= 971 - LIN_BASE) + 53 bits (971: lsb of the largest).
LIN_LIMBS = -(-(971 - LIN_BASE + 53 + HEADROOM) // LIMB_BITS)          # 68
PROD_LIMBS = -(-(2 * 971 - PROD_BASE + 106 + HEADROOM) // LIMB_BITS)   # 134
SUMMED_WIDTH = LIN_LIMBS + PROD_LIMBS   # float64 numbers per channel in the summed region
SHARED_WIDTH = SUMMED_WIDTH             # its old name, for one release

_MASK = (1 << LIMB_BITS) - 1
_HALF = 26                  # lin: a 53-bit mantissa as two halves < 2^27
_THIRD = 18                 # products: mantissas as three pieces < 2^18
# Rows per chunk: a bin then sums at most 2^14 weights below 2^38 (< 2^52),
# exact in float64 whatever order bincount adds them in.
_ROWS = 1 << 14
# Bins per channel * channels above which bins are numbered through np.unique.
_MAX_BINS = 1 << 22


def _decompose(v):
    """v float64 (finite) -> (sign +-1.0, M int64 < 2^53, lsb exponent) with v = sign * M * 2^lsb.

    Read from the IEEE bits: M is the 52-bit fraction with the hidden bit
    (none for subnormals), lsb = max(biased exponent, 1) - 1075 >= -1074.
    """
    bits = np.ascontiguousarray(v, np.float64).view(np.int64)
    biased = (bits >> 52) & 0x7FF
    mant = bits & ((1 << 52) - 1)
    mant |= np.where(biased > 0, np.int64(1) << 52, np.int64(0))
    sign = np.where(bits < 0, -1.0, 1.0)
    return sign, mant, np.maximum(biased, 1) - 1075


def _add_at(acc, channel, value, offset):
    """acc (C, K) += value * 2^offset per entry (value int64, |value| < 2^54, offset >= 0)."""
    sign, value = np.sign(value), np.abs(value)
    limb, shift = offset >> 5, offset & 31
    low_bits = LIMB_BITS - shift
    pieces = ((value & ((np.int64(1) << low_bits) - 1)) << shift,     # each < 2^32
              (value >> low_bits) & _MASK,
              value >> low_bits >> LIMB_BITS)
    flat = acc.reshape(-1)
    base = channel * acc.shape[1] + limb
    for j, piece in enumerate(pieces):
        np.add.at(flat, base + j, sign * piece)


def _grouped(acc, channel, lsb, base, terms):
    """acc += sum_i sum_t weight_t[i] * 2^(lsb[i] + shift_t - base), per channel.

    Elements are first grouped by (channel, exponent) and their integer
    weights (|w| < 2^38) summed exactly with np.bincount; only the few
    non-empty groups are then shifted into limbs. terms: [(shift_t, w_t)].
    """
    lo = int(lsb.min())
    span = int(lsb.max()) - lo + 1
    keys = channel * span + (lsb - lo)
    bins = acc.shape[0] * span
    if bins > _MAX_BINS:             # widely spread exponents: number the groups present
        uniq, keys = np.unique(keys, return_inverse=True)
        bins = uniq.size
    else:
        uniq = None
    for shift, weight in terms:
        sums = np.bincount(keys, weights=weight, minlength=bins)
        nz = np.flatnonzero(sums)
        if nz.size == 0:
            continue
        key = nz if uniq is None else uniq[nz]
        _add_at(acc, key // span, sums[nz].astype(np.int64), key % span + lo + shift - base)


def normalise(acc):
    """Carry-propagate int64 limbs (C, K) in place: limbs 0..K-2 in [0, 2^32), top limb signed."""
    while True:
        carry = acc[:, :-1] >> LIMB_BITS           # floor: also right for negative limbs
        if not carry.any():
            return acc
        acc[:, :-1] -= carry << LIMB_BITS
        acc[:, 1:] += carry


def _pieces(mant):
    mask = (1 << _THIRD) - 1
    return mant & mask, (mant >> _THIRD) & mask, mant >> (2 * _THIRD)


def exact_sums(u, w=None):
    """Exact per-channel sum of u and of u * w (w = u when None), as limbs.

    ::

        lin[c]     : limbs of sum_i u[i, c]              (C, LIN_LIMBS)  int64
        prod[c]    : limbs of sum_i u[i, c] * w[i, c]    (C, PROD_LIMBS) int64
        special[0] : IEEE sum of the non-finite u[:, c]  (C,) 0, +-inf or NaN
        special[1] : IEEE sum of u * w where a factor is non-finite

    u, w: (n, C) arrays of any float dtype (converted to float64 exactly).
    Products are split exactly: with 18-bit pieces Mu = sum_i a_i 2^(18 i),
    Mw = sum_j b_j 2^(18 j), Mu * Mw = sum_k d_k 2^(18 k) with the diagonal
    sums d_k = sum_{i+j=k} a_i b_j < 3 * 2^36: integers, nothing rounded.
    """
    u = np.asarray(u, np.float64)
    w = u if w is None else np.asarray(w, np.float64)
    n, channels = u.shape
    lin = np.zeros((channels, LIN_LIMBS), np.int64)
    prod = np.zeros((channels, PROD_LIMBS), np.int64)
    special = np.zeros((2, channels))
    lin_u = u
    finite = np.isfinite(u) & np.isfinite(w)
    if not finite.all():
        bad_u = ~np.isfinite(u)
        with np.errstate(invalid="ignore", over="ignore"):
            special[0] = np.where(bad_u, u, 0.0).sum(axis=0)
            special[1] = np.where(finite, 0.0, u * w).sum(axis=0)
        lin_u = np.where(bad_u, 0.0, u)
        u, w = np.where(finite, u, 0.0), np.where(finite, w, 0.0)
    same = w is u
    channel = np.arange(channels, dtype=np.int64)
    for start in range(0, n, _ROWS):
        rows = slice(start, start + _ROWS)
        ch = np.broadcast_to(channel, lin_u[rows].shape).ravel()
        su, mu, eu = _decompose(u[rows].ravel())
        sign, mant, lsb = (su, mu, eu) if lin_u is u else _decompose(lin_u[rows].ravel())
        _grouped(lin, ch, lsb, LIN_BASE, [(_HALF, sign * (mant >> _HALF)),
                                          (0, sign * (mant & ((1 << _HALF) - 1)))])
        sw, mw, ew = (su, mu, eu) if same else _decompose(w[rows].ravel())
        a, b = _pieces(mu), _pieces(mw)
        sign = su * sw
        diagonals = [a[0] * b[0], a[0] * b[1] + a[1] * b[0],
                     a[0] * b[2] + a[1] * b[1] + a[2] * b[0],
                     a[1] * b[2] + a[2] * b[1], a[2] * b[2]]
        _grouped(prod, ch, eu + ew, PROD_BASE,
                 [(_THIRD * k, sign * d) for k, d in enumerate(diagonals)])
        # int64 limbs would overflow after ~2^31 additions of < 2^32: normalise per chunk.
        normalise(lin)
        normalise(prod)
    return lin, prod, special


def limbs_to_ints(limbs):
    """(C, K) limbs (int or float64 holding integers below 2^53, any sign) -> list of C Python ints."""
    acc = normalise(np.asarray(limbs).astype(np.int64))       # exact: the values are integers
    low = acc[:, :-1].astype("<u4")                            # each in [0, 2^32) after normalising
    top = LIMB_BITS * (acc.shape[1] - 1)
    return [int.from_bytes(low[c].tobytes(), "little") + (int(acc[c, -1]) << top)
            for c in range(acc.shape[0])]


def round_fraction(num, den):
    """num / den (Python ints, den > 0) correctly rounded to float64; +-inf on overflow."""
    try:
        return num / den        # CPython: int true division is correctly rounded
    except OverflowError:
        return float("inf") if num > 0 else float("-inf")


def exact_stats(count, lin, prod, special=None):
    """Correctly rounded (mean, var, var_unbiased), each float64 (C,), from exact sums.

    count: N (int), the group's total; lin (C, LIN_LIMBS), prod (C, PROD_LIMBS)
    the group's limbs of sum x and sum x^2; special (2, C) the IEEE sums of
    non-finite values (see ``exact_sums``). With N = 1 the unbiased variance
    is NaN (0/0) and with N = 0 everything is 0.
    """
    s1s, s2s = limbs_to_ints(lin), limbs_to_ints(prod)
    count = int(count)
    channels = len(s1s)
    mean, var, unbiased = np.zeros(channels), np.zeros(channels), np.zeros(channels)
    if count == 0:
        return mean, var, unbiased
    scale = 1 << -PROD_BASE                                   # 2^2148
    for c, (s1, s2) in enumerate(zip(s1s, s2s)):
        m2 = count * s2 - s1 * s1                             # N^2 var * 2^2148, >= 0
        mean[c] = round_fraction(s1, count << -LIN_BASE)
        var[c] = round_fraction(m2, count * count * scale)
        unbiased[c] = round_fraction(m2, count * (count - 1) * scale) if count > 1 else np.nan
    if special is not None:
        # inf, -inf or NaN in the batch: what IEEE arithmetic gives (the mean
        # is the sum of the non-finite values; (inf - inf)^2 makes var NaN).
        bad = (special[0] != 0) | (special[1] != 0)
        mean = np.where(special[0] != 0, special[0], mean)
        var = np.where(bad, np.nan, var)
        unbiased = np.where(bad, np.nan, unbiased)
    return mean, var, unbiased


def round_sums(lin, prod, count=1, special=None):
    """(sum u / count, sum u*w / count), each correctly rounded float64 (C,), from limbs.

    With ``special`` (2, C) from ``exact_sums``, a non-zero (inf or NaN)
    entry replaces the exact value, as IEEE arithmetic would.
    """
    count = int(count)
    a = np.array([round_fraction(s, count << -LIN_BASE) for s in limbs_to_ints(lin)], np.float64)
    b = np.array([round_fraction(s, count << -PROD_BASE) for s in limbs_to_ints(prod)], np.float64)
    if special is not None:
        a = np.where(special[0] != 0, special[0], a)
        b = np.where(special[1] != 0, special[1], b)
    return a, b


def as_fraction(lin_value, base=LIN_BASE):
    """The exact rational value of one channel's integer sum (for tests and the curious)."""
    return Fraction(lin_value) * Fraction(2) ** base
