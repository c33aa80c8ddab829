"""Exact per-channel sums from fixed-point pieces (``exact=True``'s local work; NumPy only).

The fast path of ``mpibn.exact.exact_sums``: Rump, Ogita and Oishi's
ExtractScalar used as an exact accumulator. Per block of a (B, C, L)
array, and per channel c of the block:

1. One pass over the raw bits gives E and LO with every |u| < 2^E and
   every nonzero u a multiple of 2^LO (from the largest and the smallest
   nonzero magnitude). All of the channel's values fit in W = E - LO bits.
2. X = u 2^-E (exact: a power of two; |X| < 1, a multiple of 2^-W) is
   split into K = ceil(W / b) pieces of b = 22 bits by adding and
   subtracting the magic constants sigma_i = 1.5 * 2^(52 - (i+1) b)::

       P_i = fl(r_i + sigma_i) - sigma_i,   r_{i+1} = r_i - P_i,   r_0 = X,   P_{K-1} = r_{K-1}

   P_i is an integer multiple of 2^-(i+1)b with |P_i| <= 2^-ib, and
   X = sum_i P_i exactly.
3. A product P_i P_j is an integer of magnitude at most 2^(2b) = 2^44 in
   units of 2^-(i+j+2)b, so a sum of 2^9 = CHUNK of them, and each of its
   partial sums, is an integer of magnitude at most 2^53, which float64
   holds: **exact in any summation order**, which is why BLAS may add it (one
   ``vecdot`` per chunk). The chunks' sums are added as int64. The
   entries sum P_i and sum P_i P_j (backward: sum Q_i P_j over the pieces
   Q of dy and P of x) are therefore exact integers; ``exact.exact_sums``
   puts them into its 32-bit limbs at their binary position.

float16 and float32 products are exact in float64 (24 + 24 bits), so
their backward sums dy * x directly, split into pieces of 2b = 44 bits
(a chunk's sum of them stays within 2^53 too): fewer dots than the pieces
of dy times the pieces of x.

Channels the pieces cannot take (a non-finite value, more than KMAX
pieces, an exponent outside [-1000, 1000]) are reported to the caller,
which sums them with the general method.
"""
import threading

import numpy as np

from .rounding import finfo

__all__ = ["BITS", "CHUNK", "KMAX", "piece_sums"]

BITS = 22                  # b: a piece is an integer of magnitude at most 2^22 in its unit
CHUNK = 1 << 9             # values summed in float64 at once: 2^(2b) * 2^9 = 2^53, exact
KMAX = 6                   # at most 6 pieces: W <= 132 bits; wider channels go the slow way
_BLOCK = 1 << 17           # values per block: few NumPy calls per value (measured best of 2^15..2^17)
_WHOLE = 1 << 17           # an array this small is one block, every channel at once
_EXP = 1000                # |E| bound: 2^-E and every piece product stay normal floats
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _sigma(bits):
    """The magic constant that rounds |r| < 2^51 ulp to a multiple of ulp = 2^-bits."""
    return 1.5 * 2.0 ** (52 - bits)


def _plan(shape):
    """Block index tuples of a (B, C, L) array: one block for a small array, else
    blocks of about _BLOCK values, of several channels while a channel holds
    less than that, and rows that ``_chunks`` can cut into pieces of <= CHUNK."""
    num, channels, length = shape
    split = _row_split(length)
    if split and num * channels * length <= _WHOLE:
        return [(slice(None),) * 3]
    if length > _BLOCK:
        return [(slice(n, n + 1), slice(c, c + 1), slice(l, l + _BLOCK))
                for c in range(channels) for n in range(num) for l in range(0, length, _BLOCK)]
    if not split or num * length >= _BLOCK:
        nb = max(1, _BLOCK // length)
        return [(slice(n, n + nb), slice(c, c + 1), slice(None))
                for c in range(channels) for n in range(0, num, nb)]
    cb = max(1, _BLOCK // (num * length))
    return [(slice(None), slice(c, c + cb), slice(None)) for c in range(0, channels, cb)]


def _row_split(length):
    """k with length = k * m, m <= CHUNK (m >= 64 when length > CHUNK, for BLAS to be
    worth its call), so that a row of length values sums in k exact pieces; 0 if none."""
    if length <= CHUNK:
        return 1
    return next((k for k in range(-(-length // CHUNK), length // 64 + 1) if length % k == 0), 0)


def _scan(a):
    """(E, LO, bad) per channel of a (nb, cb, lb) block in its own float dtype.

    Every |a| < 2^E and every nonzero a is a multiple of 2^LO; bad marks a
    non-finite value; an all-zero channel has E = LO = 0 (no piece needed).
    """
    info = finfo(a.dtype)
    mant, bias = info.nmant, info.maxexp - 1
    uint = _UINT[a.itemsize]
    m = a.view(uint) & uint((1 << (8 * a.itemsize - 1)) - 1)
    axes = None if a.shape[1] == 1 else (0, 2)
    top = np.atleast_1d(m.max(axis=axes)).astype(np.int64) >> mant
    m -= uint(1)                       # zeros wrap to the largest: the min is the smallest nonzero - 1
    low = (np.atleast_1d(m.min(axis=axes)) >> uint(mant)).astype(np.int64)
    bad = top == 2 * bias + 1
    zero = low >= 2 * bias + 1         # no nonzero value (or non-finite ones only)
    high = np.maximum(top, 1) - bias + 1
    lo = np.maximum(low, 1) - bias - mant
    return np.where(zero, 0, high), np.where(zero, 0, lo), bad & ~zero


def _chunks(a, b=None):
    """Exact partial sums of a (or a * b) per channel: float64 (m, cb), each over at most
    CHUNK values, each an integer below 2^53 in the caller's units."""
    nb, cb, lb = a.shape
    if cb == 1:
        a = a.reshape(-1)
        b = None if b is None else b.reshape(-1)
        full = a.size - a.size % CHUNK
        rows = a[:full].reshape(-1, CHUNK)
        head = _ones(CHUNK) @ rows.T if b is None else _vecdot(rows, b[:full].reshape(-1, CHUNK))
        tail = np.add.reduce(a[full:]) if b is None else a[full:] @ b[full:]
        return np.append(head, tail)[:, None]
    if lb > CHUNK:                                # rows cut into k pieces of <= CHUNK values
        k = _row_split(lb)
        a = a.reshape(nb, cb, k, lb // k)
        b = None if b is None else b.reshape(a.shape)
        part = _vecdot(a, _ones(lb // k) if b is None else b)
        return part.transpose(0, 2, 1).reshape(-1, cb)
    if lb >= 64:                                  # rows of L <= CHUNK values: one BLAS dot each
        return _vecdot(a, _ones(lb) if b is None else b).reshape(nb, cb)
    step = max(1, CHUNK // lb)
    return np.stack([np.einsum("ncl->c", a[n:n + step]) if b is None else
                     np.einsum("ncl,ncl->c", a[n:n + step], b[n:n + step]) for n in range(0, nb, step)])


def _vecdot(a, b):
    """Sums of a * b over the last axis, broadcast: ``np.vecdot``, which NumPy
    has from 2.0 on, or einsum's same sums before (setup.cfg allows NumPy
    1.22, and the MindSpore extra needs NumPy < 2). Exact either way: the
    products and partial sums are integers below 2^53."""
    vecdot = getattr(np, "vecdot", None)
    return vecdot(a, b) if vecdot is not None else np.einsum("...i,...i->...", a, b)


_ONES = np.ones(0)


def _ones(n):
    global _ONES
    if _ONES.size < n:
        _ONES = np.ones(n)
    return _ONES[:n]


def _total(partials, bits):
    """(cb,) int64: the exact sum of partial sums in units of 2^-bits."""
    return np.ldexp(partials, bits).astype(np.int64).sum(axis=0)


_POOL = threading.local()


def _scratch(count, shape):
    """``count`` float64 buffers of ``shape``, reused from block to block and call to
    call; one pool per thread (simulated ranks run in threads: they must not share)."""
    size = int(np.prod(shape))
    flat = getattr(_POOL, "flat", None)
    if flat is None or flat.size < count * size:
        flat = _POOL.flat = np.empty(count * size)
    return [flat[i * size:(i + 1) * size].reshape(shape) for i in range(count)]


def _scaled(a, scale, out):
    """out = a * 2^-E per channel, in float64 (exact)."""
    np.copyto(out, a)
    out *= scale
    return out


def _split(x, count, bufs, bits, lin):
    """Split x (float64, |x| < 1, a multiple of 2^-(count bits)) in place into ``count``
    pieces of ``bits`` bits (the last one stays in x).

    With ``lin``, also the exact value sums [(int64 (cb,), unit exponent)]: of
    P_i for i < first, then of the rest r_first, where the rest spans at
    most 44 bits (two 22-bit pieces, one 44-bit piece): its sum over a
    chunk stays below 2^53."""
    pieces, sums = [], []
    first = max(count - 2 * BITS // bits, 0)
    for i in range(count - 1):
        if lin and i == first:
            sums.append((_total(_chunks(x), count * bits), -count * bits))
        p = bufs[i]
        sigma = _sigma((i + 1) * bits)
        np.add(x, sigma, out=p)
        p -= sigma
        x -= p
        pieces.append(p)
        if lin and i < first:
            sums.append((_total(_chunks(p), (i + 1) * bits), -(i + 1) * bits))
    if lin and first >= count - 1:
        sums.append((_total(_chunks(x), count * bits), -count * bits))
    pieces.append(x)
    return pieces, sums


def piece_sums(u, w=None):
    """Exact sums of u and of u * w (w = u when None) per channel, as integer entries.

    u, w: (B, C, L) native float16/32/64 arrays of one shape. Returns
    (lin, prod, slow): lin and prod are each (channels, values, exponents),
    int64 arrays of one length, with

        sum_i u[i, c]            = sum of c's lin entries   value * 2^exponent
        sum_i u[i, c] * w[i, c]  = sum of c's prod entries  value * 2^exponent

    for every channel not in ``slow`` (bool (C,)): those need the general method.
    """
    channels = u.shape[1]
    slow = np.zeros(channels, bool)
    lin, prod = [], []
    arange = np.arange(channels)
    exact_products = w is not None and u.itemsize <= 4 and w.itemsize <= 4
    for index in (_plan(u.shape) if u.size else []):
        a = u[index]
        b = a if w is None else w[index]
        ch = arange[index[1]]
        eu, lou, bad = _scan(a)
        ew, low, bad_w = (eu, lou, bad) if w is None else _scan(b)
        ku, kw = -(-(eu - lou) // BITS), -(-(ew - low) // BITS)
        out = bad | bad_w | (ku > KMAX) | (kw > KMAX) | (np.abs(eu) > _EXP) | (np.abs(ew) > _EXP)
        if out.all():
            slow[ch] = True
            continue
        slow[ch[out]] = True
        ku, kw = np.where(out, 1, np.maximum(ku, 1)), np.where(out, 1, np.maximum(kw, 1))
        with np.errstate(invalid="ignore", over="ignore"):     # slow channels: dropped below
            if exact_products:
                entries = _product_entries(a, b, eu, ew, lou, low, out)
            else:
                entries = _gram_entries(a, None if w is None else b, eu, ew, int(ku.max()),
                                        int(kw.max()), out)
        for kind, value, exponent in entries:
            (lin if kind == 0 else prod).append((ch, value, exponent))
    return _stack(lin, slow), _stack(prod, slow), slow


def _scale(e, out, shape):
    """2^-E per channel, shaped to broadcast over a block (0 for slow channels)."""
    scale = np.where(out, 0.0, np.ldexp(1.0, -np.where(out, 0, e)))
    return scale[0] if shape[1] == 1 else scale[None, :, None]


def _gram_entries(a, b, eu, ew, count_u, count_w, out):
    """Entries (0 = value, 1 = product; int64 (cb,); exponent (cb,)) of one block from
    the pieces of a (and of b: the Gram of a with itself when b is None)."""
    bufs = _scratch(count_u + (0 if b is None else count_w), a.shape)
    x = _scaled(a, _scale(eu, out, a.shape), bufs[0])
    pu, sums = _split(x, count_u, bufs[1:count_u], BITS, True)
    entries = [(0, value, eu + unit) for value, unit in sums]
    if b is None:
        for i in range(count_u):
            for j in range(i, count_u):
                total = _total(_chunks(pu[i], pu[j]), (i + j + 2) * BITS)
                entries.append((1, total if i == j else 2 * total, 2 * eu - (i + j + 2) * BITS))
        return entries
    y = _scaled(b, _scale(ew, out, a.shape), bufs[count_u])
    pw, _ = _split(y, count_w, bufs[count_u + 1:], BITS, False)
    for i, p in enumerate(pu):
        for j, q in enumerate(pw):
            entries.append((1, _total(_chunks(p, q), (i + j + 2) * BITS), eu + ew - (i + j + 2) * BITS))
    return entries


def _product_entries(a, b, eu, ew, lou, low, out):
    """Entries of one block for float16/32 a and b: their products are exact in float64,
    so sum a * b is a sum of values, in pieces of 2b bits."""
    wide = 2 * BITS
    count_a = int(np.where(out, 1, -(-(eu - lou) // wide)).max())
    count_ab = int(np.where(out, 1, -(-(eu - lou + ew - low) // wide)).max())
    bufs = _scratch(2 + max(count_a, count_ab), a.shape)
    x = _scaled(a, _scale(eu, out, a.shape), bufs[0])
    y = _scaled(b, _scale(ew, out, a.shape), bufs[1])
    y *= x                                         # exact: two 24-bit mantissas
    _, sums = _split(y, count_ab, bufs[2:], wide, True)
    entries = [(1, value, eu + ew + unit) for value, unit in sums]
    _, sums = _split(x, count_a, bufs[2:], wide, True)
    return entries + [(0, value, eu + unit) for value, unit in sums]


def _stack(entries, slow):
    """[(channels, values, exponents)] -> three concatenated int64 arrays, without the
    entries of slow channels (whatever their pieces held: they go the general way)."""
    if not entries:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    ch, value, exponent = (np.concatenate([e[i] for e in entries]).astype(np.int64) for i in range(3))
    keep = ~slow[ch]
    return ch[keep], value[keep], exponent[keep]
