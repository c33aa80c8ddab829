#!/usr/bin/env python3
"""What each check a reference keeps costs on the tiny layer's training step,
and where the time of a step goes (a profile, by piece).

    python scripts/bench_checks.py                       # the checks, on (2, 4, 3, 3) float32
    python scripts/bench_checks.py --profile 256x1024 float32   # the pieces of one cell's step

Times one training forward+backward of (2, 4, 3, 3) float32 on one rank
(``COMM_SELF``), then each check alone as the step runs it (input checks,
the fingerprint of x, the status column of the exchange, the NaN/Inf and
moving-statistics checks, the error state, the call tags), as a share of
the step: CPU time, best of 9 rounds, one thread. docs/performance.md
runs it and holds its claim: no check costs 5 % of the tiny step or more.
"""
import os
import sys
import time
import timeit

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402

from mpibn import fingerprint as FP  # noqa: E402
from mpibn import functional as F  # noqa: E402
from mpibn import sync  # noqa: E402
from mpibn.cli.bench import data, layer  # noqa: E402

CHECKS = [
    ("input checks: x, gamma, dy (inline)",
     "type(g) is np.ndarray and g.ndim == 1 and type(x) is np.ndarray and x.dtype in sync._NATIVE_FLOATS "
     "and x.ndim in (2, 4) and x.shape[1] == 4 and type(dy) is np.ndarray and dy.shape == saved.shape "
     "and dy.dtype in sync._NATIVE_FLOATS"),
    ("fingerprint of x: forward, backward's compare", "FP.fingerprint(x3); FP.fingerprint(x3) != fp"),
    ("agreed errors: the status column, both passes", "buf[0, 0] != 0.0; buf[0, 0] != 0.0"),
    ("NaN/Inf check (merged moments)", "sync._finite(moments)"),
    ("moving statistics overflow check", "sync._finite(pair)"),
    ("error state around the statistics", "with np.errstate(invalid='ignore', over='ignore'): pass"),
    ("call tags into the row, both passes", "buf[0, 2], buf[0, 3] = (2, 1); buf[0, 2], buf[0, 3] = (3, 1)"),
]


PIECES = [
    ("forward: local moments (batch_norm_stats)", "F.batch_norm_stats(x3, out)"),
    ("forward: y (batch_norm_elemt, x kept from the moments)",
     "F.batch_norm_stats(x3, out, keep=True); F.batch_norm_elemt(x3, mean, inv_std, g, beta, kept=kx)"),
    ("backward: the two sums (batch_norm_backward_reduce)",
     "F.batch_norm_backward_reduce(dy3, x=x3, mean=mean, inv_std=inv_std, out=out, keep=True)"),
    ("backward: dx (batch_norm_backward_elemt, kept)",
     "F.batch_norm_backward_reduce(dy3, x=x3, mean=mean, inv_std=inv_std, out=out, keep=True); "
     "F.batch_norm_backward_elemt(dy3, None, g, inv_std, mean, m2, x=x3, mean=mean, kept=kept)"),
    ("one exchange (a group of one: no MPI call)", "ex.exchange(None, 18, (mean, m2), 'c', (2, 1))"),
    ("merge_stats (one rank)", "F.merge_stats(counts, rows[:, 0], rows[:, 1], out=out)"),
    ("moving statistics, both", "sync._moving_pair(rm, rv, rows[0], 0.9)"),
    ("inv_std", "F.inv_std_from_var(m2, 1e-5)"),
]


def profile(shape, dtype):
    """The pieces of one training step of ``shape``/``dtype``, each timed alone."""
    x, dy = data(shape, dtype)
    bn = layer(shape[1], dtype)
    x3, dy3 = F.as_ncl(x), F.as_ncl(dy)
    n, mean, m2 = F.batch_norm_stats(x3)
    mean, m2 = mean.copy(), m2.copy()
    names = dict(np=np, F=F, sync=sync, bn=bn, x=x, dy=dy, x3=x3, dy3=dy3, mean=mean, m2=m2,
                 inv_std=F.inv_std_from_var(m2 / n, 1e-5), g=bn.gamma.data, beta=bn.beta.data,
                 out=np.empty((2, shape[1])), ex=bn._exchange, counts=np.array([float(n)]),
                 rows=np.stack([mean, m2])[None], rm=bn.moving_mean.data.copy(),
                 rv=bn.moving_variance.data.copy(),
                 kx=F.batch_norm_stats(x3, keep=True)[3],            # what the layer's forward passes on
                 kept=F.batch_norm_backward_reduce(dy3, x=x3, mean=mean, inv_std=m2, keep=True)[2])

    def best(stmt):
        timer = timeit.Timer(stmt, timer=time.process_time, globals=names)
        number = max(1, int(2e-3 / max(timer.timeit(1), 1e-7)))
        return min(timer.repeat(number=number, repeat=9)) / number * 1e6

    step = best("bn(x); bn.backward(dy)")
    print(f"{shape} {dtype} training step, forward+backward: {step:.1f} us; load average "
          f"{os.getloadavg()[0]:.1f}")
    total = 0.0
    for name, stmt in PIECES:
        cost = best(stmt)
        if name.startswith("backward: dx"):
            cost -= best(PIECES[2][1])
        elif name.startswith("forward: y"):
            cost -= best(PIECES[0][1])
        # the exchange runs twice per step (forward and backward)
        total += 2 * cost if name.startswith("one exchange") else cost
        print(f"  {name:56s} {cost:9.1f} us  {100 * cost / step:5.1f} %")
    rest = step - total
    print(f"  {'the rest: checks, error state, fingerprint, Saved, calls':56s} {rest:9.1f} us  "
          f"{100 * rest / step:5.1f} %")
    bn.close()


def main():
    if sys.argv[1:2] == ["--profile"]:
        shape = tuple(int(v) for v in sys.argv[2].split("x"))
        return profile(shape, sys.argv[3] if len(sys.argv) > 3 else "float32")
    x, dy = data((2, 4, 3, 3), "float32")
    bn = layer(4, "float32")
    bn(x)
    bn.backward(dy)
    x3 = F.as_ncl(x)
    names = dict(np=np, sync=sync, FP=FP, bn=bn, x=x, dy=dy, x3=x3, g=bn.gamma.data, saved=bn._saved,
                 fp=FP.fingerprint(x3), moments=np.ones((2, 4)), pair=np.ones((2, 4), np.float32),
                 buf=bn._exchange.buf)

    def best(stmt, number):
        timer = timeit.Timer(stmt, timer=time.process_time, globals=names)
        return min(timer.repeat(number=number, repeat=9)) / number * 1e6

    step = best("bn(x); bn.backward(dy)", 2000)
    print(f"tiny step (2, 4, 3, 3) float32, forward+backward: {step:.1f} us; load average "
          f"{os.getloadavg()[0]:.1f}")
    for name, stmt in CHECKS:
        cost = best(stmt, 20000)
        print(f"  {name:48s} {cost:6.2f} us  {100 * cost / step:5.1f} %")
    bn.close()


if __name__ == "__main__":
    main()
