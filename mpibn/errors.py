"""Problems a rank can find in its own input, encoded as numbers.

A rank whose input is bad must not simply raise: its peers are already
waiting in the Allreduce and would hang. Instead it joins the collective
with a problem code and a few integer details in its row of the buffer;
after the reduction every rank of the group sees every rank's problem and
raises the same exception (``comm.raise_agreed``). This module only knows
how to encode a problem into numbers and how to turn numbers back into a
sentence.
"""
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
    5: (RuntimeError, lambda d: "backward() was called without a training forward() before it"),
    6: (RuntimeError, lambda d: "backward() was called twice for one forward()"),
    7: (TypeError, lambda d: "dy must be a numpy.ndarray"),
    8: (TypeError, lambda d: f"dy has dtype {_dtype_name(d[0])}; expected {_FLOAT_NAMES}"),
    9: (ValueError, lambda d: f"dy has shape {_shape(d[:4])}; the forward input had shape {_shape(d[4:])}"),
    10: (ValueError, lambda d: "dy has more than 4 dimensions; it must have the forward input's shape"),
}
X_NOT_ARRAY, X_DTYPE, X_NDIM, X_CHANNELS = 1, 2, 3, 4
NO_FORWARD, BACKWARD_TWICE, DY_NOT_ARRAY, DY_DTYPE, DY_SHAPE, DY_NDIM = 5, 6, 7, 8, 9, 10


class Problem:
    """One rank's problem: a code from PROBLEMS and up to N_DETAILS integers."""

    def __init__(self, code, *details):
        self.code = code
        self.details = list(details) + [-1] * (N_DETAILS - len(details))

    def exception_type(self):
        return PROBLEMS[self.code][0]

    def describe(self):
        return PROBLEMS[self.code][1](self.details)

    @classmethod
    def from_numbers(cls, code, details):
        return cls(int(code), *[int(d) for d in details])


def dtype_code(dtype):
    """The one-character numpy code of a dtype, as a number that travels."""
    return ord(np.dtype(dtype).char)


def check_float_array(arr, name, not_array, bad_dtype):
    """The problem with ``arr`` as a float16/32/64 ndarray, or None."""
    if not isinstance(arr, np.ndarray):
        return Problem(not_array)
    if arr.dtype not in (np.float16, np.float32, np.float64):
        return Problem(bad_dtype, dtype_code(arr.dtype))
    return None


def check_input(x, num_features):
    """The problem with a forward input, or None."""
    problem = check_float_array(x, "x", X_NOT_ARRAY, X_DTYPE)
    if problem is not None:
        return problem
    if x.ndim not in (2, 4):
        return Problem(X_NDIM, x.ndim)
    if x.shape[1] != num_features:
        return Problem(X_CHANNELS, x.shape[1], num_features)
    return None


def check_grad(dy, expected_shape):
    """The problem with a backward input, or None."""
    problem = check_float_array(dy, "dy", DY_NOT_ARRAY, DY_DTYPE)
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
