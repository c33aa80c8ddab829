"""Example: how a JAX (or TensorFlow) test suite checks its synchronised batch norm with mpibn.

    pip install mpibn            # no MPI needed: mpibn.testing runs in one process
    pytest scripts/example_reference_test.py

The suite under test here is a small synchronised batch norm written with
``jax.pmap`` and ``lax.psum`` over host devices (one device per rank).
Without JAX (or with ``MPIBN_EXAMPLE_BACKEND=numpy``) the same algorithm
runs on a NumPy per-rank backend whose "psum" adds over the list of ranks,
so this file runs in mpibn's own test suite too. A TensorFlow suite does
the same with ``MirroredStrategy`` replicas in place of pmap devices.

What the test does, whatever the backend: give every rank its shard
(uneven, one empty), compute one training step on the backend, compute the
same step with ``mpibn.testing.reference``, and ``assert_matches`` (mpibn
verify's rule: 32 eps of the dtype the backend was asked to compute in,
here the inputs' float32, normwise over ranks; every quantity on every rank).
"""
import importlib.util
import os

import numpy as np
import pytest

from mpibn.testing import assert_matches, reference

RANKS = 4
BACKEND = os.environ.get("MPIBN_EXAMPLE_BACKEND", "").strip() or (
    "jax" if importlib.util.find_spec("jax") else "numpy")
if BACKEND not in ("jax", "numpy"):
    raise ValueError(f"MPIBN_EXAMPLE_BACKEND must be 'jax' or 'numpy' (or unset: jax when installed), "
                     f"got {os.environ['MPIBN_EXAMPLE_BACKEND']!r}")
if BACKEND == "jax":
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={RANKS}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def numpy_sync_bn(xs, dys, gamma, beta, mm, mv, eps, momentum):
    """The backend's algorithm on NumPy: float32 math, sums over ranks as a psum would give."""
    f32 = np.float32
    axes = lambda a: (0,) + tuple(range(2, a.ndim))                      # noqa: E731
    psum = lambda parts: np.sum(np.stack(parts), axis=0, dtype=f32)      # noqa: E731
    count = f32(sum(x.size // x.shape[1] for x in xs))
    mean = psum([x.sum(axis=axes(x), dtype=f32) for x in xs]) / count
    bc = lambda v, a: v.reshape((1, -1) + (1,) * (a.ndim - 2))           # noqa: E731
    var = psum([((x - bc(mean, x)) ** 2).sum(axis=axes(x), dtype=f32) for x in xs]) / count
    inv = f32(1) / np.sqrt(var + f32(eps))
    xh = [(x - bc(mean, x)) * bc(inv, x) for x in xs]
    mdy = psum([d.sum(axis=axes(d), dtype=f32) for d in dys]) / count
    mdyx = psum([(d * h).sum(axis=axes(d), dtype=f32) for d, h in zip(dys, xh)]) / count
    out = []
    for x, d, h in zip(xs, dys, xh):
        out.append({
            "y": bc(gamma, x) * h + bc(beta, x),
            "dx": bc(gamma * inv, x) * (d - bc(mdy, x) - h * bc(mdyx, x)),
            "dgamma": (d * h).sum(axis=axes(x), dtype=f32), "dbeta": d.sum(axis=axes(x), dtype=f32),
            "batch_mean": mean, "batch_var": var,
            "moving_mean": f32(momentum) * mm + f32(1 - momentum) * mean,
            "moving_var": f32(momentum) * mv + f32(1 - momentum) * var * count / (count - 1)})
    return out


def jax_sync_bn(xs, dys, gamma, beta, mm, mv, eps, momentum):
    """The same algorithm under jax.pmap: shards padded to one shape and masked; psum over devices."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    n_max = max(1, max(len(x) for x in xs))
    pad = lambda arrs: np.stack([np.concatenate([a, np.zeros((n_max - len(a),) + a.shape[1:], a.dtype)])
                                 for a in arrs])                                      # noqa: E731
    mask = pad([np.ones(x.shape, np.float32) for x in xs])
    ax = (0,) + tuple(range(2, xs[0].ndim))

    def bn(x, m, g, b):
        bc = lambda v: v.reshape((1, -1) + (1,) * (x.ndim - 2))                        # noqa: E731
        count = lax.psum(m.sum(axis=ax), "r")
        mean = lax.psum((x * m).sum(axis=ax), "r") / count
        var = lax.psum((((x - bc(mean)) * m) ** 2).sum(axis=ax), "r") / count
        return bc(g) * (x - bc(mean)) / jnp.sqrt(bc(var) + eps) + bc(b), (mean, var, count)

    def step(x, dy, m):
        y, vjp, stats = jax.vjp(lambda x, g, b: bn(x, m, g, b), x, jnp.asarray(gamma), jnp.asarray(beta),
                                has_aux=True)
        dx, dg, db = vjp(dy * m)
        return y, dx, dg, db, stats

    y, dx, dg, db, (mean, var, count) = jax.pmap(step, axis_name="r")(pad(xs), pad(dys), mask)
    out = []
    for r, x in enumerate(xs):
        c = float(count[r][0])
        out.append({"y": np.asarray(y[r, :len(x)]), "dx": np.asarray(dx[r, :len(x)]),
                    "dgamma": np.asarray(dg[r]), "dbeta": np.asarray(db[r]),
                    "batch_mean": np.asarray(mean[r]), "batch_var": np.asarray(var[r]),
                    "moving_mean": np.float32(momentum) * mm + np.float32(1 - momentum) * np.asarray(mean[r]),
                    "moving_var": np.float32(momentum) * mv
                    + np.float32(1 - momentum) * np.asarray(var[r]) * np.float32(c / (c - 1))})
    return out


BACKENDS = {"numpy": numpy_sync_bn, "jax": jax_sync_bn}


@pytest.mark.parametrize("sizes", [[3, 3, 3, 3], [1, 0, 5, 2]], ids=["even", "uneven_with_empty"])
def test_sync_batch_norm_matches_mpibn(sizes):
    rng = np.random.default_rng(0)
    c = 3
    xs = [(4 + 2 * rng.standard_normal((n, c, 2, 2))).astype(np.float32) for n in sizes]
    dys = [rng.standard_normal((n, c, 2, 2)).astype(np.float32) for n in sizes]
    gamma, beta = np.float32([0.5, 1.0, 1.5]), np.float32([0.1, 0.0, -0.2])
    mm, mv = np.zeros(c, np.float32), np.ones(c, np.float32)

    actual = BACKENDS[BACKEND](xs, dys, gamma, beta, mm, mv, eps=1e-5, momentum=0.9)
    expected = reference(xs, dys, gamma=gamma, beta=beta, moving_mean=mm, moving_var=mv,
                         eps=1e-5, momentum=0.9)
    assert_matches(actual, expected)


def test_a_wrong_backend_is_caught():
    # The check has teeth: averaging per-rank means (a common bug with uneven shards) fails it.
    rng = np.random.default_rng(1)
    xs = [(4 + 2 * rng.standard_normal((n, 2))).astype(np.float32) for n in (1, 6)]
    wrong = [{"batch_mean": np.mean([x.mean(axis=0) for x in xs], axis=0)} for _ in xs]
    with pytest.raises(AssertionError, match="batch_mean"):
        assert_matches(wrong, reference(xs), quantities=["batch_mean"])     # only what it computes
