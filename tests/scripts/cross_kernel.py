"""Print, as JSON, a digest of mpibn's results on fixed inputs (tests/test_cross_kernel.py).

Run once per OpenBLAS kernel (OPENBLAS_CORETYPE set by the caller): every
case is one ``mpibn.testing.reference`` step (forward and backward, every
rank's y, dx, dgamma, dbeta, statistics and moving statistics), in both
modes, 2-D and 4-D, float16/32/64, one and several ranks, small arrays and
arrays big enough for the blocked plan. ``control`` digests two BLAS sums
(a dot and a gemv), which do change with the kernel: they show that the
kernel really changed.
"""
import hashlib
import json

import numpy as np

from mpibn.testing import QUANTITIES, reference

# (shards' shapes: one per simulated rank)
SHAPES = {
    "2d": [(6, 5), (3, 5), (0, 5)],
    "4d": [(3, 4, 5, 6), (2, 4, 5, 6)],
    "2d-blocked": [(300, 600)],
    "2d-wide-rows": [(128, 512), (64, 512)],          # one block each, seen in wide rows (blocks.Wide)
    "4d-blocked": [(40, 8, 24, 24), (8, 8, 24, 24)],
    "4d-one-rank": [(4, 3, 7, 7)],
}


def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def cases():
    out = {}
    for name, shapes in SHAPES.items():
        for dtype in ("float16", "float32", "float64"):
            for exact in (False, True):
                if exact and "blocked" in name and dtype != "float32":
                    continue                       # exact mode is slow; one dtype suffices there
                rng = np.random.default_rng(len(out))
                xs = [(3.0 + 2.0 * rng.standard_normal(s)).astype(dtype) for s in shapes]
                dys = [rng.standard_normal(s).astype(dtype) for s in shapes]
                channels = shapes[0][1]
                gamma = np.linspace(0.5, 1.5, channels).astype(dtype)
                beta = np.linspace(-1, 1, channels).astype(dtype)
                ranks = reference(xs, dys, gamma=gamma, beta=beta, exact=exact, dtype=dtype)
                out[f"{name} {dtype} exact={exact}"] = digest(
                    *[getattr(r, q) for r in ranks for q in QUANTITIES])
    return out


def control():
    rng = np.random.default_rng(0)
    v, a = rng.standard_normal(1000), rng.standard_normal((257, 33))
    return digest(v @ np.ones(1000), np.ones(257) @ a)


def kernel():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return ";".join(str(d.get("architecture")) for d in threadpool_info() if d.get("internal_api") == "openblas")


if __name__ == "__main__":
    print(json.dumps({"kernel": kernel(), "control": control(), "cases": cases()}))
