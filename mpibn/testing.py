"""mpibn as the reference in another framework's test suite: one process, no MPI.

``reference(xs, dys, ...)`` simulates P ranks (P = ``len(xs)``) in one
process and returns, per rank, what ``SyncBatchNorm`` gives under
``mpiexec -n P`` on the same shards, **bit for bit**, in both modes
(``exact=False`` and ``True``). It is not a second implementation: each
simulated rank is a real ``SyncBatchNorm`` (``SyncBatchNorm._on_group``,
on a simulated group communicator) that runs ``y = bn(x)`` and
``dx = bn.backward(dy)``; only the one Allreduce is replaced by an
in-process sum over threads (``_SimulatedGroup``). Why that gives the same
bits: each rank writes only its own row of the exchange buffer and the
others are zero, so the MPI sum hands every rank every row exactly, and the
exact mode's summed region holds integers below 2^53, exact in any order
(``mpibn.comm``, ``mpibn.sync_exact``). The simulated sum adds the same
buffers, so the rows and limbs after it are the ones MPI gives, and
everything after is the same code on the same numbers. Not simulated:
the construction agreement (``mpibn.agree``), as one call builds every
rank's layer from one set of arguments.

``assert_matches(actual, expected)`` compares a backend's per-rank results
with the reference using ``mpibn verify``'s measures and tolerances
(``mpibn.verify.compare_quantity``, one code path for both).

Importing this module never imports mpi4py. Example:
``scripts/example_reference_test.py``.
"""
import threading
from types import SimpleNamespace

import numpy as np

from .comm import GroupComm, group_of, validate_process_groups
from .golden import OUTPUT_KEYS
from .init import initializer
from .layer import SyncBatchNorm
from .verify import IN_SCENARIO_DTYPE, compare_quantity

__all__ = ["reference", "assert_matches", "QUANTITIES"]

#: The per-rank result attributes, in the order of the golden files (the same tuple).
QUANTITIES = OUTPUT_KEYS

_TIMEOUT = 120.0     # seconds a simulated rank waits for its peers (a bug, never a normal wait)


class _SimulatedGroup:
    """The state the threads of one simulated group share: their buffers and a barrier."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=_TIMEOUT)
        self.bufs = [None] * size


class _Parent:
    """What a simulated rank's layer asks of its parent communicator: its size and rank."""

    def __init__(self, size, rank):
        self.size, self.rank = size, rank

    def Get_size(self):
        return self.size

    def Get_rank(self):
        return self.rank


class _SimulatedGroupComm(GroupComm):
    """A ``GroupComm`` whose one collective is an in-process SUM over threads."""

    def __init__(self, group, ranks, parent_rank):
        super().__init__(None, ranks, parent_rank)
        self._group = group
        self.debug_timeout = None

    def allreduce_sum(self, buf, tag=(0, 0)):
        if self._group is None:
            return buf
        g = self._group
        g.bufs[self.rank] = buf.copy()
        g.barrier.wait()
        total = g.bufs[0].copy()
        for part in g.bufs[1:]:
            total += part
        g.barrier.wait()          # nobody overwrites its slot before every peer has read it
        buf[...] = total
        self.allreduce_calls += 1
        return buf


def _group_comms(size, process_groups):
    """[GroupComm of rank r], as ``mpibn.comm.group_comm_for`` would split them."""
    groups = validate_process_groups(process_groups, size) or (tuple(range(size)),)
    shared = {g: _SimulatedGroup(len(g)) for g in groups if len(g) > 1}
    out = []
    for r in range(size):
        mine = group_of(r, groups)
        out.append(_SimulatedGroupComm(shared.get(mine), mine, r))
    return out


def _per_rank(value, size, name, default, dtype, channels):
    """One (C,) array per rank, converted as the layer's initializer converts it."""
    if isinstance(value, (list, tuple)) and len(value) == size and all(np.ndim(v) == 1 for v in value):
        values = list(value)
    else:
        values = [value] * size
    return [initializer(default if v is None else np.asarray(v), (channels,), dtype, name,
                        f"{name}") for v in values]


def _run_threads(fns, barriers):
    """Run fns[r]() in one thread each; results in rank order; the lowest rank's error re-raised.

    A rank that fails outside a collective breaks every barrier, so that its
    peers stop waiting at once (BrokenBarrierError) instead of timing out."""
    results, errors = [None] * len(fns), [None] * len(fns)

    def body(r):
        try:
            results[r] = fns[r]()
        except BaseException as exc:      # noqa: BLE001 - re-raised in the caller
            errors[r] = exc
            if not isinstance(exc, threading.BrokenBarrierError):
                for b in barriers:
                    b.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real or any(errors):
        raise (real or [e for e in errors if e is not None])[0]
    return results


def reference(xs, dys=None, *, process_groups=None, gamma=None, beta=None, moving_mean=None,
              moving_var=None, eps=1e-5, momentum=0.9, training=True, use_batch_statistics=None,
              exact=False, dtype=np.float32):
    """Per-rank results of one ``SyncBatchNorm`` step over P = len(xs) simulated ranks.

    ``xs``: one array per rank, (n_r, C) or (n_r, C, H, W), n_r may differ
    and be 0. ``dys``: the same shapes for the gradients, or None (forward
    only: dx, dgamma and dbeta are None). ``gamma``, ``beta``: one (C,)
    array for every rank (default ones, zeros). ``moving_mean``,
    ``moving_var``: one (C,) array for every rank or a list with one per
    rank (default zeros, ones). ``process_groups``, ``eps``, ``momentum``
    (MindSpore's: the weight of the old value), ``use_batch_statistics``,
    ``exact`` and ``dtype`` (of parameters and moving statistics) as the
    layer's arguments; ``training`` is ``set_train(training)``.

    Returns a list of P ``SimpleNamespace`` with ``y``, ``dx`` (the input
    dtype), ``dgamma``, ``dbeta``, ``moving_mean``, ``moving_var`` (``dtype``)
    and ``batch_mean``, ``batch_var`` (float64, the group's statistics;
    None when moving statistics normalise), exactly as the layer on rank r
    gives them after ``y = bn(x); dx = bn.backward(dy)``. To chain steps,
    pass the returned moving statistics (a list) to the next call.
    """
    size = len(xs)
    if size == 0:
        raise ValueError("xs must hold one array per simulated rank, got an empty list")
    if dys is not None and len(dys) != size:
        raise ValueError(f"dys must hold one array per rank like xs ({size}), got {len(dys)}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
    xs = [np.asarray(x) for x in xs]
    if xs[0].ndim not in (2, 4):
        raise ValueError(f"xs[0] must be (N, C) or (N, C, H, W), got shape {xs[0].shape}")
    channels = xs[0].shape[1]
    values = [_per_rank(value, size, name, default, dtype, channels) for value, name, default in (
        (gamma, "gamma", "ones"), (beta, "beta", "zeros"), (moving_mean, "moving_mean", "zeros"),
        (moving_var, "moving_var", "ones"))]
    comms = _group_comms(size, process_groups)
    layers = [SyncBatchNorm._on_group(
        comms[r], channels, process_groups=process_groups, dtype=dtype, exact=bool(exact), lockstep=False,
        use_batch_statistics=None if use_batch_statistics is None else bool(use_batch_statistics),
        comm=_Parent(size, r)) for r in range(size)]
    for bn, state in zip(layers, zip(*values)):
        _set_state(bn, state, float(eps), float(momentum), training)
    barriers = {id(c._group): c._group.barrier for c in comms if c._group is not None}
    return _run_threads([lambda r=r: _step(layers[r], xs[r], None if dys is None else dys[r])
                         for r in range(size)], list(barriers.values()))


def _set_state(bn, state, eps, momentum, training):
    """The values of one reference() call as the layer's state, in its mode.

    Set, not passed to the constructor: reference() takes the moving
    statistics as values (one per rank, as a step left them), and it
    accepts, as it always has, values the constructor refuses (eps <= 0,
    momentum outside [0, 1], a negative moving variance) or the construction
    agreement would (gamma that differs per rank). The layer's passes read
    them from these attributes."""
    bn.eps, bn.momentum = eps, momentum
    for parameter, value in zip(bn.get_parameters(), state):     # gamma, beta, mean, variance
        parameter.data = value
    bn.set_train(training)


def _step(bn, x, dy):
    """``y = bn(x); dx = bn.backward(dy)`` on one simulated rank, and what the layer then holds."""
    try:
        y = bn(x)
        out = SimpleNamespace(y=y, dx=None, dgamma=None, dbeta=None, batch_mean=bn.batch_mean,
                              batch_var=bn.batch_var)
        if dy is not None:
            out.dx = bn.backward(dy)
            out.dgamma, out.dbeta = bn.gamma.grad, bn.beta.grad
        out.moving_mean, out.moving_var = bn.moving_mean.data.copy(), bn.moving_variance.data.copy()
        return out
    finally:
        bn.close()


def _get(result, key):
    if isinstance(result, dict):
        return result.get(key)
    return getattr(result, key, None)


def assert_matches(actual, expected, *, rtol=None, max_ulps=None):
    """Assert a backend's per-rank results match ``expected`` (``reference``'s) as verify would.

    ``actual``: one result per rank, objects with the ``QUANTITIES`` as
    attributes or dicts; a quantity that is None (or absent) in either is
    not compared. For each quantity, over all ranks together: pass when
    max |a - e| <= rtol * max |e| (rtol default: 32 eps of the actual
    dtype, or for y and dx of the expected one when it is coarser, e.g.
    bfloat16 input) and, if ``max_ulps`` is given, the ulp distance in the actual
    dtype is at most that (``mpibn.verify.compare_quantity``). On failure
    an AssertionError whose message is a table: quantity, rank, max abs,
    max rel, max ulps, for every rank of every failing quantity.
    """
    if len(actual) != len(expected):
        raise AssertionError(f"actual has results for {len(actual)} ranks, expected {len(expected)}")
    failing, compared = [], 0
    for key in QUANTITIES:
        pairs = [(_get(e, key), _get(a, key)) for a, e in zip(actual, expected)]
        if any(e is None or a is None for e, a in pairs):
            continue
        pairs = [(np.asarray(e), np.asarray(a)) for e, a in pairs]
        for r, (e, a) in enumerate(pairs):
            if e.shape != a.shape:
                raise AssertionError(f"{key} of rank {r}: shape {a.shape}, expected {e.shape}")
        # y and dx are judged in the input's precision when it is the coarser
        # (a bfloat16 reference against a backend's float32 y: bfloat16's eps).
        result = compare_quantity(pairs, rtol=rtol, max_ulps=max_ulps,
                                  dtype=pairs[0][0].dtype if key in IN_SCENARIO_DTYPE else None)
        compared += 1
        if not result.passed:
            failing.append((key, result))
    if compared == 0:
        raise AssertionError("no quantity to compare: every one is None in actual or expected")
    if failing:
        raise AssertionError(_failure_table(failing))


def _failure_table(failing):
    head = ["quantity", "rank", "max abs", "max rel", "max ulps"]
    body = []
    for key, res in failing:
        for r, (d, s, u) in enumerate(res.per_rank):
            body.append([key, str(r), f"{d:.3e}", f"{d / s if s > 0 else d:.3e}", str(u)])
        body.append([key, "all", f"{res.max_abs:.3e}", f"{res.max_rel:.3e}", str(res.max_ulps)])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    tols = "; ".join(f"{key}: tolerance {res.tolerance:.3e} abs ({res.dtype})" for key, res in failing)
    lines = [f"{len(failing)} quantit{'y' if len(failing) == 1 else 'ies'} differ from the reference "
             f"({tols}); max rel = max abs / max |expected| over the rank(s)",
             fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    return "\n".join(lines + [fmt.format(*row).rstrip() for row in body])
