#!/usr/bin/env python3
"""What each check a reference keeps costs on the tiny layer's training step.

    python scripts/bench_checks.py

Times one training forward+backward of (2, 4, 3, 3) float32 on one rank
(``COMM_SELF``), then each check alone as the step runs it (input checks,
the fingerprint of x, the status column of the exchange, the NaN/Inf and
moving-statistics checks, the error state, the call tags), as a share of
the step: CPU time, best of 9 rounds, one thread. The numbers are quoted in
docs/performance.md (issue 20: a check over 5 % of a tiny step is measured
and named).
"""
import os
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


def main():
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
