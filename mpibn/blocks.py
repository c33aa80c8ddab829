"""Block plans for the math room (NumPy only, no formulas here).

The functions of ``mpibn.functional`` work on a (N, C, L) view and must
compute in float64 whatever the input dtype. Each of them hands ``each``
its formula as a body that works on one *block*: the block is converted to
float64 in a scratch buffer, the formula is applied there, and the result
is written out (or its per-channel sums kept). ``each`` chooses the plan
from the array's size:

* **whole** (x.size <= WHOLE): the array is one block, per-channel vectors
  are (C, 1) columns that NumPy broadcasts. One NumPy call per step of the
  formula and no Python loop at all: on small arrays the cost of a call
  (about 1 us) is what counts, not the values.
* **blocked** (bigger arrays): blocks of about ``BLOCK`` values, so that
  the float64 scratch stays in the CPU cache and no full-size float64
  temporary exists (a float32 activation of 8 MiB or more must not grow
  by more than its own size during a pass). The loop runs over blocks of
  thousands of values, each handed whole to NumPy: it visits channels one
  by one only when a channel holds at least B / 4 values, and splits a
  row only when one channel of one sample is bigger than a block.

Block shapes of the blocked plan (nb, cb, lb), with B = BLOCK::

    L > B           (1, 1, lb)   lb = B positions of one channel
    N * L >= B / 4  (nb, 1, L)   one channel, about B // L samples
    otherwise       (nb, cb, L)  several channels, nb * cb * L <= B

Per-channel vectors (mean, scale, ...) become plain scalars for a
one-channel block; for a block of several channels they are expanded once
per channel block to the block's full shape: NumPy adds two same-shape
arrays two to three times as fast as it broadcasts a (cb, 1) column over a
block, and the expansion is shared by every block of those channels. (The
whole plan broadcasts instead: each vector is used once per call there, and
an expansion would cost as much as the broadcast it saves.)

``sums`` and ``dots`` reduce a float64 block per channel over its sample
and position axes; for long rows they use ``np.vecdot`` (one BLAS dot per
row, several times faster than ``einsum``).
"""
import threading
from functools import lru_cache

import numpy as np

__all__ = ["BLOCK", "WHOLE", "Block", "plan", "each", "sums", "dots"]

# 2**15 float64 values = 256 KiB per buffer, so that a block's scratch
# and expanded vectors stay in a 0.5-2 MiB L2 cache. Tests set it tiny to
# run many blocks, partial blocks and split rows on small arrays.
BLOCK = 1 << 15

# Arrays of at most this many values are one block (the whole plan). Up
# to about 2^17 values the whole plan was as fast as the blocked one or
# faster (docs/performance.md); its float64 scratch (at most 2 buffers of
# 1 MiB, kept from call to call) is far below the 8 MiB of input from which
# the peak-memory bar applies. Tests set it to 0 to send small arrays
# through the blocked plan.
WHOLE = 1 << 17

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


class _All:
    """The whole plan's one block: all of the array, all channels."""

    __slots__ = ()
    index = (slice(None),) * 3
    c = slice(None)


_ALL = _All()


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


def plan(shape):
    """The plan ``each`` uses for a (N, C, L) array: ``"whole"``, or the
    blocked plan's block shape (nb, cb, lb) (for tests and the benchmark)."""
    size = shape[0] * shape[1] * shape[2]
    return "whole" if size <= WHOLE else _sizes(shape, BLOCK)


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


def each(x, vectors, k, body):
    """Call ``body(block, expanded, scratch)`` for every block of a (N, C, L) array x.

    ``block.index`` selects the block from x (or any array of x's shape)
    and ``block.c`` its channels. ``expanded`` holds each (C,) vector of
    ``vectors`` for the block's channels, in a form that broadcasts against
    the block: a (C, 1) column in the whole plan, a float64 scalar for a
    one-channel block, else an array of the block's shape; ``scratch`` k
    float64 buffers of the block's shape; both belong to the call only.
    Blocks come in a fixed order, so per-channel sums are reproducible.
    """
    if x.size <= WHOLE:
        # An empty array (N, H or W is 0: such a rank counts 0 values per
        # channel, as an empty batch does) has nothing to visit.
        if x.size:
            body(_ALL, [np.asarray(v, np.float64)[:, None] for v in vectors],
                 [buf.reshape(x.shape) for buf in _scratch(k, x.size)])
        return
    groups, full = _plan(x.shape, BLOCK)
    vectors = [np.asarray(v, np.float64) for v in vectors]
    size = full[0] * full[1] * full[2]
    wide = len(vectors) if full[1] > 1 else 0
    bufs = _scratch(k + wide, size)
    wide, bufs = [buf.reshape(full) for buf in bufs[k:]], bufs[:k]
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


_POOL = threading.local()


def _scratch(count, size):
    """``count`` float64 buffers of ``size`` values, reused from call to call.

    Fresh buffers of a few hundred KiB come from the operating system as
    untouched pages, and the first write of each page costs a page fault: on
    a (256, 1024) array that doubled the time of a backward pass. So the
    scratch memory is kept, one flat array per thread (two threads never
    share it), as big as the biggest request so far: at most 2 MiB, as
    ``each`` asks for at most 2 scratch buffers of WHOLE values, or 2
    buffers and 4 expanded vectors of BLOCK values.
    """
    flat = getattr(_POOL, "flat", None)
    if flat is None or flat.size < count * size:
        flat = _POOL.flat = np.empty(count * size)
    return [flat[i * size:(i + 1) * size] for i in range(count)]


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
