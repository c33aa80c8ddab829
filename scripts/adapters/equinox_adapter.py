#!/usr/bin/env python3
"""Equinox on an mpibn golden set: ``eqx.nn.BatchNorm(axis_name=...)`` under ``vmap`` inside ``pmap``.

    python scripts/adapters/equinox_adapter.py GOLDEN OUT [--path batch|ema] [--scenarios a,b]
    python -m mpibn verify GOLDEN OUT --skip-missing

4 host devices, one per rank (``scripts/adapters/jax_common.py``).
Equinox layers take one example: the batch is a ``jax.vmap`` with
``axis_name="batch"`` inside ``jax.pmap(axis_name="ranks")``, and the layer
gets ``axis_name=("ranks", "batch")``, so its ``pmean`` runs over every
example of every device. Read in equinox 0.13.8 ``equinox/nn/_batch_norm.py``:
per channel ``mean = pmean(mean(example))``, ``var = pmean(mean((x -
mean)^2))`` clamped at 0 (two passes: accurate), momentum = weight of the
old value, biased moving variance; no ``mask`` and no
``axis_index_groups``, so only equal shards and one group can run.

``--path batch`` (the column): ``mode="batch"``: batch statistics in
training, a zero-debiased moving average for inference (counter and hidden
state; the adapter sets hidden to the golden ``moving_mean0``/``moving_var0``
and the counter to 2^30, so that ``1 - momentum^counter`` is 1), read back
as Equinox's inference reads it, ``hidden / (1 - momentum^counter)``.
``--path ema``: ``mode="ema"``: training normalises with the running
statistics *after* folding in the batch (and with the batch's own on the
first call): a documented convention, not batch norm's textbook training
statistics. (With jax 0.10.2 under ``jax.pmap`` this path raises a
ValueError in Equinox's state update; docs/conformance/equinox.md.) batch_mean/batch_var come from a second layer with momentum 0
in the same step (mode="batch": its hidden state is then the batch
statistic). Parameters and state are float32 (float64 for float64 input).

Needs jax and equinox (the ``equinox`` extra: ``pip install 'mpibn[equinox]'``).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax_common as J  # noqa: E402
from common import uses_batch_statistics  # noqa: E402


def run_scenario(jax, jnp, eqx, s, ranks, path):
    why = J.why_unsupported(s, ranks, has_groups=False, has_mask=False)
    if why:
        return why
    dtype = J.xdtype(jnp, s)
    pdtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    channels = ranks[0]["gamma"].shape[0]
    training = uses_batch_statistics(s)
    first, P = ranks[0], len(ranks)
    axes = ("ranks", "batch")
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        channels, axis_name=axes, eps=s["eps"], momentum=s["momentum"], dtype=pdtype, mode=path)
    probe, pstate = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        channels, axis_name=axes, eps=s["eps"], momentum=0.0, dtype=pdtype, mode="batch")
    bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn,
                     (jnp.asarray(first["gamma"], pdtype), jnp.asarray(first["beta"], pdtype)))
    m0, v0 = jnp.asarray(first["moving_mean0"], pdtype), jnp.asarray(first["moving_var0"], pdtype)
    if path == "batch":
        state = state.set(bn.batch_counter, jnp.array(J.NO_DEBIAS_COUNTER))
        state = state.set(bn.batch_state_index, (m0, v0))
    else:
        state = state.set(bn.ema_state_index, (m0, v0))
        first_time = state.get(bn.ema_first_time_index)           # True: "use the batch's, not these"
        state = state.set(bn.ema_first_time_index, jnp.logical_not(first_time))  # the golden values count
    rep = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * P), tree)   # noqa: E731
    state, pstate = rep(state), rep(pstate)

    params, static = eqx.partition(bn, eqx.is_inexact_array)

    def step(state, pstate, x, dy):
        def f(p, x):
            layer = eqx.combine(p, static)

            def one(xi):
                return layer(xi, state, inference=not training)
            y, new_state = jax.vmap(one, axis_name="batch", out_axes=(0, None))(x)
            return y, new_state
        y, vjp, new_state = jax.vjp(f, params, x, has_aux=True)
        g_layer, gx = vjp(dy.astype(y.dtype))
        stats = (jnp.zeros(channels), jnp.zeros(channels))
        if training:
            _, ps = jax.vmap(lambda xi: probe(jax.lax.stop_gradient(xi), pstate), axis_name="batch",
                             out_axes=(0, None))(x)
            stats = ps.get(probe.batch_state_index)
        return y, gx, g_layer.weight, g_layer.bias, stats[0], stats[1], new_state

    pstep = jax.pmap(step, axis_name="ranks")
    steps = []
    for t in range(2):
        y, dx, dg, db, mean, var, state = pstep(state, pstate, J.padded(ranks, "x", t, dtype),
                                                J.padded(ranks, "dy", t, dtype))
        steps.append((y, dx, dg, db, mean, var) + moving(jnp, bn, state, path, s["momentum"]))
    return J.collect(s, ranks, steps)


def moving(jnp, bn, state, path, momentum):
    """The moving statistics as Equinox's inference reads them (per device)."""
    if path == "ema":
        return tuple(np.asarray(a) for a in state.get(bn.ema_state_index))
    counter = np.asarray(state.get(bn.batch_counter))
    hm, hv = (np.asarray(a) for a in state.get(bn.batch_state_index))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(counter == 0, 1, 1 - np.float64(momentum) ** counter.astype(np.float64))
        scale = scale.astype(hm.dtype)[:, None]
        return hm / scale, hv / scale


def main(argv=None):
    args = J.parser(__doc__, ["batch", "ema"]).parse_args(argv)
    jax, jnp, manifest, data = J.start(args.golden, "equinox")
    try:
        import equinox as eqx
    except ImportError as exc:
        sys.exit(f"equinox_adapter: {exc} (pip install 'mpibn[equinox]')")
    return J.run_all(args, manifest, data, lambda s, ranks: run_scenario(jax, jnp, eqx, s, ranks, args.path),
                     f"equinox {eqx.__version__} (jax {jax.__version__}, vmap in pmap over "
                     f"{manifest['ranks']} host devices, mode={args.path})")


if __name__ == "__main__":
    sys.exit(main())
