#!/usr/bin/env python3
"""JAX/Flax on an mpibn golden set: ``flax.linen.BatchNorm(axis_name=...)`` under ``jax.pmap``.

    python scripts/adapters/jax_adapter.py GOLDEN OUT [--exact-variance]
    python -m mpibn verify GOLDEN OUT --skip-missing

One host device per rank (``XLA_FLAGS=--xla_force_host_platform_device_count=K``
is set here before jax is imported), rank r's shard on device r, process
groups as ``axis_index_groups``. pmap needs one shape on every device, so
shards are padded to the largest and the padding is excluded with Flax's
``mask`` argument. Flax's momentum is the weight of the old value, as in
MindSpore (no conversion). Parameters are float32 (float64, with
JAX_ENABLE_X64 set here, for float64 scenarios). Gradients: ``jax.vjp`` of each device's y with
its dy (JAX transposes the pmean, so dx is the gradient of the sum of the
ranks' losses, and dgamma/dbeta are each rank's share, as in mpibn).
batch_mean/batch_var are what Flax's own ``_compute_stats`` returns.

Flax as it is: statistics are the pmean of per-device means (so uneven
shards get the wrong statistics, flax #2417; an empty shard gives NaN),
the variance is E[x^2] - E[x]^2 in float32 (``use_fast_variance=True``,
the default; ``--exact-variance`` passes False), and the moving variance
is the biased one. Groups of unequal size are passed to
``axis_index_groups`` as they are: JAX accepts them, but (measured with jax
0.10.2) ``lax.pmean`` then divides every group's sum by the size of the
first group, so the rank alone in ``groups_rank_outside`` gets wrong
statistics without any error; the adapter prints a warning.

Needs jax, jaxlib and flax (the ``jax`` extra: ``pip install 'mpibn[jax]'``).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import uses_batch_statistics, write  # noqa: E402
from jax_common import start  # noqa: E402


def run_scenario(jax, jnp, nn, compute_stats, s, ranks, fast_variance):
    size = len(ranks)
    groups = sorted({tuple(g) for g in s["groups_of_rank"]})
    note = None
    if len({len(g) for g in groups}) > 1:
        note = f"groups {groups} have unequal sizes: JAX's pmean divides by the first group's size"
    index_groups = None if len(groups) == 1 else [list(g) for g in groups]
    dtype = jnp.dtype(s["dtype"])
    training = uses_batch_statistics(s)
    pdtype = np.float64 if dtype == jnp.float64 else np.float32
    model = nn.BatchNorm(use_running_average=not training, axis=1, momentum=s["momentum"],
                         epsilon=s["eps"], dtype=dtype, param_dtype=pdtype, axis_name="ranks",
                         axis_index_groups=index_groups, use_fast_variance=fast_variance)
    counts = [r["x"].shape[1] for r in ranks]
    n_max = max(1, max(counts))

    def pad(key, step):
        out = np.zeros((size, n_max) + ranks[0][key].shape[2:], dtype)
        for r, data in enumerate(ranks):
            out[r, :counts[r]] = data[key][step]
        return out

    mask = np.zeros((size, n_max) + ranks[0]["x"].shape[3:], bool)
    mask = np.broadcast_to(mask[:, :, None], (size, n_max) + ranks[0]["x"].shape[2:]).copy()
    for r in range(size):
        mask[r, :counts[r]] = True
    axes = (0,) + tuple(range(2, ranks[0]["x"].ndim - 1))

    def step(params, stats, x, dy, m):
        def f(p, x):
            y, upd = model.apply({"params": p, "batch_stats": stats}, x, mask=m, mutable=["batch_stats"])
            return y, upd["batch_stats"]
        y, vjp, new_stats = jax.vjp(f, params, x, has_aux=True)
        gp, gx = vjp(dy)
        mean, var = compute_stats(x, axes, dtype, "ranks", index_groups, use_fast_variance=fast_variance,
                                  mask=m)
        return y, gx, gp, new_stats, mean, var

    pstep = jax.pmap(step, axis_name="ranks")
    rep = lambda key: np.stack([r[key] for r in ranks]).astype(pdtype)   # noqa: E731
    params = {"scale": rep("gamma"), "bias": rep("beta")}
    stats = {"mean": rep("moving_mean0"), "var": rep("moving_var0")}
    out = [{k: [] for k in s["outputs"]} for _ in range(size)]
    for t in range(2):
        y, dx, gp, stats, mean, var = pstep(params, stats, pad("x", t), pad("dy", t), mask)
        y, dx, mean, var = map(np.asarray, (y, dx, mean, var))
        for r in range(size):
            o, n = out[r], counts[r]
            o["y"].append(y[r, :n])
            o["dx"].append(dx[r, :n])
            o["dgamma"].append(np.asarray(gp["scale"][r]))
            o["dbeta"].append(np.asarray(gp["bias"][r]))
            if "batch_mean" in o:
                o["batch_mean"].append(mean[r])
                o["batch_var"].append(var[r])
            o["moving_mean"].append(np.asarray(stats["mean"][r]))
            o["moving_var"].append(np.asarray(stats["var"][r]))
    return [{k: np.stack(v) for k, v in o.items()} for o in out], note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("golden")
    parser.add_argument("out")
    parser.add_argument("--exact-variance", action="store_true",
                        help="use_fast_variance=False (two pmeans: mean, then E[(x - mean)^2])")
    args = parser.parse_args(argv)
    jax, jnp, manifest, data = start(args.golden, "jax")
    ranks = manifest["ranks"]
    try:
        import flax
        import flax.linen as nn
        from flax.linen.normalization import _compute_stats
    except ImportError as exc:
        sys.exit(f"jax_adapter: {exc} (pip install 'mpibn[jax]')")
    notes = []
    for name, s in manifest["scenarios"].items():
        results, note = run_scenario(jax, jnp, nn, _compute_stats, s, data[name], not args.exact_variance)
        if note:
            notes.append(f"{name}: {note}")
        for r, arrays in enumerate(results):
            write(args.out, name, r, arrays)
    print(f"jax {jax.__version__}, flax {flax.__version__} (pmap over {ranks} host devices): "
          f"{len(manifest['scenarios'])} scenarios written to {args.out}")
    for line in notes:
        print(f"warning: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
