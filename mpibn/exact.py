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

The three steps, each in its own module:

* this rank's exact sums: fixed-point pieces whose products and sums are
  exact integers in any summation order (``mpibn.exact_pieces``), put into
  the limbs here; a channel the pieces cannot take (a non-finite value, a
  range of exponents wider than their window) takes ``_general_sums``;
* the group's: each rank sends *balanced* limbs (|limb| <= 2^31 + 1, any
  sign), so the SUM Allreduce of float64 limbs only ever adds integers
  below P * 2^32 < 2^53: every partial sum is exact, in any order or tree
  the MPI library picks. Integer addition is associative, so the global
  limbs, and hence the statistics, are bitwise the same however the global
  batch is split across ranks (partition invariance);
* the finish (``exact_stats``, ``backward_means``): per channel, with N, S1 =
  sum x and S2 = sum x^2 held exactly::

    mean          = S1 / N                       rounded once to float64
    var (biased)  = (N S2 - S1^2) / N^2          rounded once to float64
    var_unbiased  = (N S2 - S1^2) / (N (N - 1))  rounded once to float64

  computed for every channel at once with exact digits and a certified
  double-double quotient (``mpibn.exact_round``); the few channels it
  cannot certify (exact ties, results outside the normal range) with
  Python integers (CPython's int / int true division is correctly rounded).

Non-finite inputs cannot live on the grid; they are summed separately in
IEEE arithmetic (``special``: only 0, +-inf and NaN occur there, and adding
those is order-free too) and override the exact part. Per channel
SUMMED_WIDTH float64 limbs travel, on top of the per-rank rows (measured
costs: docs/ground-truth.md, section "exact=True").
"""
from fractions import Fraction

import numpy as np

from .exact_pieces import piece_sums
from .exact_round import Digits, round_all

__all__ = ["LIN_LIMBS", "PROD_LIMBS", "SUMMED_WIDTH", "exact_sums", "limbs_to_ints",
           "round_fraction", "exact_stats", "backward_means"]

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


def exact_sums(u, w=None, *, balanced=False):
    """Exact per-channel sum of u and of u * w (w = u when None), as limbs.

    ::

        lin[c]     : limbs of sum_i u[i, c]              (C, LIN_LIMBS)  int64
        prod[c]    : limbs of sum_i u[i, c] * w[i, c]    (C, PROD_LIMBS) int64
        special[0] : IEEE sum of the non-finite u[:, c]  (C,) 0, +-inf or NaN
        special[1] : IEEE sum of u * w where a factor is non-finite

    u, w: (B, C) or (B, C, L) arrays of one shape, any float dtype (i runs
    over the B * L values of channel c). Most channels are summed from
    fixed-point pieces (``mpibn.exact_pieces``); one with a non-finite value
    or too wide a range of exponents goes through ``_general_sums``.

    The limbs come normalised (0..K-2 in [0, 2^32), the top one signed),
    or with ``balanced=True`` in the form that travels: every |limb| <=
    2^31 + 1, any sign. Balanced limbs keep a negative sum as sparse as a
    positive one (no run of 2^32 - 1 up to the top limb), and P ranks'
    limbs still add to less than 2^53 for P < 2^21.
    """
    u3, w3 = _ncl(u), None if w is None else _ncl(w)
    channels = u3.shape[1]
    lin = np.zeros((channels, LIN_LIMBS), np.int64)
    prod = np.zeros((channels, PROD_LIMBS), np.int64)
    special = np.zeros((2, channels))
    (lc, lv, le), (pc, pv, pe), slow = piece_sums(u3, w3)
    _balance(lin, _deposit(lin, lc, lv, le - LIN_BASE))
    _balance(prod, _deposit(prod, pc, pv, pe - PROD_BASE))
    for c in np.flatnonzero(slow):
        uc = u3[:, c, :].reshape(-1, 1)
        wc = None if w3 is None else w3[:, c, :].reshape(-1, 1)
        one_lin, one_prod, one_special = _general_sums(uc, wc)
        lin[c], prod[c] = _balanced_row(one_lin, LIN_LIMBS), _balanced_row(one_prod, PROD_LIMBS)
        special[:, c] = one_special[:, 0]
    if not balanced:
        normalise(lin)
        normalise(prod)
    return lin, prod, special


def _balance(acc, columns):
    """Carry int64 limbs (C, K) in place into [-2^31, 2^31] over ``columns`` (a slice).

    Two rounds of rounded carries: after the first, |limb| < 2^31 + 2^30
    (the limbs held less than 2^62); after the second, |limb| <= 2^31 + 1.
    No carry ripples, whatever the signs. The columns reach two past the
    highest deposit, so the carries stay inside.
    """
    view = acc[:, columns]
    for _ in range(2):
        carry = (view[:, :-1] + (1 << (LIMB_BITS - 1))) >> LIMB_BITS
        view[:, :-1] -= carry << LIMB_BITS
        view[:, 1:] += carry


def _balanced_row(limbs, width):
    """One channel's normalised limbs (1, K) -> balanced limbs (width,): sparse whatever its sign."""
    value = limbs_to_ints(limbs)[0]
    out = np.zeros(width, np.int64)
    for k in range(width - 1):
        out[k] = (value + (1 << (LIMB_BITS - 1))) % (1 << LIMB_BITS) - (1 << (LIMB_BITS - 1))
        value = (value - int(out[k])) >> LIMB_BITS
    out[-1] = value
    return out


def _ncl(a):
    """(B, C) or (B, C, L) -> a (B, C, L) view in a native float16/32/64 dtype."""
    a = np.asarray(a)
    if a.dtype not in (np.float16, np.float32, np.float64):
        a = a.astype(np.float64)
    return a[:, :, None] if a.ndim == 2 else a


def _deposit(acc, channel, value, offset):
    """acc (C, K) += value * 2^offset (int64 arrays; a negative offset only where value is a
    multiple of 2^-offset: its bits below the grid are zero). Returns the slice of
    columns that ``_balance`` must carry: from the lowest limb written to two past the highest."""
    if channel.size == 0:
        return slice(0, 0)
    under = offset < 0
    if under.any():
        value = np.where(under, value >> np.where(under, -offset, 0), value)
        offset = np.maximum(offset, 0)
    _add_at(acc, channel, value, offset)
    return slice(int(offset.min()) >> 5, min((int(offset.max()) >> 5) + 5, acc.shape[1]))


def _general_sums(u, w=None):
    """Exact per-channel sum of u and of u * w (w = u when None), as limbs: the general method.

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
    acc = np.asarray(limbs).astype(np.int64)                   # exact: the values are integers
    # Only the limbs in use: balanced limbs are few, and no carry has to run first.
    return [sum(int(row[k]) << (LIMB_BITS * int(k)) for k in np.flatnonzero(row)) for row in acc]


def round_fraction(num, den):
    """num / den (Python ints, den > 0) correctly rounded to float64; +-inf on overflow."""
    try:
        return num / den        # CPython: int true division is correctly rounded
    except OverflowError:
        return float("inf") if num > 0 else float("-inf")


def exact_stats(count, lin, prod, special=None):
    """Correctly rounded (mean, var, var_unbiased), each float64 (C,), from exact sums.

    count: N (int), the group's total; lin (C, LIN_LIMBS), prod (C, PROD_LIMBS)
    the group's limbs of S1 = sum x and S2 = sum x^2 (any limb form whose
    entries are integers below 2^53); special (2, C) the IEEE sums of
    non-finite values (see ``exact_sums``). With N = 1 the unbiased variance
    is NaN (0/0) and with N = 0 everything is 0. ::

        mean = S1 / N,   var = (N S2 - S1^2) / N^2,   unbiased = (N S2 - S1^2) / (N (N - 1))

    each rounded once: for every channel at once by ``mpibn.exact_round``
    (exact digits, a certified double-double quotient), and with Python
    integers for the channels it cannot certify.
    """
    count = int(count)
    channels = lin.shape[0]
    if count == 0:
        return np.zeros(channels), np.zeros(channels), np.zeros(channels)
    s1, s2 = Digits.from_limbs(lin, LIN_BASE), Digits.from_limbs(prod, PROD_BASE)
    m2 = s2.times(count).minus(s1.square())                   # N^2 var >= 0: exact
    parts = [(s1, count, None), (m2, count * count, None)]
    if count > 1:
        parts.append((m2, count * (count - 1), None))
    q, ok = round_all(parts)
    mean, var = q[:channels], q[channels:2 * channels]
    unbiased = q[2 * channels:] if count > 1 else np.full(channels, np.nan)
    for c in np.flatnonzero(~ok.reshape(-1, channels).all(axis=0)):
        s1c, s2c = limbs_to_ints(lin[c:c + 1])[0], limbs_to_ints(prod[c:c + 1])[0]
        mean[c], var[c], unbiased[c] = _stats_by_ints(count, s1c, s2c)
    if special is not None:
        # inf, -inf or NaN in the batch: what IEEE arithmetic gives (the mean
        # is the sum of the non-finite values; (inf - inf)^2 makes var NaN).
        bad = (special[0] != 0) | (special[1] != 0)
        mean = np.where(special[0] != 0, special[0], mean)
        var = np.where(bad, np.nan, var)
        unbiased = np.where(bad, np.nan, unbiased)
    return mean, var, unbiased


def _stats_by_ints(count, s1, s2):
    """(mean, var, unbiased) of one channel with Python integers: the exact finish."""
    m2 = count * s2 - s1 * s1                                 # N^2 var * 2^2148, >= 0
    scale = 1 << -PROD_BASE
    return (round_fraction(s1, count << -LIN_BASE), round_fraction(m2, count * count * scale),
            round_fraction(m2, count * (count - 1) * scale) if count > 1 else np.nan)


def backward_means(counts, lin, prod, mean, inv_std, special=None):
    """(mean_dy, mean_dy_xhat), each float64 (R,) and correctly rounded, from exact sums.

    Row r holds T1 = sum dy and T2 = sum dy * x over counts[r] values (the
    limbs of ``exact_sums(dy, x)``: lin, prod (R, K)), and the forward's
    rounded statistics mean[r], inv_std[r]. ::

        mean_dy      = T1 / N
        mean_dy_xhat = inv_std * (T2 - mean * T1) / N  =  inv_std * sum dy (x - mean) / N

    each rounded once: the exact value of the formula with the rounded
    mean and inv_std (not a sum of rounded xhat). Rows with N = 1 give a
    rank's own dbeta and dgamma, so the group's rows and the rank's own go
    through in one call. Where ``special`` (2, R) has a non-finite sum,
    that IEEE value takes over, as IEEE arithmetic would.
    """
    rows = len(counts)
    mean, inv_std = np.asarray(mean, np.float64), np.asarray(inv_std, np.float64)
    t1, t2 = Digits.from_limbs(lin, LIN_BASE), Digits.from_limbs(prod, PROD_BASE)
    usable = np.isfinite(mean) & np.isfinite(inv_std)
    centred = t2.minus(t1.times_rows(np.where(usable, mean, 0.0), PROD_BASE))
    runs = _runs(counts)                      # rows in order, in runs of one count each
    scale = np.where(usable, inv_std, 0.0)
    q, ok = round_all([(_rows_of(t1, a, b), n, None) for n, a, b in runs]
                      + [(_rows_of(centred, a, b), n, scale[a:b]) for n, a, b in runs])
    mean_dy, mean_dy_xhat = q[:rows], q[rows:]
    ok_rows = ok[:rows] & ok[rows:]
    for c in np.flatnonzero(~ok_rows & usable):
        mean_dy[c], mean_dy_xhat[c] = _means_by_ints(int(counts[c]), limbs_to_ints(lin[c:c + 1])[0],
                                                     limbs_to_ints(prod[c:c + 1])[0], mean[c], inv_std[c])
    with np.errstate(invalid="ignore", over="ignore"):
        mean_dy_xhat = np.where(usable, mean_dy_xhat, np.nan)
        if special is not None:
            bad = (special[0] != 0) | (special[1] != 0)
            mean_dy = np.where(special[0] != 0, special[0], mean_dy)
            mean_dy_xhat = np.where(bad, inv_std * (special[1] - mean * special[0]), mean_dy_xhat)
    return mean_dy, mean_dy_xhat


def _means_by_ints(count, t1, t2, mean, inv_std):
    """(mean_dy, mean_dy_xhat) of one channel with Python integers: the exact finish.

    mean = m 2^e with e >= LIN_BASE, so mean T1 sits on the product grid:
    2^-PROD_BASE (T2 - mean T1) = t2 - m t1 2^(e - LIN_BASE) is an integer."""
    m, e = _integer_ratio(mean)
    s, f = _integer_ratio(inv_std)
    centred = s * (t2 - ((m * t1) << (e - LIN_BASE)))          # 2^(f + PROD_BASE) units
    shift = f + PROD_BASE
    num, den = (centred << shift, count) if shift >= 0 else (centred, count << -shift)
    return round_fraction(t1, count << -LIN_BASE), round_fraction(num, den)


def _integer_ratio(value):
    """A finite float64 as (integer m, exponent e) with value = m 2^e (e >= -1074)."""
    num, den = float(value).as_integer_ratio()                 # den is a power of two
    return num, 1 - den.bit_length()


def _runs(counts):
    """[(count, start, stop)]: the runs of equal counts in row order."""
    counts = np.asarray(counts)
    edges = np.flatnonzero(np.diff(counts)) + 1
    starts, stops = np.concatenate([[0], edges]), np.concatenate([edges, [counts.size]])
    return [(int(counts[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def _rows_of(digits, start, stop):
    return Digits(digits.d[start:stop], digits.base[start:stop], digits.exp[start:stop],
                  digits.slow[start:stop])


def as_fraction(lin_value, base=LIN_BASE):
    """The exact rational value of one channel's integer sum (for tests and the curious)."""
    return Fraction(lin_value) * Fraction(2) ** base
