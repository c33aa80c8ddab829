"""Shared by the JAX adapters (Haiku, Equinox, Flax NNX): host devices, shards, one pmap step.

One host device per rank (``XLA_FLAGS=--xla_force_host_platform_device_count=K``
set before jax is imported), rank r's shard on device r. ``jax.pmap`` needs
one shape on every device, so a library without a ``mask`` argument can run
only scenarios whose ranks hold equal shards when batch statistics are used
(padding would enter the statistics); in eval (moving statistics) shards
are padded with zeros, which nothing but their own rows see. Gradients are
``jax.vjp`` of each device's y with its dy: JAX transposes the ``pmean``,
so dx is the gradient of the sum of the ranks' losses and dgamma/dbeta
each rank's share, as in mpibn. Only NumPy and the standard library at
import time; jax is imported by ``start``.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load, uses_batch_statistics, write  # noqa: E402

#: A large EMA step counter: decay ** counter is 0 in float32 for every decay < 1, so a
#: zero-debiased moving average (Haiku, Equinox mode="batch") starts from the value set in it.
NO_DEBIAS_COUNTER = 1 << 30


def start(golden, extra):
    """Set the environment, import jax (``extra`` names the pip extra) and check devices.

    Returns (jax, jnp, manifest, data)."""
    manifest, data = load(golden)          # NumPy only: jax is not imported yet
    ranks = manifest["ranks"]
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={ranks}")
    if any(s["dtype"] == "float64" for s in manifest["scenarios"].values()):
        os.environ.setdefault("JAX_ENABLE_X64", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as exc:
        sys.exit(f"{extra}_adapter: {exc} (pip install 'mpibn[{extra}]')")
    if jax.local_device_count() < ranks:
        sys.exit(f"{extra}_adapter: {jax.local_device_count()} devices for {ranks} ranks; "
                 f"set XLA_FLAGS=--xla_force_host_platform_device_count={ranks} before starting")
    return jax, jnp, manifest, data


def groups(s):
    return sorted({tuple(g) for g in s["groups_of_rank"]})


def index_groups(s):
    """``axis_index_groups`` for the scenario's groups (None: one group of every rank)."""
    g = groups(s)
    return None if len(g) == 1 else [list(m) for m in g]


def equal_shards(ranks):
    return len({r["x"].shape[1] for r in ranks}) == 1


def why_unsupported(s, ranks, has_groups, has_mask):
    """None when the library can express scenario ``s``, else the reason (the column's note)."""
    training = uses_batch_statistics(s)
    g = groups(s)
    if len(g) > 1 and not has_groups:
        return "no process groups (axis_name is one named axis, no axis_index_groups)"
    if training and not has_mask and not equal_shards(ranks):
        return ("uneven shards: pmap needs one shape per device and the layer has no mask, so padding "
                "would enter the statistics")
    return None


def padded(ranks, key, step, dtype):
    """(P, n_max, ...) array of every rank's ``key`` at ``step``, zero-padded to the longest shard."""
    n_max = max(1, max(r["x"].shape[1] for r in ranks))
    out = np.zeros((len(ranks), n_max) + ranks[0][key].shape[2:], np.float32)
    for i, r in enumerate(ranks):
        out[i, :r[key].shape[1]] = r[key][step]
    return out.astype(dtype)


def row_mask(ranks):
    """(P, n_max, C, ...) boolean mask of the real (unpadded) rows, for libraries with ``mask``."""
    n_max = max(1, max(r["x"].shape[1] for r in ranks))
    tail = ranks[0]["x"].shape[2:]
    mask = np.zeros((len(ranks), n_max) + tail, bool)
    for i, r in enumerate(ranks):
        mask[i, :r["x"].shape[1]] = True
    return mask


def xdtype(jnp, s):
    return jnp.dtype(s["dtype"])


def collect(s, ranks, steps):
    """Per-rank output dicts from ``steps``: [(y, dx, dgamma, dbeta, mean, var, mm, mv)] per step,
    each a (P, ...) array; y and dx are cut to each rank's rows; every array keeps the dtype the
    library gave (verify judges it in that dtype), bfloat16 stored as float32."""
    out = [{k: [] for k in s["outputs"]} for _ in ranks]
    for y, dx, dg, db, mean, var, mm, mv in steps:
        for r, o in enumerate(out):
            n = ranks[r]["x"].shape[1]
            o["y"].append(storable(np.asarray(y[r, :n])))
            o["dx"].append(storable(np.asarray(dx[r, :n])))
            o["dgamma"].append(storable(np.asarray(dg[r])).reshape(-1))
            o["dbeta"].append(storable(np.asarray(db[r])).reshape(-1))
            if "batch_mean" in o:
                o["batch_mean"].append(storable(np.asarray(mean[r])).reshape(-1))
                o["batch_var"].append(storable(np.asarray(var[r])).reshape(-1))
            o["moving_mean"].append(storable(np.asarray(mm[r])).reshape(-1))
            o["moving_var"].append(storable(np.asarray(mv[r])).reshape(-1))
    return [{k: np.stack(v) for k, v in o.items()} for o in out]


def storable(a):
    """bfloat16 as float32 (exact; .npz cannot name it), float16/32 as they are."""
    return a.astype(np.float32) if a.dtype.kind == "V" or a.dtype.name == "bfloat16" else a


def parser(doc, paths):
    """The command line of an adapter that ``run_all`` drives: golden, out,
    --path (one of ``paths``, the first by default) and --scenarios; the
    caller may add its own options before parsing."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("golden")
    p.add_argument("out")
    p.add_argument("--path", choices=list(paths), default=paths[0])
    p.add_argument("--scenarios", help="comma-separated subset (default: all)")
    return p


def run_all(args, manifest, data, run_scenario, header):
    """Run every scenario, write the supported ones, print and record the unsupported ones."""
    skipped = {}
    names = args.scenarios.split(",") if getattr(args, "scenarios", None) else list(manifest["scenarios"])
    for name in names:
        s = dict(manifest["scenarios"][name], name=name)
        results = run_scenario(s, data[name])
        if isinstance(results, str):
            skipped[name] = results
            continue
        for r, arrays in enumerate(results):
            write(args.out, name, r, arrays)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "unsupported.json"), "w") as f:
        json.dump(skipped, f, indent=1)
    print(f"{header}: {len(names) - len(skipped)} of {len(names)} scenarios written to {args.out}")
    for name, why in skipped.items():
        print(f"unsupported: {name}: {why}")
    return 0
