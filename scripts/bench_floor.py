#!/usr/bin/env python3
"""The floor of the tiny layer's step in NumPy: its NumPy calls alone, next to torch.

    python scripts/bench_floor.py                 # (2, 4, 3, 3) float32, one thread

A training step of ``SyncBatchNorm`` on (2, 4, 3, 3) float32 makes about
60 NumPy calls on arrays of 4 to 72 values, where each call costs about
0.3 to 1 us whatever its size. ``floor`` below is those calls alone, in
one Python function, as the default mode makes them (float64 accumulation,
the two-pass moments about a shift, the moving statistics, y and dx
rounded once, the per-channel sums along contiguous rows), with nothing
else: no input checks, no exchange, no error state, no fingerprint, no
Python call between them. It is what any pure-NumPy implementation with
these numerics must pay, so ``floor / torch`` bounds what the tiny layer's
ratio to torch can reach here. Its y and dx are checked equal to the
layer's, so it is the same arithmetic.

Timed interleaved with the layer and torch's CPU batch norm (when
installed), CPU clock, best of 15 rounds of about 2 ms each.
"""
import os
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402

from mpibn.cli.bench import best_of, data, layer, load_torch  # noqa: E402

SHAPE, DTYPE, EPS, MOMENTUM = (2, 4, 3, 3), "float32", 1e-5, 0.9


def numpy_floor(x, dy, gamma, beta, moving_mean, moving_var):
    """The step's NumPy calls, nothing else (4-D, one rank, the whole plan)."""
    num, channels, length = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    n = num * length
    scratch = np.empty((3, channels, n))
    loaded = [b.reshape(channels, num, length) for b in scratch]
    x3, dy3 = x.reshape(num, channels, length), dy.reshape(num, channels, length)

    def step():
        loaded[0][...] = x3.transpose(1, 0, 2)                          # x in float64, channel-major
        shift = np.add.reduce(np.add.reduce(loaded[0], axis=2), axis=1)
        shift /= float(n)                                               # K
        np.subtract(scratch[0], shift[:, None], out=scratch[1])         # d = x - K
        np.multiply(scratch[1], scratch[1], out=scratch[2])
        sums = np.add.reduce(scratch[1:], axis=2)
        moments = np.empty((3, channels))
        np.divide(sums[0], float(n), out=moments[0])
        np.multiply(sums[0], moments[0], out=moments[1])
        np.subtract(sums[1], moments[1], out=moments[1])                # m2
        moments[0] += shift
        np.maximum(moments[1], 0.0, out=moments[1])
        var = moments[1] / float(n)
        np.divide(moments[1], float(n - 1), out=moments[2])
        new = np.empty((2, channels))
        new[0], new[1] = moving_mean, moving_var
        new *= MOMENTUM
        new += np.multiply(moments[::2], 1.0 - MOMENTUM)
        moving_mean[...], moving_var[...] = new.astype(moving_mean.dtype)
        mean, inv_std = moments[0], 1.0 / np.sqrt(var + EPS)
        scale = np.multiply(gamma, inv_std)
        np.subtract(scratch[0], mean[:, None], out=scratch[0])         # y
        scratch[0] *= scale[:, None]
        scratch[0] += beta[:, None]
        y = np.empty(x.shape, x.dtype)
        y.reshape(num, channels, length).transpose(1, 0, 2)[...] = loaded[0]
        loaded[0][...] = dy3.transpose(1, 0, 2)                          # backward
        loaded[1][...] = x3.transpose(1, 0, 2)
        np.subtract(scratch[1], mean[:, None], out=scratch[1])
        np.multiply(scratch[0], scratch[1], out=scratch[2])
        grads = np.add.reduce(scratch[::2], axis=2)
        grads[1] *= inv_std
        means = grads / float(n)
        coef = means[1] * inv_std
        np.subtract(scratch[0], means[0][:, None], out=scratch[0])      # dx
        np.multiply(scratch[1], coef[:, None], out=scratch[1])
        scratch[0] -= scratch[1]
        scratch[0] *= scale[:, None]
        dx = np.empty(x.shape, x.dtype)
        dx.reshape(num, channels, length).transpose(1, 0, 2)[...] = loaded[0]
        return y, dx, grads[1].astype(x.dtype), grads[0].astype(x.dtype)
    return step


def main():
    x, dy = data(SHAPE, DTYPE)
    bn = layer(SHAPE[1], DTYPE)
    gamma, beta = bn.gamma.data.astype(np.float64), bn.beta.data.astype(np.float64)
    floor = numpy_floor(x, dy, gamma, beta, bn.moving_mean.data.copy(), bn.moving_variance.data.copy())
    y, dx, _, _ = floor()
    assert y.tobytes() == bn(x).tobytes() and dx.tobytes() == bn.backward(dy).tobytes(), \
        "the floor must be the layer's arithmetic"
    cands = {"mpibn": lambda: (bn(x), bn.backward(dy)), "floor": floor}
    torch, functional = load_torch(1)
    if torch is not None:
        from mpibn.cli.bench.grid import torch_step
        cands["torch"] = torch_step(torch, functional, x, dy, bn.gamma.data.copy(), bn.beta.data.copy())
    t = best_of(cands, 15, clock=time.process_time)
    print(f"{SHAPE} {DTYPE} training step, forward+backward, best of 15, CPU clock, one thread; "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, what in (("mpibn", "the layer"), ("floor", "its NumPy calls alone"), ("torch", "torch CPU")):
        if name in t:
            print(f"  {what:24s} {t[name] * 1e6:7.1f} us")
    if "torch" in t:
        print(f"  mpibn / torch {t['mpibn'] / t['torch']:.2f}, floor / torch {t['floor'] / t['torch']:.2f}, "
              f"mpibn / floor {t['mpibn'] / t['floor']:.2f}")
    bn.close()


if __name__ == "__main__":
    main()
