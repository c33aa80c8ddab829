"""Property tests (hypothesis): sharded == concatenated, whatever the split.

Random channel counts, spatial sizes, dtypes, offsets and scales (|mean|
up to 1e4 times the std), shard sizes with empty shards, and process
groups. The reference is an independent float64 two-pass computation on
the group's *concatenated* batch in one process.

* serial: the shards are simulated with the math room (batch_norm_stats per
  shard, merge_stats, per-shard backward sums added), and the layer runs on
  COMM_SELF with the concatenated batch;
* under mpiexec: every rank runs the layer on its own shard with random
  process_groups. All ranks must draw the same examples, so the settings
  are derandomized, with no database, no health checks (timing-dependent,
  so rank-dependent), no deadline and no shrinking (time-capped); each
  example gathers every rank's verdict before asserting, so all ranks pass
  or fail the same example together.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn import functional as F
from mpibn.comm import group_of

DTYPES = [np.float16, np.float32, np.float64]
#: bound on |got - want| / (1 + |want|), per output dtype (a couple of ulps; float64
#: is limited by the conditioning |offset| / scale <= 1e7 of the data, not by rounding)
RTOL = {np.float16: 2e-3, np.float32: 3e-7, np.float64: 1e-8}
EPS, MOMENTUM = 1e-5, 0.9

COMMON = dict(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def batches(draw, n_shards):
    """(dtype, C, spatial, sizes, offset, scale, seed) with a total of at least 2 per group."""
    dtype = draw(st.sampled_from(DTYPES))
    channels = draw(st.integers(1, 4))
    spatial = draw(st.sampled_from([(), (1, 1), (2, 3)]))
    sizes = draw(st.lists(st.integers(0, 4), min_size=n_shards, max_size=n_shards))
    offset = draw(st.sampled_from([0.0, 1.0, -3.0, 1e3, -1e4]))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 50.0]))
    seed = draw(st.integers(0, 2**16))
    return dtype, channels, spatial, sizes, offset, scale, seed


def make_data(dtype, channels, spatial, sizes, offset, scale, seed):
    """Per-shard x and dy (dy random, never all ones), gamma, beta: same on every rank."""
    rng = np.random.default_rng(seed)
    xs = [(offset + scale * rng.normal(size=(n, channels) + spatial)).astype(dtype) for n in sizes]
    dys = [rng.normal(size=(n, channels) + spatial).astype(dtype) for n in sizes]
    gamma = rng.uniform(0.5, 2.0, channels)
    beta = rng.normal(size=channels)
    return xs, dys, gamma, beta


def reference(x, dy, gamma, beta):
    """Independent float64 batch norm of the concatenated batch (N, C, ...)."""
    axes = (0,) + tuple(range(2, x.ndim))
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)          # two-pass, biased
    inv_std = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    y = gamma.reshape(shape) * xhat + beta.reshape(shape)
    mdy, mdyx = dy.mean(axis=axes), (dy * xhat).mean(axis=axes)
    dx = (gamma * inv_std).reshape(shape) * (dy - mdy.reshape(shape) - xhat * mdyx.reshape(shape))
    return {"y": y, "dx": dx, "mean": mean, "unbiased": var * n / (n - 1), "inv_std": inv_std}


def mismatch(name, got, want, dtype, scale=None):
    """A sentence when got != want beyond RTOL[dtype] (scaled), else None."""
    got = np.asarray(got, np.float64)
    scale = 1.0 + np.abs(want) if scale is None else scale
    if got.shape != want.shape:
        return f"{name}: shape {got.shape} != {want.shape}"
    err = np.max(np.abs(got - want) / scale, initial=0.0)
    return None if err <= RTOL[dtype] else f"{name}: error {err:.3g} > {RTOL[dtype]:.1g}"


def dx_scale(ref, dy, gamma):
    shape = (1, -1) + (1,) * (dy.ndim - 2)
    return (gamma * ref["inv_std"]).reshape(shape) * (1.0 + np.abs(dy.astype(np.float64)).max(initial=0.0))


def moving(ref, channels):
    """Moving statistics after one step from the initial zeros and ones."""
    return MOMENTUM * np.zeros(channels) + (1 - MOMENTUM) * ref["mean"], \
        MOMENTUM * np.ones(channels) + (1 - MOMENTUM) * ref["unbiased"]


# -- serial: the split simulated in one process -----------------------------------------


@settings(max_examples=60, **COMMON)
@given(st.integers(1, 5).flatmap(batches))
def test_simulated_shards_match_concatenated_batch(example):
    dtype, channels, spatial, sizes, offset, scale, seed = example
    if sum(sizes) < 2:
        sizes = sizes[:-1] + [2]
    xs, dys, gamma, beta = make_data(dtype, channels, spatial, sizes, offset, scale, seed)
    x, dy = np.concatenate(xs), np.concatenate(dys)
    ref = reference(x, dy, gamma, beta)

    # the math room, shard by shard, as the ranks of a group would do it
    stats = [F.batch_norm_stats(F.as_ncl(s)) for s in xs]
    total, mean, m2 = F.merge_stats(np.array([s[0] for s in stats], float),
                                    np.array([s[1] for s in stats]), np.array([s[2] for s in stats]))
    inv_std = F.inv_std_from_var(m2 / total, EPS)
    ys = [F.batch_norm_elemt(F.as_ncl(s), mean, inv_std, gamma, beta).reshape(s.shape) for s in xs]
    xhats = [(F.as_ncl(s) - mean[:, None]) * inv_std[:, None] for s in xs]
    sums = sum(np.array(F.batch_norm_backward_reduce(F.as_ncl(d), h)) for d, h in zip(dys, xhats))
    dxs = [F.batch_norm_backward_elemt(F.as_ncl(d), h, gamma, inv_std, sums[0] / total, sums[1] / total,
                                       out_dtype=dtype).reshape(d.shape) for d, h in zip(dys, xhats)]

    # the layer on COMM_SELF with the concatenated batch
    with SyncBatchNorm(channels, gamma_init=gamma, beta_init=beta, dtype=np.float64, comm=MPI.COMM_SELF) as bn:
        bn.set_train()
        y_layer = bn(x)
        dx_layer = bn.backward(dy)
        mm, mv = bn.moving_mean.data, bn.moving_variance.data

    want_mm, want_mv = moving(ref, channels)
    problems = [
        mismatch("mean", mean, ref["mean"], np.float64, scale=1.0 + np.abs(ref["mean"])),
        mismatch("var", m2 / total, ref["unbiased"] * (total - 1) / total, np.float64,
                 scale=ref["unbiased"] + scale ** 2 * 1e-6 + 1e-300),
        mismatch("y shards", np.concatenate(ys), ref["y"], dtype),
        mismatch("dx shards", np.concatenate(dxs), ref["dx"], dtype, dx_scale(ref, dy, gamma)),
        mismatch("y layer", y_layer, ref["y"], dtype),
        mismatch("dx layer", dx_layer, ref["dx"], dtype, dx_scale(ref, dy, gamma)),
        mismatch("moving mean", mm, want_mm, np.float64),
        mismatch("moving var", mv, want_mv, np.float64),
    ]
    assert y_layer.dtype == dtype and dx_layer.dtype == dtype and all(y.dtype == dtype for y in ys)
    assert [p for p in problems if p] == []
    if len(sizes) > 1 and np.count_nonzero(sizes) > 1 and scale >= 0.1:
        # negative control: a single shard's own statistics are not the group's
        local_mean = F.batch_norm_stats(F.as_ncl(xs[int(np.argmax(sizes))]))[1]
        assert not np.allclose(local_mean, ref["mean"], rtol=1e-9, atol=0)


# -- under mpiexec: real ranks, random groups ------------------------------------------


@st.composite
def grouped_batches(draw, size):
    """A batch example plus a random process_groups over ``size`` ranks."""
    example = draw(batches(size))
    if draw(st.booleans()):
        groups = None
    else:
        order = draw(st.permutations(range(size)))
        cuts = draw(st.lists(st.booleans(), min_size=size - 1, max_size=size - 1))
        groups, block = [], [order[0]]
        for r, cut in zip(order[1:], cuts):
            if cut:
                groups.append(block)
                block = []
            block.append(r)
        groups.append(block)
        # a rank alone may also be left out of process_groups entirely
        groups = [g for g in groups if len(g) > 1 or draw(st.booleans())]
    return example, groups


def my_group(groups, rank, size):
    if groups is None:
        return list(range(size))
    return sorted(group_of(rank, groups))


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
@settings(max_examples=15, phases=[Phase.explicit, Phase.generate], **COMMON)
@given(grouped_batches(MPI.COMM_WORLD.Get_size()))
def test_ranks_match_their_groups_concatenated_batch(drawn):
    (dtype, channels, spatial, sizes, offset, scale, seed), groups = drawn
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    # every group needs 2 values per channel: top up the lowest rank of a short group
    for g in [my_group(groups, r, size) for r in range(size)]:
        if sum(sizes[r] for r in g) < 2:
            sizes[g[0]] += 2
    xs, dys, gamma, beta = make_data(dtype, channels, spatial, sizes, offset, scale, seed)
    group = my_group(groups, rank, size)
    ref = reference(np.concatenate([xs[r] for r in group]), np.concatenate([dys[r] for r in group]), gamma, beta)
    start = sum(sizes[r] for r in group if r < rank)
    mine = slice(start, start + sizes[rank])

    problems = []
    try:
        with SyncBatchNorm(channels, gamma_init=gamma, beta_init=beta, dtype=np.float64,
                           process_groups=groups, comm=comm) as bn:
            bn.set_train()
            y = bn(xs[rank])
            dx = bn.backward(dys[rank])
            want_mm, want_mv = moving(ref, channels)
            problems += [
                mismatch("y", y, ref["y"][mine], dtype),
                mismatch("dx", dx, ref["dx"][mine], dtype, dx_scale(ref, np.concatenate([dys[r] for r in group]),
                                                                    gamma)),
                mismatch("moving mean", bn.moving_mean.data, want_mm, np.float64),
                mismatch("moving var", bn.moving_variance.data, want_mv, np.float64),
                None if y.dtype == dx.dtype == dtype else f"dtypes {y.dtype}, {dx.dtype}",
            ]
    except Exception as exc:        # noqa: BLE001 - every rank's verdict is gathered below
        problems.append(f"{type(exc).__name__}: {exc}")
    verdicts = comm.allgather([p for p in problems if p])
    assert verdicts == [[]] * size, f"groups={groups} sizes={sizes}: {verdicts}"
