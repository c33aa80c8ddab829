#!/usr/bin/env python3
"""Flax NNX on an mpibn golden set: ``nnx.BatchNorm(axis_name=..., axis_index_groups=...)`` under ``jax.pmap``.

    python scripts/adapters/nnx_adapter.py GOLDEN OUT [--path mask|nomask|call] [--two-pass] [--scenarios a,b]
    python -m mpibn verify GOLDEN OUT --skip-missing

4 host devices, one per rank (``scripts/adapters/jax_common.py``); process
groups as ``axis_index_groups``. Read in flax 0.12.8
``flax/nnx/nn/normalization.py``: ``nnx.BatchNorm`` computes its
statistics with the same ``_compute_stats`` as ``flax.linen.BatchNorm``
(``pmean`` of each device's masked mean and mean of squares; with
``use_fast_variance=True``, the default, ``var = max(E[x^2] - E[x]^2,
0)``), momentum = weight of the old value, biased moving variance, moving
statistics held in float32 whatever ``param_dtype``. The module is split
(``nnx.split``) into its graph, parameters and batch statistics, and merged
again inside the pmapped step; dx and the parameter gradients are
``jax.vjp`` of y with each device's dy.

Inputs: ``dtype`` = the input dtype (the dtype of the computation and of
y), ``param_dtype`` float32 (float64 for float64 input), the golden gamma,
beta and initial moving statistics written into the variables.
``--path``: ``mask`` (the column): shards padded to one shape and the
padding masked out with ``mask=``, as the linen adapter does; ``nomask``:
no mask argument (equal shards only); ``call``: as ``mask`` but training
chosen at call time, ``bn(x, use_running_average=...)``, instead of in the
constructor. batch_mean/batch_var come from a second ``nnx.BatchNorm``
with momentum 0 on the same input in the same step.

Needs jax and flax (the ``nnx`` extra: ``pip install 'mpibn[nnx]'``).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax_common as J  # noqa: E402
from common import uses_batch_statistics  # noqa: E402


def make(nnx, jnp, s, first, momentum, ig, dtype, pdtype, fast, training, path):
    ura = None if path == "call" else not training
    bn = nnx.BatchNorm(first["gamma"].shape[0], axis=1, momentum=momentum, epsilon=s["eps"], dtype=dtype,
                       param_dtype=pdtype, use_running_average=ura, axis_name="ranks",
                       axis_index_groups=ig, use_fast_variance=fast, rngs=nnx.Rngs(0))
    bn.scale[...] = jnp.asarray(first["gamma"], pdtype)
    bn.bias[...] = jnp.asarray(first["beta"], pdtype)
    bn.mean[...] = jnp.asarray(first["moving_mean0"], bn.mean[...].dtype)
    bn.var[...] = jnp.asarray(first["moving_var0"], bn.var[...].dtype)
    return bn


def run_scenario(jax, jnp, nnx, s, ranks, path, fast):
    why = J.why_unsupported(s, ranks, has_groups=True, has_mask=path != "nomask")
    if why:
        return why
    dtype = J.xdtype(jnp, s)
    pdtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    training = uses_batch_statistics(s)
    ig = J.index_groups(s)
    P, first = len(ranks), ranks[0]
    bn = make(nnx, jnp, s, first, s["momentum"], ig, dtype, pdtype, fast, training, path)
    probe = make(nnx, jnp, s, first, 0.0, ig, dtype, pdtype, fast, True, "mask")
    graph, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)
    pgraph, pparams, pstats = nnx.split(probe, nnx.Param, nnx.BatchStat)
    rep = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * P), tree)   # noqa: E731
    params, stats, pparams, pstats = rep(params), rep(stats), rep(pparams), rep(pstats)
    mask = J.row_mask(ranks) if path != "nomask" else None
    kw = {"use_running_average": not training} if path == "call" else {}

    def step(params, stats, pp, ps, x, dy, m):
        # Every variable enters as an argument (NNX refuses to update a variable captured from
        # another trace level); the batch statistics are a primal input of the vjp, unused after.
        def f(p, st, x):
            layer = nnx.merge(graph, p, st)
            y = layer(x, mask=m, **kw)
            return y, nnx.state(layer, nnx.BatchStat)
        y, vjp, new_stats = jax.vjp(f, params, stats, x, has_aux=True)
        gp, _, gx = vjp(dy.astype(y.dtype))
        mean = var = jnp.zeros(first["gamma"].shape[0])
        if training:
            p = nnx.merge(pgraph, pp, ps)
            p(jax.lax.stop_gradient(x), mask=m)
            mean, var = p.mean[...], p.var[...]
        return y, gx, gp["scale"][...], gp["bias"][...], mean, var, new_stats

    pstep = jax.pmap(step, axis_name="ranks")
    steps = []
    m = mask if mask is not None else np.ones((P, 1), bool)
    for t in range(2):
        xs, dys = J.padded(ranks, "x", t, dtype), J.padded(ranks, "dy", t, dtype)
        y, dx, dg, db, mean, var, stats = pstep(params, stats, pparams, pstats, xs, dys,
                                                m if mask is not None else None)
        steps.append((y, dx, dg, db, mean, var, stats["mean"][...], stats["var"][...]))
    return J.collect(s, ranks, steps)


def main(argv=None):
    parser = J.parser(__doc__, ["mask", "nomask", "call"])
    parser.add_argument("--two-pass", action="store_true", help="use_fast_variance=False")
    args = parser.parse_args(argv)
    jax, jnp, manifest, data = J.start(args.golden, "nnx")
    try:
        import flax
        from flax import nnx
    except ImportError as exc:
        sys.exit(f"nnx_adapter: {exc} (pip install 'mpibn[nnx]')")
    return J.run_all(args, manifest, data,
                     lambda s, ranks: run_scenario(jax, jnp, nnx, s, ranks, args.path, not args.two_pass),
                     f"flax {flax.__version__} nnx (jax {jax.__version__}, pmap over {manifest['ranks']} "
                     f"host devices, path {args.path}, use_fast_variance={not args.two_pass})")


if __name__ == "__main__":
    sys.exit(main())
