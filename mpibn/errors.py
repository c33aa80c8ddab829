"""Problems a rank can find in its own input, encoded as numbers.

A rank whose input is bad must not simply raise: its peers are already
waiting in the Allreduce and would hang. Instead it joins the collective
with a problem code and a few integer details in its row of the buffer;
after the reduction every rank of the group sees every rank's problem and
raises the same exception (``comm.raise_agreed``). This module only knows
how to encode a problem into numbers and how to turn numbers back into a
sentence.
"""
import builtins

import numpy as np

#: Integer detail slots each rank's row carries (dy's and x's shapes need 8).
N_DETAILS = 8

_FLOAT_NAMES = "float16, float32 or float64"


def _shape(details):
    return "(" + ", ".join(str(int(d)) for d in details if d >= 0) + ")"


def _dtype_name(code):
    try:
        return np.dtype(chr(int(code))).name
    except (TypeError, ValueError):
        return "an unknown dtype"


# code -> (exception type, sentence built from the details)
PROBLEMS = {
    1: (TypeError, lambda d: "x must be a numpy.ndarray"),
    2: (TypeError, lambda d: f"x has dtype {_dtype_name(d[0])}; expected {_FLOAT_NAMES}"),
    3: (ValueError, lambda d: f"x must be 2-D (N, C) or 4-D (N, C, H, W), got a {int(d[0])}-D array"),
    4: (ValueError, lambda d: f"x has {int(d[0])} channels (shape[1]); the layer has num_features={int(d[1])}"),
    # d[0] = 1 when the layer is in training mode (a training forward was due)
    5: (RuntimeError, lambda d: f"backward() was called without a {'training ' if d[0] == 1 else ''}"
                                f"forward() before it"),
    6: (RuntimeError, lambda d: "backward() was called twice for one forward()"),
    7: (TypeError, lambda d: "dy must be a numpy.ndarray"),
    8: (TypeError, lambda d: f"dy has dtype {_dtype_name(d[0])}; expected {_FLOAT_NAMES}"),
    9: (ValueError, lambda d: f"dy has shape {_shape(d[:4])}; the forward input had shape {_shape(d[4:])}"),
    10: (ValueError, lambda d: "dy has more than 4 dimensions; it must have the forward input's shape"),
    11: (TypeError, lambda d: _subclass("x", d[0])),
    12: (TypeError, lambda d: _subclass("dy", d[0])),
    13: (RuntimeError, lambda d: "x was modified in place between forward() and backward() (its "
                                 "fingerprint changed), so dx would be wrong; keep x unchanged until "
                                 "backward(), or pass forward() a copy"),
    # The exception type travels as its name (see Problem.from_exception).
    14: (None, lambda d: f"{_unpack_name(d)} raised in this rank's own computation before the "
                         f"collective (that rank's traceback shows it)"),
}
X_NOT_ARRAY, X_DTYPE, X_NDIM, X_CHANNELS = 1, 2, 3, 4
NO_FORWARD, BACKWARD_TWICE, DY_NOT_ARRAY, DY_DTYPE, DY_SHAPE, DY_NDIM = 5, 6, 7, 8, 9, 10
X_SUBCLASS, DY_SUBCLASS, X_CHANGED, LOCAL_ERROR = 11, 12, 13, 14

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


class Problem:
    """One rank's problem: a code from PROBLEMS and up to N_DETAILS integers."""

    def __init__(self, code, *details):
        self.code = code
        self.details = list(details) + [-1] * (N_DETAILS - len(details))
        self.cause = None          # the local exception behind a LOCAL_ERROR, on its own rank

    @classmethod
    def from_exception(cls, exc):
        """A LOCAL_ERROR carrying ``exc``'s type name (``exc`` itself stays on this rank)."""
        problem = cls(LOCAL_ERROR, *_pack_name(type(exc).__name__))
        problem.cause = exc
        return problem

    def exception_type(self):
        if self.code == LOCAL_ERROR:
            # The same builtin type on every rank (a library's own type is
            # not importable everywhere): RuntimeError for anything else.
            cls = getattr(builtins, _unpack_name(self.details), None)
            return cls if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError
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


def is_float(dtype):
    """float16, float32 or float64, in either byte order (big-endian data is
    accepted; ``mpibn.sync`` converts it to native order once)."""
    return dtype.newbyteorder("=") in (np.float16, np.float32, np.float64)


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
    problem = check_float_array(x, "x", X_NOT_ARRAY, X_DTYPE, X_SUBCLASS)
    if problem is not None:
        return problem
    if x.ndim not in (2, 4):
        return Problem(X_NDIM, x.ndim)
    if x.shape[1] != num_features:
        return Problem(X_CHANNELS, x.shape[1], num_features)
    return None


def check_grad(dy, expected_shape):
    """The problem with a backward input, or None."""
    problem = check_float_array(dy, "dy", DY_NOT_ARRAY, DY_DTYPE, DY_SUBCLASS)
    if problem is not None:
        return problem
    if dy.ndim > 4:
        return Problem(DY_NDIM)
    if dy.shape != tuple(expected_shape):
        pad = [-1] * 4
        got = (list(dy.shape) + pad)[:4]
        want = (list(expected_shape) + pad)[:4]
        return Problem(DY_SHAPE, *got, *want)
    return None


def guarded(problem, work):
    """Run this rank's local work before a collective: (problem, result).

    The rule of every pass (``mpibn.sync``): local work cannot skip the
    collective. Any exception in ``work()``, however deep in the math,
    becomes a LOCAL_ERROR problem, the rank still joins with it flagged,
    and every rank of the group raises (this rank with the original
    exception as ``__cause__``). Skipped when ``problem`` is already set.
    """
    if problem is not None:
        return problem, None
    try:
        return None, work()
    except Exception as exc:     # noqa: BLE001 - reported to every rank, chained on this one
        return Problem.from_exception(exc), None
