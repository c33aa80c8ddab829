"""Initializers: MindSpore's names -> arrays, identical on every rank.

Accepted forms for ``gamma_init``, ``beta_init``, ``moving_mean_init`` and
``moving_var_init``:

* a string, case-insensitive: 'zeros'/'zero', 'ones'/'one', 'normal'
  (sigma 0.01), 'uniform' (+-0.07), 'truncatednormal' (sigma 0.01, cut at
  +-2), 'xavier_uniform', 'xavier_normal', 'he_uniform', 'he_normal';
* a number (bool excepted): a constant;
* an ndarray of shape (C,): used as given (cast to the layer dtype);
* an ``Initializer`` object, e.g. ``Normal(sigma=0.1, seed=3)``.

Random initializers draw from a generator seeded by ``seed`` or, when that
is None, by a hash of the parameter's name: no rank-dependent state, so
every rank gets the same values with no communication.

Xavier and He need fan-in and fan-out, which a 1-D parameter of shape (C,)
does not have: as in MindSpore they raise ValueError for such shapes.
"""
import math
import zlib

import numpy as np

from .rounding import finfo

__all__ = ["Initializer", "Zero", "One", "Constant", "Normal", "Uniform",
           "TruncatedNormal", "XavierUniform", "XavierNormal", "HeUniform",
           "HeNormal", "initializer"]


class Initializer:
    """Base class: ``init(shape, dtype, name)`` returns a new ndarray."""

    random = False

    def __init__(self, seed=None):
        self.seed = seed

    def rng(self, name):
        seed = self.seed if self.seed is not None else zlib.crc32(name.encode())
        return np.random.default_rng(seed)

    def __call__(self, shape, dtype, name="param"):
        values = self.sample(tuple(shape), name)
        return np.asarray(values, dtype=np.float64).astype(dtype)

    def sample(self, shape, name):
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Constant(Initializer):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def sample(self, shape, name):
        return np.full(shape, float(self.value))


class Zero(Constant):
    def __init__(self):
        super().__init__(0.0)


class One(Constant):
    def __init__(self):
        super().__init__(1.0)


class Normal(Initializer):
    def __init__(self, sigma=0.01, mean=0.0, seed=None):
        super().__init__(seed)
        self.sigma, self.mean = sigma, mean

    def sample(self, shape, name):
        return self.rng(name).normal(self.mean, self.sigma, shape)


class Uniform(Initializer):
    def __init__(self, scale=0.07, seed=None):
        super().__init__(seed)
        self.scale = scale

    def sample(self, shape, name):
        return self.rng(name).uniform(-self.scale, self.scale, shape)


class TruncatedNormal(Initializer):
    """Normal(mean, sigma) redrawn until inside [a, b] (absolute bounds)."""

    def __init__(self, sigma=0.01, mean=0.0, a=-2.0, b=2.0, seed=None):
        super().__init__(seed)
        self.sigma, self.mean, self.a, self.b = sigma, mean, a, b

    def sample(self, shape, name):
        rng = self.rng(name)
        values = rng.normal(self.mean, self.sigma, shape)
        outside = (values < self.a) | (values > self.b)
        while outside.any():
            values[outside] = rng.normal(self.mean, self.sigma, int(outside.sum()))
            outside = (values < self.a) | (values > self.b)
        return values


def _fans(shape, name):
    if len(shape) < 2:
        raise ValueError(f"{name}: fan_in and fan_out cannot be computed for a tensor with fewer "
                         f"than 2 dimensions (shape {shape}); Xavier and He initializers need "
                         f"a weight of at least 2 dimensions, as in MindSpore")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


class XavierUniform(Initializer):
    def __init__(self, gain=1.0, seed=None):
        super().__init__(seed)
        self.gain = gain

    def sample(self, shape, name):
        fan_in, fan_out = _fans(shape, name)
        bound = self.gain * math.sqrt(6.0 / (fan_in + fan_out))
        return self.rng(name).uniform(-bound, bound, shape)


class XavierNormal(XavierUniform):
    def sample(self, shape, name):
        fan_in, fan_out = _fans(shape, name)
        return self.rng(name).normal(0.0, self.gain * math.sqrt(2.0 / (fan_in + fan_out)), shape)


class HeUniform(Initializer):
    """Kaiming uniform (MindSpore defaults: leaky_relu, slope 0, fan_in)."""

    def __init__(self, negative_slope=0.0, mode="fan_in", seed=None):
        super().__init__(seed)
        self.negative_slope, self.mode = negative_slope, mode

    def std(self, shape, name):
        fan_in, fan_out = _fans(shape, name)
        fan = fan_in if self.mode == "fan_in" else fan_out
        return math.sqrt(2.0 / (1 + self.negative_slope ** 2)) / math.sqrt(fan)

    def sample(self, shape, name):
        bound = math.sqrt(3.0) * self.std(shape, name)
        return self.rng(name).uniform(-bound, bound, shape)


class HeNormal(HeUniform):
    def sample(self, shape, name):
        return self.rng(name).normal(0.0, self.std(shape, name), shape)


_NAMES = {
    "zeros": Zero, "zero": Zero, "ones": One, "one": One,
    "normal": Normal, "uniform": Uniform, "truncatednormal": TruncatedNormal,
    "xavier_uniform": XavierUniform, "xavier_normal": XavierNormal,
    "he_uniform": HeUniform, "he_normal": HeNormal,
}


def initializer(init, shape, dtype, name, arg="init"):
    """The initial array for parameter ``name`` (argument ``arg``), finite in ``dtype``.

    Checked after the cast to ``dtype``: 1e40 is a finite number, but not a
    float32 (it would become inf, which ``inf`` itself is refused as)."""
    with np.errstate(over="ignore"):          # an overflowing cast is refused below
        values = _initial(init, tuple(shape), dtype, name, arg)
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values))
        raise ValueError(f"{arg}={_short(init)} overflows {np.dtype(dtype).name} at index(es) "
                         f"{bad[:8].tolist()} (largest finite {float(finfo(dtype).max):g}); use "
                         f"smaller values or a wider dtype")
    return values


def _short(init):
    return f"<array {init.dtype} {init.shape}>" if isinstance(init, np.ndarray) else repr(init)


def _initial(init, shape, dtype, name, arg):
    if isinstance(init, str):
        cls = _NAMES.get(init.lower())
        if cls is None:
            raise ValueError(f"{arg}={init!r} is not a known initializer; expected one of "
                             f"{sorted(_NAMES)}, a number, an ndarray of shape {shape} "
                             f"or an mpibn.init.Initializer")
        init = cls()
    if isinstance(init, Initializer):
        try:
            return init(shape, dtype, name)
        except ValueError as err:
            raise ValueError(f"{arg}={init!r}: {err}") from None
    if isinstance(init, (bool, np.bool_)):
        raise TypeError(f"{arg}={init!r}: a bool is not an initializer; use a number, "
                        f"a name such as 'ones', an ndarray or an Initializer")
    if isinstance(init, (int, float, np.integer, np.floating)):
        if not math.isfinite(init):
            raise ValueError(f"{arg}={init!r} is not finite")
        return np.full(shape, init, dtype=dtype)
    if isinstance(init, np.ndarray):
        if init.shape != shape:
            raise ValueError(f"{arg} has shape {init.shape}; expected {shape}")
        if init.dtype.kind not in "fiu":
            raise TypeError(f"{arg} has dtype {init.dtype}; expected a real numeric dtype")
        if not np.isfinite(init).all():
            raise ValueError(f"{arg} contains NaN or Inf")
        return init.astype(dtype)
    raise TypeError(f"{arg} must be a str, a number, an ndarray of shape {shape} or an "
                    f"mpibn.init.Initializer, got {type(init).__name__}: {init!r}")
