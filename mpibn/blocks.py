"""Block plans and scratch buffers for the math room (NumPy only, no formulas here).

The functions of ``mpibn.functional`` work on a (B, C, L) view and compute
in float64 whatever the input dtype. They walk the array block by block:
a block is copied into a float64 *scratch* buffer (``load``), the formula
is applied there, and the result is written out (``store``) or its
per-channel sums kept (``sums``). This module decides the blocks and owns
the buffers; the formulas stay in ``mpibn.functional``.

**One answer on every machine.** Every per-channel sum here is NumPy's own
``np.add.reduce`` over float64 values, never a BLAS call (``@``, ``dot``,
``einsum``, ``np.vecdot``): NumPy's wheels ship an OpenBLAS that picks its
kernel from the CPU at run time, and each kernel adds in a different order,
so BLAS sums differ in their last bits from one machine to the next. The
order of ``np.add.reduce`` depends only on the shapes and strides (and on
the NumPy version), so the same input gives the same bits on every CPU
(tests/test_cross_kernel.py checks it under four OpenBLAS kernels).

**Layouts.** A block's scratch is laid out so that each channel's values
are *contiguous* in it, because that is where NumPy sums well:

* 4-D input (L > 1): channel-major, (cb, nb, lb). One copy from
  the transposed view ``x[n, c, l].transpose(1, 0, 2)`` casts and gathers
  in one pass, and ``sums`` reduces each channel's nb * lb contiguous
  values with NumPy's pairwise summation (blocks of 128 values, 8
  accumulators, then halves; error growth about log2 of the length).
  Per-channel vectors broadcast as (cb, 1) columns over contiguous rows
  (up to twice the time of a same-shape operation on short rows, where
  NumPy's per-row cost shows); a one-channel block gets plain scalars.
* 2-D input (L = 1): natural, (nb, C). Transposing (B, C) would cost a
  strided pass over the whole array (8x torch at (256, 1024) in the
  prototype), so ``sums`` adds rows instead, over a reshaped view with
  ``ACC`` accumulators: rows j, j + ACC, j + 2 ACC, ... go to accumulator j
  (each a vectorised, sequential column sum), and the ACC partial sums are
  then added in order. Error growth about nb / ACC + ACC (blocks of fewer
  than ``ACC_ROWS`` rows are added in order: about nb). A float64 2-D
  block is already in this layout: it is read as a view (no copy), and a
  float64 2-D result is written straight into the output. Element-wise
  formulas see a 2-D block of short rows in wide rows (``Wide``: (nb, C)
  as (nb / r, r * C), each (C,) vector tiled r times), where NumPy's
  per-row cost does not show; the sums still see (nb, C).

Blocks of one channel group are visited in sample order, and their sums
added in that order, so per-channel sums are reproducible.

**Never convert and broadcast in one call.** A NumPy call that casts
float32 to float64 *and* broadcasts (``scratch -= x_f32 - mean``) takes a
buffered path, 1.2 to 4 ns per value against about 0.7 to 1 for a plain
copy plus a float64 operation: ``load`` converts, then the formulas work on
float64 scratch only.

**Kept between two calls.** ``reduce(..., keep=True)`` and
``shifted_sums(..., keep=True)`` on an array of one block leave their
float64 buffers (backward's dy and x - mean; forward's x) in a second
pool, and ``each_kept`` runs the next formula on them without loading
again: the caller passes it on at once, on the same thread.

**Plans.** ``plan(shape)`` is the block shape (nb, cb, lb), or ``"whole"``
when the array is at most ``WHOLE`` values: one block, one NumPy call per
step of a formula, no Python loop (on small arrays a call, about 1 us,
costs more than the values). Bigger arrays use blocks of at most ``BLOCK``
values so that no full-size float64 temporary exists (a float32
activation then streams from memory as float32)::

    4-D, B * L <= BLOCK   (B, cb, L)     cb = BLOCK // (B * L) channels
    4-D, L <= BLOCK       (nb, 1, L)     nb = BLOCK // L samples of one channel
    4-D, L > BLOCK        (1, 1, BLOCK)  a split row
    2-D                   (nb, cb, 1)    cb = min(C, BLOCK), nb = BLOCK // cb rows
"""
import threading
from functools import lru_cache

import numpy as np

from . import rounding

__all__ = ["BLOCK", "WHOLE", "ACC", "Plan", "plan", "plan_for", "whole", "reduce", "each", "each_kept",
           "shifted_sums", "sums"]

# 2**17 float64 values = 1 MiB per buffer: a block is as big as the
# whole plan's one block. Bigger blocks mean fewer trips through the Python
# loop (a 4-D block of 2**15 values cost 10 to 25 % more time per value,
# measured side by side: docs/performance.md), and the scratch (at most 3
# MiB, kept from call to call, plus 3 for ``keep``) stays far below the 8
# MiB of input from which the peak-memory bar applies. Tests set it tiny to
# run many blocks, partial blocks and split rows on small arrays.
BLOCK = 1 << 17

# Arrays of at most this many values are one block (the whole plan): its
# float64 scratch (at most 3 buffers of 1 MiB, kept from call to call) is
# far below the 8 MiB of input from which the peak-memory bar applies.
# Tests set it to 0 to send small arrays through the blocked plan.
WHOLE = 1 << 17

# Accumulators of a 2-D column sum (rows per accumulator = rows / ACC), for
# blocks of at least ACC_ROWS rows (below, the rows are added in order: the
# reshaped sum costs 1.5x a plain one, and f(nb) <= ACC_ROWS anyway).
ACC, ACC_ROWS = 8, 64


class Plan:
    """The blocks of one (B, C, L) shape.

    ``blocks``: ((n, c, l) slices, (nb, cb, lb), first) per block, channel
    group by channel group, samples in order; ``first`` is True for the
    first block of its channel group (its sums start the group's totals).
    ``major``: True for the channel-major layout (4-D), False for rows (2-D).
    """

    __slots__ = ("shape", "blocks", "major", "full", "whole")

    def __init__(self, shape, block, whole):
        num, channels, length = shape
        self.shape = shape
        self.major = length > 1
        self.whole = whole
        nb, cb, lb = (num, channels, length) if whole else _sizes(shape, block)
        nb, cb, lb = self.full = (max(nb, 1), max(cb, 1), max(lb, 1))    # 1: an empty array
        self.blocks = []
        for c0 in range(0, channels, cb):
            c = slice(c0, min(c0 + cb, channels))
            first = True
            for n0 in range(0, num, nb):
                n = slice(n0, min(n0 + nb, num))
                for l0 in range(0, length, lb):
                    l = slice(l0, min(l0 + lb, length))
                    size = (n.stop - n.start, c.stop - c.start, l.stop - l.start)
                    self.blocks.append(((n, c, l), size, first))
                    first = False


def _sizes(shape, block):
    num, channels, length = shape
    if length == 1:
        cb = min(channels, block)
        return max(1, min(num, block // cb)), cb, 1
    if length > block:
        return 1, 1, block
    if num * length <= block:
        return num, max(1, min(channels, block // (num * length))), length
    return max(1, block // length), 1, length


def plan(shape):
    """``"whole"``, or the blocked plan's block shape (nb, cb, lb), for a
    (B, C, L) array (for tests and the benchmark)."""
    size = shape[0] * shape[1] * shape[2]
    return "whole" if size <= WHOLE else _sizes(shape, BLOCK)


def plan_for(shape):
    """The ``Plan`` for a (B, C, L) shape (cached)."""
    size = shape[0] * shape[1] * shape[2]
    return _plan(shape, BLOCK, size <= WHOLE)


@lru_cache(maxsize=128)
def _plan(shape, block, whole):
    return Plan(shape, block, whole)


_POOL = threading.local()


def _scratch(count, size):
    """``count`` float64 buffers of ``size`` values, reused from call to call.

    Fresh buffers of a few hundred KiB come from the operating system as
    untouched pages, and the first write of each page costs a page fault:
    on a (256, 1024) array that doubled the time of a backward pass. So the
    scratch memory is kept, one flat array per thread (two threads never
    share it), as big as the biggest request so far: at most 3 MiB (three
    buffers of WHOLE values), and as much again for the second pool that
    ``reduce(..., keep=True)`` fills.
    """
    flat = getattr(_POOL, "flat", None)
    if flat is None or flat.size < count * size:
        flat = _POOL.flat = np.empty(count * size)
        _POOL.views = {}
    return [flat[i * size:(i + 1) * size] for i in range(count)]


def scratch(p, size, count):
    """``count`` float64 buffers for a block of shape ``size`` (nb, cb, lb)
    of plan ``p``, stacked: (count, cb, nb * lb) channel-major or
    (count, nb, cb) rows. Views into the thread's pool, made once per shape."""
    views = getattr(_POOL, "views", None)
    key = (p.major, p.full, size, count)
    if views is not None and key in views:
        return views[key]
    nb, cb, lb = p.full
    full = nb * cb * lb
    _scratch(count, full)                            # grows the pool (and resets views) if needed
    n, c, l = size
    flat = _POOL.flat[:count * full].reshape(count, full)[:, :n * c * l]
    got = _POOL.views[key] = flat.reshape((count, c, n * l) if p.major else (count, n, c))
    return got


def load(dst, src, index, major):
    """Block ``index`` of a (B, C, L) array as the formulas read it: a float64
    2-D block as a view of ``src`` itself (its rows are the scratch layout:
    a copy would be one more pass for nothing), otherwise copied into float64
    scratch ``dst`` (cast and gather in one assignment: ``a[...] = b`` is
    ``np.copyto`` without its dispatch, 0.2 us less per call). Returns it."""
    block = src[index]
    if major:
        dst.reshape(block.shape[1], block.shape[0], block.shape[2])[...] = block.transpose(1, 0, 2)
    elif src.dtype == np.float64:
        return block[:, :, 0]
    else:
        dst[...] = block[:, :, 0]
    return dst


def target(dst, index, scratch, major):
    """Where a formula writes block ``index`` of its result ``dst``: the block
    of a float64 2-D ``dst`` itself (nothing to store after), else ``scratch``."""
    if not major and dst.dtype == np.float64:
        return dst[index][:, :, 0]
    return scratch


def store(dst, index, src, major):
    """Write scratch ``src`` back into block ``index`` of (B, C, L) ``dst``,
    rounded once to dst's dtype (nothing to do when ``target`` gave the block itself)."""
    block = dst[index]
    if not major and dst.dtype == np.float64:
        return
    if major:
        rounding.store(block.transpose(1, 0, 2), src.reshape(block.shape[1], block.shape[0], block.shape[2]))
    else:
        rounding.store(block[:, :, 0], src)


def sums(a, major, out):
    """Per-channel sums of stacked scratch blocks into ``out`` (k, cb).

    a: (k, cb, m) channel-major: NumPy's pairwise sum along each contiguous row;
    a: (k, nb, cb) rows: ACC accumulators over a reshaped view, then added in order.
    """
    if major:
        return np.add.reduce(a, axis=2, out=out)
    k, nb, cb = a.shape
    if nb < ACC_ROWS:                   # few rows: added in order (cheaper, f(nb) is small)
        return np.add.reduce(a, axis=1, out=out)
    whole = nb - nb % ACC
    part = np.add.reduce(a[:, :whole].reshape(k, whole // ACC, ACC, cb), axis=1)
    np.add.reduce(part, axis=1, out=out)
    if whole < nb:
        out += np.add.reduce(a[:, whole:], axis=1)
    return out


def _columns(vectors, c, major):
    if c.stop - c.start == 1:           # one channel: plain scalars, NumPy's fastest operand
        return [None if v is None else v[c.start] for v in vectors]
    return [None if v is None else (v[c, None] if major else v[c]) for v in vectors]


# 2-D arrays with rows shorter than WIDE values are seen by the formulas in
# rows of about WIDE values (``Wide``), when that makes at least 4 of them.
WIDE = 8192


def _wide_rows(num, channels):
    """r, the rows of a (B, C) block that make one wide row (1: none)."""
    if channels >= WIDE or num * channels < 4 * WIDE:
        return 1
    rows = WIDE // channels
    while num % rows:
        rows -= 1
    return rows


class Wide:
    """2-D blocks seen in wide rows: (nb, C) as (nb / r, r * C).

    NumPy broadcasts a (C,) vector over (nb, C) at up to 1.8 times the cost
    of a same-shape operation when rows are shorter than about 8192 values
    (a per-row cost of its iterator; measured 0.30-0.35 against 0.16-0.20
    ns per value). The same element-wise formula on (nb / r, r * C) views,
    with each vector tiled r times, computes the same values with the same
    operations (element by element, nothing is summed here), in long rows.
    The per-channel sums still see the (nb, C) layout (``sums``), so their
    order, and their bits, do not change. ``bufs``: the scratch buffers of
    a whole-plan array, whose views are then made once.
    """

    __slots__ = ("rows", "width", "tiles", "bufs", "views")

    def __init__(self, rows, channels, bufs=None):
        self.rows, self.width = rows, rows * channels
        self.tiles = np.empty((4, rows, channels))      # at most 4 vectors per formula
        self.bufs = bufs
        self.views = None if bufs is None else [b.reshape(-1, self.width) for b in bufs]

    def fits(self, arrays):
        """True when every array is C-contiguous with a multiple of r rows
        (the reshape to wide rows is then a view)."""
        return all(a.shape[0] % self.rows == 0 and a.flags.c_contiguous for a in arrays)

    def vectors(self, vectors):
        """Each (C,) vector tiled r times, as an (r * C,) row (None stays None)."""
        out = []
        for tile, v in zip(self.tiles, vectors):
            if v is not None:
                tile[...] = v
                v = tile.reshape(-1)
            out.append(v)
        return out

    def body(self, body, ins, outs, tiled, bufs):
        """``body(ins, outs, tiled)`` on wide rows. ``bufs``: the scratch
        buffers; each becomes one view wherever it appears (bodies compare
        buffers by identity)."""
        views = self.views if bufs is self.bufs else [b.reshape(-1, self.width) for b in bufs]

        def wide(a):
            for b, view in zip(bufs, views):
                if a is b:
                    return view
            return a.reshape(-1, self.width)
        body([wide(a) for a in ins], [wide(a) for a in outs], tiled)


def _whole(shape, k, kept=False):
    """The whole plan's scratch for a (B, C, L) shape: (stacked (k, ...) as
    ``scratch``, its k buffers, k load targets shaped like the transposed
    block, major, ``Wide`` or None),
    made once per shape and kept with the thread's pool (small arrays: the
    cost of a call is what counts, so nothing is rebuilt per call).
    ``kept``: from a second pool, which holds what ``reduce(..., keep=True)``
    hands on to the next ``each_kept`` (the first pool is every call's)."""
    views = getattr(_POOL, "views", None)
    got = None if views is None else views.get((shape, k, kept))
    if got is None:
        num, channels, length = shape
        size = num * channels * length
        _scratch(k, size)
        if kept:
            flat = getattr(_POOL, "kept", None)
            if flat is None or flat.size < k * size:
                flat = _POOL.kept = np.empty(k * size)
                _POOL.views = {}                     # views of the old kept pool go
        else:
            flat = _POOL.flat
        major = length > 1
        s = flat[:k * size].reshape((k, channels, num * length) if major else (k, num, channels))
        bufs = list(s)                  # the same view objects every call (bodies compare by identity)
        targets = [b.reshape(channels, num, length) if major else b.reshape(num, channels, 1) for b in s]
        rows = 1 if major else _wide_rows(num, channels)
        wide = None if rows == 1 else Wide(rows, channels, bufs)
        got = _POOL.views[(shape, k, kept)] = (s, bufs, targets, major, wide)
    return got


def whole(shape):
    """True when a (B, C, L) array of this shape is one block (the whole plan; not empty)."""
    return 0 < shape[0] * shape[1] * shape[2] <= WHOLE


def reduce(sources, k, body, vectors, out, summed=None, keep=False):
    """Per-channel sums of a formula, into ``out`` (k, C) float64.

    For each block: ``body(blocks, scratch, columns)`` gets the block of each
    (B, C, L) array in ``sources`` as float64 (``load``: in scratch buffer 0,
    1, ..., or a view of a float64 2-D source), the k scratch buffers, and
    the (C,) ``vectors`` for the block's channels shaped to broadcast; it
    leaves in the scratch buffers the quantities to sum. Every buffer (or
    those that slice ``summed`` picks) is then summed per channel. A
    channel group's blocks are added in sample order. Returns ``out``.
    ``keep``: an array of one block leaves its scratch, as ``body`` left it,
    for ``each_kept`` (the caller's next call on this thread).
    """
    x = sources[0]
    if x.size == 0:
        out[...] = 0.0
        return out
    if x.size <= WHOLE:                 # one block: no loop, the fewest calls
        s, bufs, targets, major, wide = _whole(x.shape, k, keep)
        ins = [_load_whole(b, t, src, major) for b, t, src in zip(bufs, targets, sources)]
        if body is None:                # the one source itself is summed
            s = ins[0][None]
        else:
            _whole_body(body, ins, bufs, vectors, bufs, major, wide)
        return sums(s[summed] if summed else s, major, out)
    p = plan_for(x.shape)
    part = np.empty((k, p.full[1]))
    wide, tiled = _blocked_wide(p, vectors, body)
    for index, size, first in p.blocks:
        c = index[1]
        s = scratch(p, size, k)
        bufs = list(s)
        ins = [load(b, src, index, p.major) for b, src in zip(bufs, sources)]
        if body is None:                # the one source itself is summed
            s = ins[0][None]
        else:
            _block_body(body, ins, bufs, vectors, bufs, c, p.major, wide, tiled)
        if summed:
            s = s[summed]
        if first:
            sums(s, p.major, out[:, c])
        else:
            out[:, c] += sums(s, p.major, part[:, :c.stop - c.start])
    return out


def _blocked_wide(p, vectors, body):
    """(``Wide``, tiled vectors) for the blocks of a 2-D blocked plan whose
    blocks hold every channel (C <= BLOCK), or (None, None). The tiles are
    filled once per call: every block uses the same vectors."""
    if p.major or body is None or p.full[1] != p.shape[1]:
        return None, None
    rows = _wide_rows(*p.full[:2])
    if rows == 1:
        return None, None
    views, key = getattr(_POOL, "views", {}), ("wide", rows, p.shape[1])
    wide = views.get(key)
    if wide is None:
        wide = views[key] = Wide(rows, p.shape[1])
    return wide, wide.vectors(vectors)


def _whole_body(body, ins, outs, vectors, bufs, major, wide):
    """``body`` on the whole plan's one block: in wide rows when ``wide`` fits
    every array, else with the (C,) vectors shaped to broadcast ((C, 1) columns
    over channel-major rows)."""
    if wide is not None and wide.fits(ins) and wide.fits(outs):
        wide.body(body, ins, outs, wide.vectors(vectors), bufs)
    else:
        body(ins, outs, [v[:, None] if major and v is not None else v for v in vectors])


def _block_body(body, ins, outs, vectors, bufs, c, major, wide, tiled):
    """``body`` on one block of the blocked plan (channels ``c``): in wide rows
    with the call's ``tiled`` vectors when ``wide`` fits every array, else with
    the block's columns."""
    if wide is not None and wide.fits(ins) and wide.fits(outs):
        wide.body(body, ins, outs, tiled, bufs)
    else:
        body(ins, outs, _columns(vectors, c, major))


def _load_whole(buf, target, src, major):
    """``load`` for the whole plan: ``buf`` is the scratch buffer, ``target``
    the same memory shaped like the (transposed) array."""
    if major:
        target[...] = src.transpose(1, 0, 2)
    elif src.dtype == np.float64:
        return src[:, :, 0]
    else:
        target[...] = src
    return buf


def each(sources, k, body, vectors, dst):
    """An element-wise formula, block by block, rounded once into ``dst``.

    As ``reduce``, but what ``body`` leaves in scratch buffer 0 is the
    block's result, written into the block of (B, C, L) ``dst`` (of any float
    dtype; a float64 2-D ``dst`` block is itself handed over as buffer 0).
    """
    x = sources[0]
    if x.size == 0:
        return dst
    if x.size <= WHOLE:                 # one block: no loop, the fewest calls
        s, bufs, targets, major, wide = _whole(x.shape, k)
        ins = [_load_whole(b, t, src, major) for b, t, src in zip(bufs, targets, sources)]
        direct = not major and dst.dtype == np.float64
        outs = [dst[:, :, 0], *bufs[1:]] if direct else bufs
        _whole_body(body, ins, outs, vectors, bufs, major, wide)
        if not direct:
            rounding.store(dst.transpose(1, 0, 2) if major else dst, targets[0])
        return dst
    p = plan_for(x.shape)
    wide, tiled = _blocked_wide(p, vectors, body)
    for index, size, first in p.blocks:
        bufs = list(scratch(p, size, k))
        ins = [load(b, src, index, p.major) for b, src in zip(bufs, sources)]
        out = target(dst, index, bufs[0], p.major)
        outs = bufs if out is bufs[0] else [out, *bufs[1:]]
        _block_body(body, ins, outs, vectors, bufs, index[1], p.major, wide, tiled)
        store(dst, index, bufs[0], p.major)
    return dst


def each_kept(shape, k, body, vectors, dst):
    """``each`` on what ``reduce(..., keep=True)`` left in its k buffers
    for a (B, C, L) array of ``shape`` (one block): nothing is loaded."""
    s, bufs, targets, major, wide = _whole(shape, k, True)
    _whole_body(body, bufs, bufs, vectors, bufs, major, wide)
    rounding.store(dst.transpose(1, 0, 2) if major else dst, targets[0])
    return dst


def shifted_sums(x, head, body, keep=False):
    """(K, sums) for ``batch_norm_stats``: K (C,) the mean of each channel
    over the first ``head`` samples of (B, C, L) x, then ``reduce((x,), 2,
    body, (K,))``. In the whole plan K comes from the block already loaded
    (x is converted once); otherwise from a pass over the head.

    ``keep=True`` on an array of one block: ``body`` gets three buffers,
    x (float64) in the first, which it leaves as it is, and the two summed
    quantities in the other two; returns (K, sums, kept) with ``kept`` for
    ``each_kept`` (the shape; None for bigger arrays and float64 2-D ones),
    so that the next formula on this thread reads x without converting it
    again."""
    num, channels, length = x.shape
    out = np.empty((2, channels))
    # (a float64 2-D array is read in place, never loaded: nothing to keep)
    kept = keep and whole(x.shape) and (length > 1 or x.dtype != np.float64)
    if x.size > WHOLE:
        shift = reduce((x[:head],), 1, None, (), np.empty((1, channels)))[0]
        shift /= float(head * length)
        sums_ = reduce((x,), 2, body, (shift,), out)
        return (shift, sums_, None) if keep else (shift, sums_)
    s, bufs, targets, major, wide = _whole(x.shape, 3 if kept else 2, kept)
    ins = [_load_whole(bufs[0], targets[0], x, major)]
    shift = np.empty(channels)
    if major:
        # Pairwise within each sample's L values, then over the samples: the
        # order in which NumPy reduced x over axes (0, 2) before, so K (the
        # first pass) is unchanged for float64 input of up to 8 samples.
        per_sample = np.add.reduce(targets[0][:, :head], axis=2)
        np.add.reduce(per_sample, axis=1, out=shift)
    else:
        sums(ins[0][None, :head], False, shift[None])
    shift /= float(head * length)
    _whole_body(body, ins, bufs, [shift], bufs, major, wide)
    if kept:
        return shift, sums(s[1:], major, out), x.shape
    sums(s, major, out)
    return (shift, out, None) if keep else (shift, out)
