"""Every cross-rank error: how it is encoded, agreed on, and raised.

A collective library fails worst by hanging: a rank that raises on its own
leaves its peers waiting in the collective. So every error that ranks of a
group must see alike is *agreed*: each rank raises the same exception, and
none waits. There are three ways, and this module is where to look for all
of them:

1. **In the row** (bad input, an exception in local work, ranks in
   different calls). A rank whose input is bad joins the collective anyway,
   with a problem code (``Code``) and a few integer details in its row of
   the buffer (``Problem``; ``mpibn.comm`` writes and reads the rows). After
   the one Allreduce every rank sees every rank's problem and raises the
   same exception (``raise_agreed``), and checks that all ranks are in the
   same call of the same layer (``check_tags``). An *unexpected* exception in
   a rank's local work before the collective travels the same way
   (``guarded``: ``Code.LOCAL_ERROR``). Where nothing is communicated (eval),
   the same sentence is raised on the rank alone (``local_problem``).
2. **By identical data** (checks after the collective). After the Allreduce
   every rank of the group holds the same rows, and the same moving
   statistics, so a check computed from them gives the same answer on every
   rank with no communication: a group count <= 1, NaN or Inf in the batch,
   a moving statistic that overflows its dtype (``mpibn.sync``), and the
   channel-count probe of a stateless call (``sync.agreed_exchange``).
3. **At construction** (``mpibn.agree``): one allgather of every rank's
   arguments before ``Comm.Split``; ranks that disagree raise
   ``AgreementError``, a rank with a bad argument makes every rank raise.

Not agreed, but bounded: in debug mode a rank that waits past its deadline
raises ``CollectiveTimeout`` naming the peers that never arrived
(``mpibn.comm``, ``collective_timeout``).

**Fail-stop** (the end of this module): an agreed error that leaves the
ranks out of step, or a CollectiveTimeout, stops the group; every later call
on its layers raises ``GroupFailed`` at once, on this rank alone.

Exception types travel by name, so only builtin types (``builtin_exception``)
and this module's own come out the same on every rank.
"""
import builtins
from enum import IntEnum

import numpy as np

from .rounding import is_bfloat16  # noqa: F401 - errors.is_bfloat16 is public (is_float uses it)

#: Integer detail slots each rank's row carries (dy's and x's shapes need 8).
N_DETAILS = 8

_FLOAT_NAMES = "float16, float32, float64 or bfloat16"


def _shape(details):
    return "(" + ", ".join(str(int(d)) for d in details if d >= 0) + ")"


def _dtype_name(code):
    try:
        return np.dtype(chr(int(code))).name
    except (TypeError, ValueError):
        return "an unknown dtype"


class Code(IntEnum):
    """A problem's code: the number in its row's status slot (0: no problem)."""
    X_NOT_ARRAY = 1
    X_DTYPE = 2
    X_NDIM = 3
    X_CHANNELS = 4
    NO_FORWARD = 5
    BACKWARD_TWICE = 6
    DY_NOT_ARRAY = 7
    DY_DTYPE = 8
    DY_SHAPE = 9
    DY_NDIM = 10
    X_SUBCLASS = 11
    DY_SUBCLASS = 12
    X_CHANGED = 13
    LOCAL_ERROR = 14
    EXCHANGE_NOT_EXACT = 15
    X_SUM_OVERFLOW = 16


# code -> (exception type, sentence built from the details)
PROBLEMS = {
    Code.X_NOT_ARRAY: (TypeError, lambda d: "x must be a numpy.ndarray"),
    Code.X_DTYPE: (TypeError, lambda d: f"x has dtype {_dtype_name(d[0])}; expected {_FLOAT_NAMES}"),
    Code.X_NDIM: (ValueError, lambda d: f"x must be 2-D (N, C) or 4-D (N, C, H, W), got a {int(d[0])}-D "
                                        f"array"),
    Code.X_CHANNELS: (ValueError, lambda d: f"x has {int(d[0])} channels (shape[1]); the layer has "
                                            f"num_features={int(d[1])}"),
    # d[0] = 1 when the layer is in training mode (a training forward was due)
    Code.NO_FORWARD: (RuntimeError, lambda d: f"backward() was called without a "
                                              f"{'training ' if d[0] == 1 else ''}forward() before it"),
    Code.BACKWARD_TWICE: (RuntimeError, lambda d: "backward() was called twice for one forward()"),
    Code.DY_NOT_ARRAY: (TypeError, lambda d: "dy must be a numpy.ndarray"),
    Code.DY_DTYPE: (TypeError, lambda d: f"dy has dtype {_dtype_name(d[0])}; expected {_FLOAT_NAMES}"),
    Code.DY_SHAPE: (ValueError, lambda d: f"dy has shape {_shape(d[:4])}; the forward input had shape "
                                          f"{_shape(d[4:])}"),
    Code.DY_NDIM: (ValueError, lambda d: "dy has more than 4 dimensions; it must have the forward input's "
                                         "shape"),
    Code.X_SUBCLASS: (TypeError, lambda d: _subclass("x", d[0])),
    Code.DY_SUBCLASS: (TypeError, lambda d: _subclass("dy", d[0])),
    Code.X_CHANGED: (RuntimeError, lambda d: "x was modified in place between forward() and backward() "
                                             "(its fingerprint changed), so dx would be wrong; keep x "
                                             "unchanged until backward(), or pass forward() a copy"),
    # The exception type travels as its name (see Problem.from_exception).
    Code.LOCAL_ERROR: (None, lambda d: f"{_unpack_name(d)} raised in this rank's own computation before "
                                       f"the collective (that rank's traceback shows it)"),
    Code.EXCHANGE_NOT_EXACT: (ValueError, lambda d: "exact=True needs an exchange made by "
                                                    "mpibn.make_exchange(..., exact=True)"),
    # d: up to N_DETAILS channels
    Code.X_SUM_OVERFLOW: (FloatingPointError, lambda d: f"x is finite, but its sum overflows float64 at "
                                                        f"channel(s) {[int(c) for c in d if c >= 0]}: "
                                                        f"scale the input down"),
}
# ndarray subclasses whose meaning the math would silently drop (details[0]).
_MASKED, _MATRIX = 1, 2


def _subclass(name, kind):
    if kind == _MASKED:
        return (f"{name} is a numpy.ma.MaskedArray; its mask would be ignored: pass "
                f"{name}.filled(value) or select the unmasked values")
    return f"{name} is a numpy.matrix (always 2-D); pass np.asarray({name})"


# A float64 holds any integer below 2^53 exactly: 6 bytes of a name per detail slot.
_NAME_BYTES = 6


def _pack_name(name):
    raw = name.encode("ascii", "replace")[:_NAME_BYTES * N_DETAILS]
    return [int.from_bytes(raw[i:i + _NAME_BYTES], "little") for i in range(0, len(raw), _NAME_BYTES)]


def _unpack_name(details):
    raw = b"".join(int(d).to_bytes(_NAME_BYTES, "little") for d in details if d > 0)
    return raw.rstrip(b"\0").decode("ascii", "replace") or "an exception"


class AgreementError(ValueError):
    """Ranks of one communicator disagree on how a layer is built (``mpibn.agree``)."""


class CollectiveTimeout(RuntimeError):
    """Debug mode: a collective did not complete before its deadline (``mpibn.comm``)."""


def builtin_exception(name):
    """The builtin exception class called ``name`` (TypeError, ValueError, ...), or RuntimeError.

    Exceptions travel between ranks by their type's name, and only a builtin
    type is the same on every rank (a library's own type may not even be
    importable everywhere): anything else becomes RuntimeError.
    """
    cls = getattr(builtins, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError


class Problem:
    """One rank's problem: a code from PROBLEMS and up to N_DETAILS integers."""

    def __init__(self, code, *details):
        self.code = Code(code)
        self.details = list(details) + [-1] * (N_DETAILS - len(details))
        self.cause = None          # the local exception behind a LOCAL_ERROR, on its own rank

    @classmethod
    def from_exception(cls, exc):
        """A LOCAL_ERROR carrying ``exc``'s type name (``exc`` itself stays on this rank)."""
        problem = cls(Code.LOCAL_ERROR, *_pack_name(type(exc).__name__))
        problem.cause = exc
        return problem

    def exception_type(self):
        if self.code == Code.LOCAL_ERROR:
            return builtin_exception(_unpack_name(self.details))
        return PROBLEMS[self.code][0]

    def exception(self, message):
        """The exception to raise for this problem, with ``message``. A builtin
        type that will not take a lone message (UnicodeDecodeError needs five
        arguments) becomes RuntimeError."""
        try:
            return self.exception_type()(message)
        except TypeError:
            return RuntimeError(message)

    def describe(self):
        return PROBLEMS[self.code][1](self.details)

    @classmethod
    def from_numbers(cls, code, details):
        return cls(int(code), *[int(d) for d in details])


def dtype_code(dtype):
    """The one-character numpy code of a dtype, as a number that travels."""
    return ord(np.dtype(dtype).char)


def ranks_said(ranks):
    """'rank 3' or 'ranks [0, 2, 3]'."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {list(ranks)}"


def said_once(pairs):
    """'rank 1: A; ranks [0, 2, 3]: B' from [(rank, sentence)]: each sentence
    said once, with every rank that said it (in order of first appearance)."""
    by_sentence = {}
    for rank, sentence in pairs:
        by_sentence.setdefault(sentence, []).append(rank)
    return "; ".join(f"{ranks_said(ranks)}: {sentence}" for sentence, ranks in by_sentence.items())


_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def is_float(dtype):
    """float16, float32 or float64, in either byte order (big-endian data is
    accepted; ``mpibn.sync`` converts it to native order once), or bfloat16
    (``ml_dtypes``; statistics in float64 as for the others, y and dx back
    in bfloat16, rounded once)."""
    return dtype in _FLOATS or dtype.newbyteorder("=") in _FLOATS or is_bfloat16(dtype)


def check_float_array(arr, name, not_array, bad_dtype, subclass):
    """The problem with ``arr`` as a float16/32/64 ndarray, or None."""
    if not isinstance(arr, np.ndarray):
        return Problem(not_array)
    if isinstance(arr, np.ma.MaskedArray):
        return Problem(subclass, _MASKED)
    if isinstance(arr, np.matrix):
        return Problem(subclass, _MATRIX)
    if not is_float(arr.dtype):
        return Problem(bad_dtype, dtype_code(arr.dtype))
    return None


def check_input(x, num_features):
    """The problem with a forward input, or None."""
    problem = check_float_array(x, "x", Code.X_NOT_ARRAY, Code.X_DTYPE, Code.X_SUBCLASS)
    if problem is not None:
        return problem
    if x.ndim not in (2, 4):
        return Problem(Code.X_NDIM, x.ndim)
    if x.shape[1] != num_features:
        return Problem(Code.X_CHANNELS, x.shape[1], num_features)
    return None


def check_grad(dy, expected_shape):
    """The problem with a backward input, or None."""
    problem = check_float_array(dy, "dy", Code.DY_NOT_ARRAY, Code.DY_DTYPE, Code.DY_SUBCLASS)
    if problem is not None:
        return problem
    if dy.ndim > 4:
        return Problem(Code.DY_NDIM)
    if dy.shape != tuple(expected_shape):
        pad = [-1] * 4
        got = (list(dy.shape) + pad)[:4]
        want = (list(expected_shape) + pad)[:4]
        return Problem(Code.DY_SHAPE, *got, *want)
    return None


def guarded(problem, work):
    """Run this rank's local work before a collective: (problem, result).

    The rule of every pass (``mpibn.sync``): local work cannot skip the
    collective. Any exception in ``work()``, however deep in the math,
    becomes a ``Code.LOCAL_ERROR`` problem, the rank still joins with it flagged,
    and every rank of the group raises (this rank with the original
    exception as ``__cause__``). Skipped when ``problem`` is already set.
    """
    if problem is not None:
        return problem, None
    try:
        return None, work()
    except Exception as exc:     # noqa: BLE001 - reported to every rank, chained on this one
        return Problem.from_exception(exc), None


# -- Reading the rows back: one agreed exception on every rank ---------------------------

def raise_agreed(codes, details, ranks, context, own=None, tags=None, group=None):
    """Raise, on every rank, the exception for the problems the rows carry.

    ``codes`` (P,): each row's status (0: no problem); ``details`` (P,
    N_DETAILS); ``ranks``: the rows' ranks in the parent communicator. The
    type is that of the lowest-ranked offender; the message names every
    offending rank and its problem, each distinct problem once. ``own``:
    this rank's Problem, if any; the local exception behind it
    (``Problem.cause``) is chained on this rank. ``tags`` (P, 2): the rows'
    (layer, call); when they differ the ranks are out of step, and the
    error stops ``group`` (fail-stop, ``stop_group``).
    """
    bad = np.flatnonzero(codes)
    if bad.size == 0:
        return
    problems = [(ranks[r], Problem.from_numbers(codes[r], details[r])) for r in bad]
    parts = said_once((rank, p.describe()) for rank, p in problems)
    in_step = tags is None or (tags == tags[0]).all()
    if not in_step:
        calls = {}
        for rank, tag in zip(ranks, tags):
            calls.setdefault(describe_tag(tag), []).append(rank)
        parts += " (and the ranks were in different calls: " + ", ".join(
            f"{call} on {ranks_said(on)}" for call, on in calls.items()) + ")"
    exc = problems[0][1].exception(f"{context} (group ranks {list(ranks)}): {parts}")
    raise (exc if in_step else stop_group(group, exc)) from getattr(own, "cause", None)


def describe_tag(tag):
    """A row's (layer, call) tag in words. The layer numbers its tags
    2 * serial (forward) and 2 * serial + 1 (backward), serial = 1, 2, ...;
    the stateless API sends (0, 0); a backward with no forward (-1, -1)
    (``mpibn.comm``: ``forward_tag``, ``backward_tag``)."""
    code, call = int(tag[0]), int(tag[1])
    if code < 0:
        return "a backward() with no forward()"
    if code < 2:
        return f"a stateless call{f' (call {call})' if call else ''}"
    return f"layer {code // 2} {'backward' if code % 2 else 'forward'} call {call}"


def check_tags(tags, ranks, context, group=None):
    """Every rank must be in the same call of the same layer: ``tags`` (P, 2), one per row.
    When they are not, the ranks are out of step: the error stops ``group`` (fail-stop)."""
    if (tags == tags[0]).all():
        return
    calls = said_once((rank, describe_tag(t)) for rank, t in zip(ranks, tags))
    raise stop_group(group, RuntimeError(
        f"{context} (group ranks {list(ranks)}): ranks are in different layer calls, so their "
        f"statistics cannot be combined: {calls}. Every rank of a group must call its layers in the "
        f"same order (layers are numbered in the order they were constructed)"))


def local_problem(problem, group, context):
    """Raise a problem found where nothing is communicated (no peer waits)."""
    if problem is not None:
        where = f" (rank {group.ranks[group.rank]})" if group is not None else ""
        raise problem.exception(f"{context}{where}: {problem.describe()}") from problem.cause


def collective_timeout(rank, seconds, tag, group_ranks, missing, elsewhere, lost, grace):
    """The CollectiveTimeout of ``rank``, which waited ``seconds`` in call ``tag`` (debug mode).

    ``missing``: ranks never heard from; ``elsewhere``: [(rank, its tag)] of
    the peers heard from in another call; ``lost``: peers that arrived, then
    fell silent for ``grace`` s past the deadline.
    """
    calls = ", ".join(f"rank {r} in {describe_tag(t)}" for r, t in elsewhere)
    return CollectiveTimeout(
        f"rank {rank} waited {seconds} s in {describe_tag(tag)} of group {list(group_ranks)}; "
        f"never arrived: {missing or 'none'}"
        + (f"; in another call: {calls}" if elsewhere else "")
        + (f"; lost (arrived, then silent {grace} s after the deadline: dead or cut off): {lost}"
           if lost else ""))


# -- fail-stop ----------------------------------------------------------------------------
#
# Most agreed errors leave every rank of the group in the same call: a bad x,
# NaN in the batch, a bad dy. The step failed, the next one works. Two kinds do
# not, and after them no later collective can be trusted to match:
#
# * ranks that were in different calls (their rows' (layer, call) tags
#   differ): one rank skipped or repeated a call, so from now on its
#   collectives pair with its peers' other calls;
# * a collective that did not complete on this rank (CollectiveTimeout, an
#   interrupt or an MPI error inside it): a peer may be gone, or late and
#   about to complete a call its peers gave up; and a request is still
#   pending on the group's buffer.
#
# Then the group stops (fail-stop, the model of ULFM's MPI_Comm_revoke and of
# PyTorch's NCCL watchdog; the mpich wheel's MPI has no Comm.Revoke, so mpibn
# keeps the state itself): the GroupComm records the first failure, every
# later call on any layer of the group raises GroupFailed at once, locally,
# with no collective, and in debug mode the rank that stopped tells its
# peers, so that a rank that was only late stops at its next call
# (``mpibn.comm``: stop notices).

#: What a rank tells its peers when it stops the group on its own (debug mode): the
#: first number of its stop notice [why, layer, call, its rank] (``mpibn.comm``).
STOP_TIMEOUT, STOP_INTERRUPTED, STOP_MPI_ERROR = 1, 2, 3
_STOP_WHY = {STOP_TIMEOUT: "its collective timed out (debug_timeout)",
             STOP_INTERRUPTED: "an exception interrupted its collective",
             STOP_MPI_ERROR: "MPI raised an error in its collective"}

WHAT_TO_DO = ("restore every rank from the last checkpoint into new layers (mpibn.load_checkpoint, "
              "then load_param_into_net), or end the job and restart it from that checkpoint")


class GroupFailed(RuntimeError):
    """A call on a process group that stopped after a fatal error (fail-stop).

    ``first`` is the first fatal error this rank saw on the group (also the
    ``__cause__``)."""

    def __init__(self, message, first=None):
        super().__init__(message)
        self.first = first


def stop_group(group, exc):
    """Fail-stop: ``exc`` stops ``group`` on this rank. The first fatal error is
    kept (for later calls' GroupFailed), the group forgets its communicator's
    cache entry (new layers get a new communicator), and ``exc``'s message
    gains a sentence saying so; returned for ``raise``."""
    if group is None:                # a caller with no group to stop (the rows alone)
        return exc
    if group.failure is None:
        group.failure = exc
        group.failure_text = f"{type(exc).__name__}: {exc}"
        group.forget()
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}; this error stops the group (fail-stop): every later call on "
                    f"its layers raises GroupFailed",) + tuple(exc.args[1:])
    return exc


def describe_stop(numbers):
    """A peer's stop notice (kind, layer, call, its rank) in words (rank -1: a notice
    whose contents never arrived)."""
    kind, layer, call, rank = (int(v) for v in numbers)
    if rank < 0:
        return "a peer stopped the group (its stop notice arrived, its details did not)"
    return (f"rank {rank} stopped the group: {_STOP_WHY.get(kind, 'it failed')} in "
            f"{describe_tag((layer, call))}; this rank was late to that call, or cut off")


def check_alive(group, context):
    """Raise GroupFailed at once if ``group`` stopped (no communication: in
    debug mode a peer's stop notice that already arrived counts)."""
    # Only a failure stops a group, and only debug mode hears peers' stop
    # notices: otherwise there is nothing to check (every call's path).
    if group is None or group.failure is None and group.debug_timeout is None:
        return
    group.heed_stops()
    first = group.failure
    if first is not None:
        raise GroupFailed(
            f"{context} (group ranks {list(group.ranks)}): this process group stopped after a fatal "
            f"error and runs nothing more (fail-stop). First failure seen by rank "
            f"{group.ranks[group.rank]}: {group.failure_text}. The ranks may be out of step, "
            f"or a peer may be gone, so no later result could be trusted: {WHAT_TO_DO}", first) from first
