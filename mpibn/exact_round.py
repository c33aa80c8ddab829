"""Correctly rounded quotients of exact integer sums, every channel at once (NumPy only).

After the Allreduce every rank holds, per channel, exact integers as
32-bit limbs (``mpibn.exact``). This module turns them into correctly
rounded float64 statistics without a Python loop over channels:

1. ``Digits``: each channel's limbs in use, cut out and re-cut into
   balanced 16-bit digits (int64, in [-2^15, 2^15): a product of two is
   below 2^30, and sums of many such products stay exact; no borrow runs
   up a negative number). Exact integer arithmetic on them: ``N S2 - S1^2``
   (``times``, ``square``, ``minus``) and ``T2 - mean T1`` (``times_rows``:
   a float per channel, taken as the integer it is).
2. ``round_all``: the top 112 bits of each exact numerator as a
   double-double (relative error below 2^-95), times an optional float,
   over the denominator (N, N^2, N (N - 1) or 1, a double-double), in
   double-double arithmetic (Dekker's products: NumPy has no fused
   multiply-add). The result q + ql is within 2^-94 |q| of the true
   quotient, and q is **certified** correctly rounded when |ql| plus
   2^-90 |q| stays below half the gap to q's neighbour on ql's side.
3. Rows that cannot be certified (a true quotient on or within 2^-90 of a
   midpoint between two floats: exact ties happen, e.g. a float32 mean
   over N = 2^16 values), or whose result leaves the normal range, or
   whose digits span too many bits, come back with ok = False; the caller
   finishes them with Python integers (CPython's int / int is correctly
   rounded).
"""
import numpy as np

__all__ = ["Digits", "round_all"]

DIGIT = 16
_LOW = (1 << DIGIT) - 1
_HALF = 1 << (DIGIT - 1)
MAX_LIMBS = 24             # a channel whose limbs in use span more is finished with Python ints
_TOP = 7                   # digits (112 bits) read into the double-double
_ERR = 2.0 ** -90          # certificate margin, relative (the error is below 2^-94)
_SPLIT = 134217729.0       # 2^27 + 1: Dekker's split of a float64 into two 26-bit halves


def _balance(d, rounds=None):
    """Carry base-2^16 digits (R, n) in place towards [-2^15, 2^15) (the top one: any size).

    Each round divides the carries by 2^16, so a few rounds end it (a run
    of digits 2^15 - 1 lengthens it by one round per digit, as rarely as
    that). ``rounds``: stop after that many, whatever is left; two rounds
    bring digits below 2^46 to within 2^15 + 32, "nearly balanced", which
    is all that the sign test and ``to_dd`` need: the top nonzero digit
    gives the sign, the digits below it adding up to less than 0.51 of its unit."""
    done = 0
    while rounds is None or done < rounds:
        carry = d[:, :-1] + _HALF
        carry >>= DIGIT
        if rounds is None and not carry.any():
            return d
        d[:, :-1] -= carry << DIGIT
        d[:, 1:] += carry
        done += 1
    return d


def _rows(d):
    return np.arange(d.shape[0])[:, None]


def _top(d):
    """(R,) index of each row's highest nonzero digit (0 for a zero row)."""
    return d.shape[1] - 1 - np.argmax(d[:, ::-1] != 0, axis=1)


def _shift_rows(d, shift, width):
    """out[r, j] = d[r, j - shift[r]] (0 outside): each row moved up by its own count of digits."""
    if (shift == shift[0]).all():                          # the usual case: one common shift
        out = np.zeros((d.shape[0], width), np.int64)
        n = max(0, min(d.shape[1], width - shift[0]))            # rows too wide are slow ones
        out[:, shift[0]:shift[0] + n] = d[:, :n]
        return out
    idx = np.arange(width) - shift[:, None]
    inside = (idx >= 0) & (idx < d.shape[1])
    return np.where(inside, d[_rows(d), np.clip(idx, 0, d.shape[1] - 1)], 0)


def _int_digits(n):
    """A non-negative Python int as a (1, k) int64 row of 16-bit digits."""
    out = []
    while True:
        out.append(n & _LOW)
        n >>= DIGIT
        if not n:
            return np.array([out], np.int64)


def _convolve(a, b):
    """Digit-wise product of digit arrays (R, n) and (R or 1, m): (R, n + m + 1), not carried.

    The outer product's anti-diagonals, summed: row i of the (n, n + m)
    padded products read as a (n, n + m - 1) array is shifted right by i."""
    rows, n = a.shape
    m = b.shape[1]
    skew = np.zeros((rows, n, n + m), np.int64)
    np.multiply(a[:, :, None], b[:, None, :], out=skew[:, :, :m])
    out = np.zeros((rows, n + m + 1), np.int64)
    out[:, :n + m - 1] = skew.reshape(rows, -1)[:, :n * (n + m - 1)].reshape(rows, n, n + m - 1).sum(axis=1)
    return out


class Digits:
    """Exact signed integers, one per row: value[r] = sum_j d[r, j] 2^(16 (base[r] + j) + exp[r]).

    ``slow`` marks rows left to the Python finish (their limbs span too much).
    """

    def __init__(self, d, base, exp, slow):
        self.d, self.base, self.exp, self.slow = d, base, exp, slow

    @classmethod
    def from_limbs(cls, limbs, exp):
        """From (R, K) 32-bit limbs holding integers (any sign, |limb| < 2^53: e.g.
        balanced limbs summed over the ranks) on the grid 2^(32 k + exp).

        Every row is cut at the lowest limb any row uses when the limbs in
        use span at most MAX_LIMBS; otherwise at its own lowest limb, and a
        row spanning more is left to Python."""
        limbs = np.asarray(limbs)
        rows, k = limbs.shape
        used = np.flatnonzero(limbs.any(axis=0))
        if used.size == 0 or used[-1] - used[0] < MAX_LIMBS:
            first = used[0] if used.size else 0
            lo = np.full(rows, first)
            win = limbs[:, first:first + MAX_LIMBS].astype(np.int64)
            slow = np.zeros(rows, bool)
        else:
            nz = limbs != 0
            lo = np.argmax(nz, axis=1)
            span = np.where(nz.any(axis=1), k - np.argmax(nz[:, ::-1], axis=1) - lo, 0)
            slow = span > MAX_LIMBS
            idx = lo[:, None] + np.arange(int(span[~slow].max(initial=1)))
            win = np.where((idx < k) & ~slow[:, None], limbs[_rows(limbs), np.minimum(idx, k - 1)], 0)
            win = win.astype(np.int64)
        width = int(np.flatnonzero(win.any(axis=0)).max(initial=0)) + 1
        d = np.zeros((rows, 2 * width + 4), np.int64)             # room for the carries
        win = win[:, :width]
        low = ((win + _HALF) & _LOW) - _HALF
        d[:, 0:2 * width:2] = low
        win -= low
        win >>= DIGIT
        d[:, 1:2 * width:2] = win
        return cls(_balance(d), 2 * lo, np.full(rows, exp), slow)

    @classmethod
    def stack(cls, parts):
        """One Digits of all the rows of ``parts``, in order."""
        width = max(p.d.shape[1] for p in parts)
        d = np.zeros((sum(p.d.shape[0] for p in parts), width), np.int64)
        start = 0
        for p in parts:
            d[start:start + p.d.shape[0], :p.d.shape[1]] = p.d
            start += p.d.shape[0]
        return cls(d, *(np.concatenate([getattr(p, f) for p in parts]) for f in ("base", "exp", "slow")))

    def magnitude(self):
        """(|value| as Digits, negative (R,) bool)."""
        neg = self.d[np.arange(self.d.shape[0]), _top(self.d)] < 0
        d = np.where(neg[:, None], -self.d, self.d)
        return Digits(d, self.base, self.exp, self.slow), neg

    def times(self, n):
        """value * n, n a non-negative Python int (digits left uncarried, below 2^50)."""
        return Digits(_convolve(self.d, _int_digits(n)), self.base, self.exp, self.slow)

    def square(self):
        """value^2 (its grid exponent doubles)."""
        return Digits(_convolve(self.d, self.d), 2 * self.base, 2 * self.exp, self.slow)

    def times_rows(self, values, exp):
        """value * values[r] exactly, on the grid exponent ``exp`` (values float64 (R,),
        finite; each value's unit must lie on or above 2^exp, as on the grids used here)."""
        mant, e = np.frexp(values)
        m = np.ldexp(mant, 53).astype(np.int64)                 # values = m 2^(e - 53), |m| < 2^53
        # m's unit relative to the new grid, split into whole digits (they move the
        # base) and 0..15 bits (they go into m's digits).
        q, r = np.divmod(self.exp - exp + e - 53, DIGIT)
        md = (np.abs(m)[:, None] >> np.arange(0, 4 * DIGIT, DIGIT)) & _LOW
        md <<= r[:, None]
        md *= np.sign(m)[:, None]
        return Digits(_convolve(self.d, md), self.base + q, np.full(len(q), exp), self.slow)

    def minus(self, other):
        """self - other (both on the same grid), aligned at each row's lower base."""
        base = np.minimum(self.base, other.base)
        up_a, up_b = self.base - base, other.base - base
        need = np.maximum(up_a + self.d.shape[1], up_b + other.d.shape[1])
        slow = self.slow | other.slow | (need > 4 * MAX_LIMBS)
        width = int(need[~slow].max(initial=1)) + 1
        up_a, up_b = np.where(slow, 0, up_a), np.where(slow, 0, up_b)
        d = _shift_rows(self.d, up_a, width)
        d -= _shift_rows(other.d, up_b, width)
        return Digits(_balance(d), base, self.exp, slow)

    def to_dd(self):
        """For non-negative values: (hi, lo, e) float64 (R,) with value = (hi + lo) 2^e to
        a relative error below 2^-95 (hi = 0 for a zero value): the top seven digits,
        the ones below adding up to less than half a unit of the seventh."""
        d = self.d
        top = _top(d)
        idx = top[:, None] - np.arange(_TOP)
        g = np.where(idx >= 0, d[_rows(d), np.maximum(idx, 0)], 0).astype(np.float64)
        g2 = (g[:, 0] * 65536.0 + g[:, 1]) * 65536.0 + g[:, 2]       # 48 bits and a sign: exact
        g1 = (g[:, 3] * 65536.0 + g[:, 4]) * 65536.0 + g[:, 5]
        hi = g2 * 2.0 ** 64
        b = g1 * 65536.0
        s = hi + b
        lo = (b - (s - hi)) + g[:, 6]                                 # Fast2Sum: |hi| >= |b|
        return s, lo, DIGIT * (top - (_TOP - 1) + self.base) + self.exp


def _two_prod(a, b):
    """(p, e) with p = fl(a b) and p + e = a b exactly (Dekker; no overflow here)."""
    p = a * b
    c = _SPLIT * a
    ah = c - (c - a)
    al = a - ah
    c = _SPLIT * b
    bh = c - (c - b)
    bl = b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def round_all(parts):
    """Correctly rounded value * mult / den for every row of ``parts``.

    parts: [(Digits, den, mult)], den a positive Python int below 2^106,
    mult None or float64 (R,) >= 0 and finite. Returns (q (R,), ok (R,)) over
    all the rows in order: q is correctly rounded where ok; elsewhere only
    close, and the caller must finish exactly.
    """
    value = Digits.stack([p for p, _, _ in parts])
    mag, negative = value.magnitude()
    hi, lo, e = mag.to_dd()
    den = [(float(n), float(n - int(float(n))), p.d.shape[0]) for p, n, _ in parts]
    dh = np.repeat([x for x, _, _ in den], [k for _, _, k in den])
    dl = np.repeat([x for _, x, _ in den], [k for _, _, k in den])
    mult = np.concatenate([np.ones(p.d.shape[0]) if m is None else m for p, _, m in parts])
    q, ok = _quotient(hi, lo, e, dh, dl, mult)
    return np.where(negative, -q, q), ok & ~value.slow


def _quotient(hi, lo, e, dh, dl, mult):
    """(hi + lo) 2^e * mult / (dh + dl), rounded, and where that is certified."""
    with np.errstate(all="ignore"):
        m, me = np.frexp(mult)
        p, pe = _two_prod(hi, m)
        pl = pe + lo * m
        hi = p + pl
        lo = pl - (hi - p)
        e = e + me
        q1 = hi / dh
        p, pe = _two_prod(q1, dh)
        r = (((hi - p) - pe) + lo) - q1 * dl
        q2 = r / dh
        q = q1 + q2
        ql = q2 - (q - q1)
        gap = np.spacing(q)
        frac, qe = np.frexp(q)
        below = np.where(frac == 0.5, gap / 2, gap)     # a power of two: the gap below is half
        slack = q * _ERR
        ok = np.where(ql >= 0, ql + slack < gap / 2, slack - ql < below / 2)
        ok &= np.isfinite(q) & (qe + e > -1021) & (qe + e < 1024)
        out = np.ldexp(q, e)
    zero = hi == 0
    return np.where(zero, 0.0, out), ok | zero
