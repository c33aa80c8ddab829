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
everything after is the same code on the same numbers. Every argument is
checked by the layer's constructor, and the ranks' layers by its
construction agreement (``mpibn.agree.disagreement``, over the simulated
ranks: no allgather), so the reference refuses what the layer refuses.

``assert_matches(actual, expected)`` compares a backend's per-rank results
with the reference by ``mpibn verify``'s rules (``mpibn.verify.compare_quantity``,
one code path for both; docs/ground-truth.md, "The verdict's rules").

Importing this module never imports mpi4py. Example:
``scripts/example_reference_test.py``.
"""
import threading
import warnings
from types import SimpleNamespace

import numpy as np

from .agree import disagreement
from .comm import GroupComm, group_of, validate_process_groups
from .errors import AgreementError
from .golden import OUTPUT_KEYS
from .layer import SyncBatchNorm
from .verify import compare_quantity, ranks_text

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


def _per_rank(value, size, default):
    """One initial value per rank, as the layer's ``*_init`` arguments take them: a list of P (C,)
    arrays as given, anything else (one array, a number, an initializer name) the same on every rank."""
    if isinstance(value, (list, tuple)) and len(value) == size and all(np.ndim(v) == 1 for v in value):
        return [np.asarray(v) for v in value]
    value = default if value is None else value
    return [np.asarray(value) if isinstance(value, (list, tuple)) else value] * size


#: The construction-agreement fields of the moving statistics: state, which may differ between groups.
_MOVING = ("initial mean (moving_mean_init)", "initial variance (moving_var_init)")


def _agree(layers, groups):
    """The layer's construction agreement over the simulated ranks (``mpibn.agree``), raised as it raises it.

    Every field must agree on every rank (gamma and beta included), except the
    moving statistics, which are a step's state (one per rank, to chain
    steps): those must agree only inside each process group, whose ranks
    always hold the same.
    """
    fields = [bn.agreed_fields() for bn in layers]
    error = disagreement([{k: v for k, v in f.items() if k not in _MOVING} for f in fields],
                         "mpibn.testing.reference", "simulated ranks")
    if error is not None:
        raise error
    for group in groups:
        differ = [r for r in group if any(fields[r][k] != fields[group[0]][k] for k in _MOVING)]
        if differ:
            said = "; ".join(f"{k}: rank {r} has {fields[r][k]!r}" for r in [group[0]] + differ for k in _MOVING)
            raise AgreementError(f"mpibn.testing.reference: the ranks of process group {list(group)} must be "
                                 f"given the same moving statistics (they always hold the same), but {said}")


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


def _default_dtype(xs, dtype):
    """``dtype``, or when None the inputs' dtype (one float dtype on every rank)."""
    if dtype is not None:
        return dtype
    dtypes = [x.dtype for x in xs]
    if any(d != dtypes[0] for d in dtypes):
        said = ", ".join(f"rank {r} {d}" for r, d in enumerate(dtypes))
        raise ValueError(f"xs hold different dtypes ({said}): dtype cannot default to the inputs' dtype; "
                         f"pass dtype= (the parameters' dtype)")
    return dtypes[0] if dtypes[0].kind == "f" else np.float32     # the layer refuses other inputs itself


def reference(xs, dys=None, *, process_groups=None, gamma=None, beta=None, moving_mean=None,
              moving_var=None, eps=1e-5, momentum=0.9, training=True, use_batch_statistics=None,
              exact=False, dtype=None):
    """Per-rank results of one ``SyncBatchNorm`` step over P = len(xs) simulated ranks.

    ``xs``: one array per rank, (n_r, C) or (n_r, C, H, W), n_r may differ
    and be 0. ``dys``: the same shapes for the gradients, or None (forward
    only: dx, dgamma and dbeta are None). ``gamma``, ``beta``: the same (C,)
    values on every rank (default ones, zeros; given once, or once per rank
    if equal). ``moving_mean``, ``moving_var``: one (C,) array for every
    rank or a list with one per rank (default zeros, ones; the ranks of one
    process group must get the same). ``process_groups``, ``eps``,
    ``momentum`` (MindSpore's: the weight of the old value),
    ``use_batch_statistics``, ``exact`` and ``dtype`` (of parameters and
    moving statistics) as the layer's arguments, checked by the layer's own
    code (its constructor and construction agreement): the reference refuses
    what ``SyncBatchNorm`` refuses, with its messages. ``dtype`` defaults to
    the inputs' dtype (float64 inputs: float64 parameters). ``training`` is
    ``set_train(training)``.

    Returns a list of P ``SimpleNamespace`` with ``y``, ``dx`` (the input
    dtype), ``dgamma``, ``dbeta``, ``moving_mean``, ``moving_var`` (``dtype``)
    and ``batch_mean``, ``batch_var`` (float64, the group's statistics;
    None when moving statistics normalise), exactly as the layer on rank r
    gives them after ``y = bn(x); dx = bn.backward(dy)``, and ``dtype`` (the
    parameters': ``assert_matches`` takes its tolerances from it and from the
    inputs' dtype). To chain steps, pass the returned moving statistics (a
    list) to the next call.
    """
    size = len(xs)
    if size == 0:
        raise ValueError("xs must hold one array per simulated rank, got an empty list")
    if dys is not None and len(dys) != size:
        raise ValueError(f"dys must hold one array per rank like xs ({size}), got {len(dys)}")
    xs = [np.asarray(x) for x in xs]
    if xs[0].ndim not in (2, 4):
        raise ValueError(f"xs[0] must be (N, C) or (N, C, H, W), got shape {xs[0].shape}")
    dtype = _default_dtype(xs, dtype)
    initial = [_per_rank(value, size, default) for value, default in (
        (gamma, "ones"), (beta, "zeros"), (moving_mean, "zeros"), (moving_var, "ones"))]
    comms = _group_comms(size, process_groups)
    layers = [SyncBatchNorm._on_group(
        comms[r], xs[0].shape[1], eps=eps, momentum=momentum, gamma_init=initial[0][r], beta_init=initial[1][r],
        moving_mean_init=initial[2][r], moving_var_init=initial[3][r], use_batch_statistics=use_batch_statistics,
        process_groups=process_groups, dtype=dtype, exact=exact, lockstep=False, comm=_Parent(size, r))
        for r in range(size)]
    _agree(layers, list(dict.fromkeys(c.ranks for c in comms if c._group is not None)))
    for bn in layers:
        bn.set_train(training)
    barriers = {id(c._group): c._group.barrier for c in comms if c._group is not None}
    results = _run_threads([lambda r=r: _step(layers[r], xs[r], None if dys is None else dys[r])
                            for r in range(size)], list(barriers.values()))
    for out in results:
        # How to compute this step again with another parameter dtype (assert_matches' hint).
        out._with_dtype = lambda d: reference(xs, dys, process_groups=process_groups, gamma=gamma, beta=beta,
                                              moving_mean=moving_mean, moving_var=moving_var, eps=eps,
                                              momentum=momentum, training=training,
                                              use_batch_statistics=use_batch_statistics, exact=exact, dtype=d)
    return results


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
        out.dtype = bn.dtype
        return out
    finally:
        bn.close()


def _get(result, key):
    if isinstance(result, dict):
        return result.get(key)
    return getattr(result, key, None)


def _fields(result):
    """The names a per-rank result holds: dict keys or public attributes."""
    if isinstance(result, dict):
        return [k for k in result if isinstance(k, str) and not k.startswith("_")]
    try:
        return [k for k in vars(result) if not k.startswith("_")]
    except TypeError:                    # no __dict__ (slots, namedtuples): nothing to list
        return []


def _asked_dtypes(expected, dtype):
    """{quantity: the dtype its tolerance comes from}: the precision the backend was asked for.

    ``dtype`` given: that, for every quantity. Else the reference's: y and dx
    in the inputs' dtype (the dtype of its y), the rest in its parameter
    dtype (``reference(..., dtype=)``, which defaults to the inputs' dtype).
    Never the dtype the actual results are stored in.
    """
    if dtype is not None:
        return {q: dtype for q in QUANTITIES}
    params = _get(expected[0], "dtype") if expected else None
    if params is None:
        raise TypeError("assert_matches: expected carries no dtype (it is not mpibn.testing.reference's "
                        "result): pass dtype=, the precision the backend was asked to compute in")
    y = _get(expected[0], "y")
    inputs = np.asarray(y).dtype if y is not None else params
    return {q: (inputs if q in ("y", "dx") else params) for q in QUANTITIES}


def _selected(expected, quantities):
    """The quantities to compare: those the reference has (not None), or the ones named."""
    if quantities is None:
        return [q for q in QUANTITIES if any(_get(e, q) is not None for e in expected)]
    names = [quantities] if isinstance(quantities, str) else list(quantities)
    unknown = [q for q in names if q not in QUANTITIES]
    if unknown or not names:
        raise ValueError(f"quantities: unknown {unknown or names}; the quantities are {list(QUANTITIES)}")
    absent = [q for q in names if all(_get(e, q) is None for e in expected)]
    if absent:
        raise AssertionError(f"quantities: the reference has no {absent} (forward only, or moving "
                             f"statistics normalise); nothing to compare them with")
    return names


def _compare_all(actual, expected, rtol, atol, max_ulps, quantities, dtype):
    """([(quantity, QuantityResult)] of the failing ones, number compared, {unknown key: [ranks]})."""
    if len(actual) != len(expected):
        raise AssertionError(f"actual has results for {len(actual)} ranks, expected {len(expected)}")
    asked = _asked_dtypes(expected, dtype)
    failing, compared = [], 0
    for key in _selected(expected, quantities):
        values = [_get(e, key) for e in expected]
        if any(v is None for v in values):
            raise AssertionError(f"expected has {key} on some ranks only: not a reference result")
        pairs = []
        for r, (e, a) in enumerate(zip(values, (_get(a, key) for a in actual))):
            e, a = np.asarray(e), (None if a is None else np.asarray(a))
            if a is not None and e.shape != a.shape:
                raise AssertionError(f"{key} of rank {r}: shape {a.shape}, expected {e.shape}")
            pairs.append((e, a))
        result = compare_quantity(pairs, asked[key], rtol=rtol, atol=atol, max_ulps=max_ulps)
        compared += 1
        if not result.passed:
            failing.append((key, result))
    unknown = {}
    for r, a in enumerate(actual):
        for k in _fields(a):
            if k not in QUANTITIES and k != "dtype":
                unknown.setdefault(k, []).append(r)
    return failing, compared, unknown


def assert_matches(actual, expected, *, rtol=None, atol=0.0, max_ulps=None, quantities=None, dtype=None):
    """Assert a backend's per-rank results match ``expected`` (``reference``'s) as verify would.

    ``actual``: one result per rank, objects with the ``QUANTITIES`` as
    attributes or dicts. Every quantity the reference has (not None) is
    compared, on every rank: one that a rank lacks (absent or None) fails,
    unless ``quantities`` names what to compare (e.g. ``("y", "dx")``). For
    each quantity, over all ranks together (``mpibn.verify.compare_quantity``,
    the rule of ``python -m mpibn verify``): pass when max |a - e| <= atol +
    rtol * max |e|, rtol default 32 eps of the precision the backend was
    asked to compute in: the inputs' dtype for y and dx, the reference's
    ``dtype`` for the rest (``dtype=`` here overrides both), never the dtype
    ``actual`` is stored in; all in float64. Whatever the tolerance, a
    quantity stored with less precision than that, or NaN/inf where the
    reference is finite (or the reverse), fails; with ``max_ulps`` the ulp
    distance in that dtype must be at most that too. Keys of ``actual`` that
    are no quantity are listed (a UserWarning when everything else passes).

    On failure an AssertionError whose message is a table (quantity, rank,
    max abs, max rel, max ulps, for every rank of every failing quantity),
    the reason of each failure, and, when the reference computed with
    another parameter dtype would have matched, which ``dtype=`` to pass.
    """
    failing, compared, unknown = _compare_all(actual, expected, rtol, atol, max_ulps, quantities, dtype)
    if compared == 0:
        raise AssertionError("no quantity to compare: every one is None in expected")
    listed = [f"{k!r} ({ranks_text(rs)})" for k, rs in unknown.items()]
    if not failing:
        if listed:
            warnings.warn(f"assert_matches: actual holds key(s) that are no quantity, not compared: "
                          f"{', '.join(listed)}; the quantities are {list(QUANTITIES)}", UserWarning, stacklevel=2)
        return
    lines = [_failure_table(failing)]
    if listed:
        lines.append(f"actual holds key(s) that are no quantity, not compared: {', '.join(listed)} "
                     f"(a misspelling?); the quantities are {list(QUANTITIES)}")
    hint = None if dtype is not None else _dtype_hint(actual, expected, rtol, atol, max_ulps, quantities)
    if hint:
        lines.append(hint)
    raise AssertionError("\n".join(lines))


def _dtype_hint(actual, expected, rtol, atol, max_ulps, quantities):
    """'pass dtype=...' when the reference with another parameter dtype matches ``actual``, else None."""
    again = _get(expected[0], "_with_dtype")
    if again is None:
        return None
    current = np.dtype(_get(expected[0], "dtype"))
    stored = [np.asarray(_get(a, q)).dtype for a in actual for q in ("dgamma", "dbeta", "moving_mean", "moving_var")
              if _get(a, q) is not None]
    order = [d for d in stored + [np.dtype(n) for n in ("float64", "float32", "float16")]
             if d.kind == "f" and d.name in ("float16", "float32", "float64")]
    for d in dict.fromkeys(order):
        if d == current:
            continue
        try:
            failing, compared, _ = _compare_all(actual, again(d), rtol, atol, max_ulps, quantities, None)
        except (AssertionError, TypeError, ValueError, FloatingPointError):
            continue
        if compared and not failing:
            return (f"hint: with reference(..., dtype=np.{d.name}) every quantity matches: the backend's "
                    f"parameters and moving statistics are {d.name}, the reference's {current.name} "
                    f"(its dtype defaults to the inputs' dtype); pass dtype=np.{d.name}")
    return None


def _failure_table(failing):
    head = ["quantity", "rank", "max abs", "max rel", "max ulps"]
    body = []

    def num(v):
        return "inf" if v == float("inf") else f"{v:.3e}"

    for key, res in failing:
        for r, p in enumerate(res.per_rank):
            if p is None:
                body.append([key, str(r), "missing", "-", "-"])
                continue
            d, s, u = p
            body.append([key, str(r), num(d), num(d / s if s > 0 else d), str(u)])
        if res.max_abs is not None:
            body.append([key, "all", num(res.max_abs), num(res.max_rel), str(res.max_ulps)])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    tols = "; ".join(f"{key}: tolerance {res.tolerance:.3e} abs ({res.dtype})" for key, res in failing)
    lines = [f"{len(failing)} quantit{'y' if len(failing) == 1 else 'ies'} differ from the reference "
             f"({tols}); max rel = max abs / max |expected| over the rank(s)",
             fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*row).rstrip() for row in body]
    lines += [f"{key}: {res.note}" for key, res in failing]
    return "\n".join(lines)
