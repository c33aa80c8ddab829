"""Cache-sized blocks for the math room (NumPy only, no formulas here).

The functions of ``mpibn.functional`` work on a (N, C, L) view and must
compute in float64 whatever the input dtype. Converting a whole float32
activation to float64 would double its memory and stream it through main
memory once per operation; instead each function walks the array in
*blocks* of about ``BLOCK`` values: one block is converted to float64 in a
small scratch buffer that stays in the CPU cache, the formula is applied
there, and the result is written out (or its per-channel sums kept) before
the next block is read. The loop runs over blocks; it is never a loop
over single channels or elements (unless one channel of one sample is
itself bigger than a block), and every block is handed whole to NumPy.

Block shapes (nb, cb, lb), with B = BLOCK (smaller for small arrays, so
that the scratch stays below the input's size)::

    L > B           (1, 1, lb)   lb = B positions of one channel
    N * L >= B / 4  (nb, 1, L)   one channel, about B // L samples
    otherwise       (nb, cb, L)  several channels, nb * cb * L <= B


``each`` visits the blocks channel block by channel block. Per-channel
vectors (mean, scale, ...) become plain scalars for a one-channel block;
for a block of several channels they are expanded once per channel block
to the block's full shape: NumPy adds two same-shape arrays about twice as
fast as it broadcasts a (cb, 1) column over a block, and the expansion is
shared by every block of those channels.

``sums`` and ``dots`` reduce a float64 block per channel over its sample
and position axes; for long rows they use ``np.vecdot`` (one BLAS dot per
row, several times faster than ``einsum``).
"""
from functools import lru_cache

import numpy as np

__all__ = ["BLOCK", "Block", "each", "sums", "dots"]

# 2**15 float64 values = 256 KiB per buffer, so that a block's scratch
# and expanded vectors stay in a 1-2 MiB L2 cache. Tests set it tiny to
# run many blocks, partial blocks and split rows on small arrays.
BLOCK = 1 << 15

# Rows shorter than this reduce with einsum (a BLAS call per row of a few
# values would cost more than it saves).
_VECDOT_MIN = 64

_vecdot = getattr(np, "vecdot", None)      # NumPy >= 2.0


class Block:
    """One block: ``index`` selects it from a (N, C, L) array, ``c`` is its
    channel slice, ``count`` = nb * lb (values per channel in the block),
    ``shape`` = (nb, cb, lb)."""

    __slots__ = ("index", "c", "count", "shape")

    def __init__(self, n, c, l):
        self.index = (n, c, l)
        self.c = c
        self.shape = (n.stop - n.start, c.stop - c.start, l.stop - l.start)
        self.count = self.shape[0] * self.shape[2]


def _sizes(shape, block):
    num, channels, length = shape
    if length > block:
        return 1, 1, block
    if num * length >= block // 4:
        # A channel holds a good share of a block: one channel per block, so
        # that per-channel vectors are plain scalars (no expansion at all).
        chunks = -(-num // max(1, block // length))
        return -(-num // chunks), 1, length
    cb = channels if channels * length <= block else max(1, block // length)
    nb = max(1, min(num, block // (cb * length)))
    return nb, cb, length


@lru_cache(maxsize=64)
def _plan(shape, block):
    """((channel slice, (Block, ...)), ...): the blocks, channel block by channel block."""
    num, channels, length = shape
    nb, cb, lb = _sizes(shape, block)
    spans = [(slice(n0, min(n0 + nb, num)), slice(l0, min(l0 + lb, length)))
             for n0 in range(0, num, nb) for l0 in range(0, length, lb)]
    groups = []
    for c0 in range(0, channels, cb):
        c = slice(c0, min(c0 + cb, channels))
        groups.append((c, tuple(Block(n, c, l) for n, l in spans)))
    return tuple(groups), (nb, cb, lb)


def _block(x):
    # Small arrays get smaller blocks, so that the scratch buffers (at most
    # six blocks of float64) stay under the size of the input itself.
    return min(BLOCK, max(256, x.nbytes // 64))


def each(x, vectors, k, body):
    """Call ``body(block, expanded, scratch)`` for every block of a (N, C, L) array x.

    ``expanded`` holds each (C,) vector of ``vectors`` for the block's
    channels: a float64 scalar for a one-channel block, else an array of
    the block's shape (a real array, not a stride-0 view); ``scratch`` k
    float64 buffers of the block's shape; both belong to the call only.
    Blocks come in a fixed order, so per-channel sums are reproducible.
    """
    if x.size == 0:
        # Nothing to visit: N, H or W is 0 (such a rank counts 0 values per
        # channel, as an empty batch does), and _sizes would divide by L = 0.
        return
    groups, full = _plan(x.shape, _block(x))
    vectors = [np.asarray(v, np.float64) for v in vectors]
    size = full[0] * full[1] * full[2]
    bufs = [np.empty(size) for _ in range(k)]
    wide = [np.empty(full) for _ in vectors] if full[1] > 1 else []
    # Lists, not tuples: tuples made per block would pile up on CPython's
    # tuple free list, which a memory soak test sees as growth.
    views = {}      # block shape -> (expanded, scratch) views, made once per shape
    for c, members in groups:
        if c.stop - c.start == 1:                   # one channel: scalars will do
            scalars = [v[c.start] for v in vectors]
            for b in members:
                view = views.get(b.shape)
                if view is None:
                    view = views[b.shape] = [buf[:b.count].reshape(b.shape) for buf in bufs]
                body(b, scalars, view)
            continue
        for w, v in zip(wide, vectors):
            w[:, :c.stop - c.start] = v[c, None]    # once per channel block
        for b in members:
            view = views.get(b.shape)
            if view is None:
                nb, cb, lb = b.shape
                view = views[b.shape] = ([w[:nb, :cb, :lb] for w in wide],
                                         [buf[:nb * cb * lb].reshape(b.shape) for buf in bufs])
            body(b, *view)


_ONES = np.ones(0)


def _ones(n):
    global _ONES
    if _ONES.size < n:
        _ONES = np.ones(n)
    return _ONES[:n]


def sums(a):
    """sum_{n,l} a[n, c, l] for a float64 block (nb, cb, lb) -> (cb,)
    (a scalar for a one-channel scratch block: one BLAS dot for all of it)."""
    nb, cb, lb = a.shape
    if cb == 1 and a.flags.c_contiguous:
        return a.reshape(-1) @ _ones(a.size)
    if lb == 1:
        return _ones(nb) @ a[:, :, 0]                   # BLAS gemv
    if _vecdot is not None and lb >= _VECDOT_MIN:
        return _vecdot(a, _ones(lb)).sum(axis=0)
    return a.sum(axis=(0, 2))


def dots(a, b):
    """sum_{n,l} a[n, c, l] * b[n, c, l] for float64 blocks -> (cb,) (or a scalar, as sums)."""
    if a.shape[1] == 1 and a.flags.c_contiguous and b.flags.c_contiguous:
        return a.reshape(-1) @ b.reshape(-1)
    if _vecdot is not None and a.shape[2] >= _VECDOT_MIN:
        return _vecdot(a, b).sum(axis=0)
    return np.einsum("ncl,ncl->c", a, b)
