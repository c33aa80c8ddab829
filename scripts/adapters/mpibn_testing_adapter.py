#!/usr/bin/env python3
"""mpibn itself, in one process, on an mpibn golden set: ``mpibn.testing.reference``.

    python scripts/adapters/mpibn_testing_adapter.py GOLDEN OUT [--no-exact]
    python -m mpibn verify GOLDEN OUT

No MPI: every scenario's ranks are simulated (``mpibn.testing``), two
steps with the moving statistics carried over, parameters float64 as in
``python -m mpibn golden``. On a golden set written with exact statistics
(the default) the default here (exact=True) must give every quantity bit
for bit: it is the conformance report's "mpibn exact" column.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load, write  # noqa: E402

from mpibn.golden import array_dtype, storable  # noqa: E402
from mpibn.testing import reference  # noqa: E402


def run_scenario(s, ranks, exact):
    size = len(ranks)
    mm, mv = ranks[0]["moving_mean0"], ranks[0]["moving_var0"]
    xdtype = array_dtype(s["dtype"])          # bfloat16 is stored as float32 (exact)
    out = [{k: [] for k in s["outputs"]} for _ in range(size)]
    for step in range(2):
        res = reference([r["x"][step].astype(xdtype) for r in ranks],
                        [r["dy"][step].astype(xdtype) for r in ranks],
                        process_groups=s["process_groups"], gamma=ranks[0]["gamma"], beta=ranks[0]["beta"],
                        moving_mean=mm, moving_var=mv, eps=s["eps"], momentum=s["momentum"],
                        training=s["training"], use_batch_statistics=s["use_batch_statistics"],
                        exact=exact, dtype=np.dtype(s.get("param_dtype", "float64")))
        mm, mv = [r.moving_mean for r in res], [r.moving_var for r in res]
        for o, r in zip(out, res):
            for k in o:
                o[k].append(storable(getattr(r, k)))
    return [{k: np.stack(v) for k, v in o.items()} for o in out]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("golden")
    parser.add_argument("out")
    parser.add_argument("--no-exact", action="store_true", help="mpibn's default mode (exact=False)")
    args = parser.parse_args(argv)
    manifest, data = load(args.golden)
    for name, s in manifest["scenarios"].items():
        for r, arrays in enumerate(run_scenario(s, data[name], not args.no_exact)):
            write(args.out, name, r, arrays)
    print(f"mpibn.testing.reference (exact={not args.no_exact}, one process): "
          f"{len(manifest['scenarios'])} scenarios written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
