#!/usr/bin/env python3
"""Haiku on an mpibn golden set: ``hk.BatchNorm(cross_replica_axis=...)`` under ``jax.pmap``.

    python scripts/adapters/haiku_adapter.py GOLDEN OUT [--path PATH] [--scenarios a,b]
    python -m mpibn verify GOLDEN OUT --skip-missing

4 host devices, one per rank (``scripts/adapters/jax_common.py``); process
groups as ``cross_replica_axis_index_groups``; ``data_format="channels_first"``.
Read in dm-haiku 0.0.17 ``haiku/_src/batch_norm.py``: the statistics are
``pmean`` of each device's mean and mean of squares, ``var = E[x^2] -
E[x]^2`` in the input dtype with no clamp; the moving statistics are
``hk.ExponentialMovingAverage`` (``decay_rate`` = weight of the old value,
as MindSpore's momentum; zero-debiased, state starting at 0, biased
variance); scale and offset are created in the input dtype. Haiku has no
``mask``: with batch statistics only equal shards can run under pmap.

Mapping: the moving averages start at the golden ``moving_mean0`` /
``moving_var0`` by setting their state (hidden = average = the value,
counter 2^30 so that the zero-debias divisor ``1 - decay^counter`` is 1);
``is_training`` = the scenario's use of batch statistics (``eval_batch_statistics``
updates the moving statistics, as MindSpore). batch_mean/batch_var come
from a second ``hk.BatchNorm`` with ``decay_rate=0`` on the same input in
the same step (its average is then the batch statistic Haiku computed).
float16/bfloat16 scenarios with float32 parameters (``*_params32``) run
under Haiku's mixed-precision policy for BatchNorm
(``hk.mixed_precision.set_policy(hk.BatchNorm, jmp.get_policy("params=float32,
compute=float32,output=<input dtype>"))``, the recipe of Haiku's docs).

``--path``: ``default`` (above); ``test_local_stats``: eval scenarios with
``use_batch_statistics`` run as ``is_training=False, test_local_stats=True``
(batch statistics, moving ones not updated: Haiku's documented meaning).

Needs jax and dm-haiku (the ``haiku`` extra: ``pip install 'mpibn[haiku]'``).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax_common as J  # noqa: E402
from common import uses_batch_statistics  # noqa: E402


def build(hk, jmp, s, ig, dtype, path, init=False):
    """The transformed function: y of the layer under test, plus the decay-0 probe's statistics.

    ``init``: the training version, whose init creates the moving averages'
    state (an eval-only init would not; Haiku users init in training)."""
    policy = None
    if s.get("param_dtype") == "float32" and dtype.itemsize == 2:
        policy = jmp.get_policy(f"params=float32,compute=float32,output={dtype.name}")
        hk.mixed_precision.set_policy(hk.BatchNorm, policy)
    training = uses_batch_statistics(s) or init
    local = path == "test_local_stats" and not s["training"] and training and not init

    def f(x):
        kw = dict(create_scale=True, create_offset=True, eps=s["eps"], data_format="channels_first",
                  cross_replica_axis="ranks", cross_replica_axis_index_groups=ig)
        y = hk.BatchNorm(decay_rate=s["momentum"], name="bn", **kw)(
            x, is_training=training and not local, test_local_stats=local)
        if training:
            hk.BatchNorm(decay_rate=0.0, name="probe", **kw)(jax_stop(x), is_training=True)
        return y
    return hk.transform_with_state(f), policy


def jax_stop(x):
    import jax
    return jax.lax.stop_gradient(x)


def run_scenario(jax, jnp, hk, jmp, s, ranks, path):
    why = J.why_unsupported(s, ranks, has_groups=True, has_mask=False)
    if why:
        return why
    dtype = J.xdtype(jnp, s)
    ig = J.index_groups(s)
    model, _ = build(hk, jmp, s, ig, dtype, path)
    init, _ = build(hk, jmp, s, ig, dtype, path, init=True)
    P = len(ranks)
    x0 = J.padded(ranks, "x", 0, dtype)
    params, state = jax.pmap(lambda x: init.init(jax.random.PRNGKey(0), x), axis_name="ranks")(x0)
    params, state = jax.device_get(params), jax.device_get(state)
    shape = params["bn"]["scale"].shape[1:]
    pdt = params["bn"]["scale"].dtype
    first = ranks[0]
    params["bn"]["scale"] = np.broadcast_to(first["gamma"].reshape(shape), (P,) + shape).astype(pdt)
    params["bn"]["offset"] = np.broadcast_to(first["beta"].reshape(shape), (P,) + shape).astype(pdt)
    for key, init in (("bn/~/mean_ema", "moving_mean0"), ("bn/~/var_ema", "moving_var0")):
        st = state[key]
        value = np.broadcast_to(first[init].reshape(st["hidden"].shape[1:]), st["hidden"].shape)
        st["hidden"] = value.astype(st["hidden"].dtype)
        st["average"] = value.astype(st["average"].dtype)
        st["counter"] = np.full_like(st["counter"], J.NO_DEBIAS_COUNTER)

    def step(params, state, x, dy):
        def f(p, x):
            y, new_state = model.apply(p, state, None, x)
            return y, new_state
        y, vjp, new_state = jax.vjp(f, params, x, has_aux=True)
        gp, gx = vjp(dy.astype(y.dtype))
        return y, gx, gp, new_state

    pstep = jax.pmap(step, axis_name="ranks")
    steps = []
    training = uses_batch_statistics(s)
    for t in range(2):
        y, dx, gp, state = pstep(params, state, J.padded(ranks, "x", t, dtype), J.padded(ranks, "dy", t, dtype))
        state = jax.device_get(state)
        probe = (state["probe/~/mean_ema"]["average"], state["probe/~/var_ema"]["average"]) if training \
            else (None, None)
        steps.append((y, dx, gp["bn"]["scale"], gp["bn"]["offset"], probe[0], probe[1],
                      state["bn/~/mean_ema"]["average"], state["bn/~/var_ema"]["average"]))
    return J.collect(s, ranks, steps)


def main(argv=None):
    args = J.parser(__doc__, ["default", "test_local_stats"]).parse_args(argv)
    jax, jnp, manifest, data = J.start(args.golden, "haiku")
    try:
        import haiku as hk
        import jmp
    except ImportError as exc:
        sys.exit(f"haiku_adapter: {exc} (pip install 'mpibn[haiku]')")

    def one(s, ranks):
        hk.mixed_precision.clear_policy(hk.BatchNorm)
        return run_scenario(jax, jnp, hk, jmp, s, ranks, args.path)
    return J.run_all(args, manifest, data, one,
                     f"haiku {hk.__version__} (jax {jax.__version__}, pmap over {manifest['ranks']} host "
                     f"devices, path {args.path})")


if __name__ == "__main__":
    sys.exit(main())
