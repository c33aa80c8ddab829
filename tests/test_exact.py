"""exact=True: exact sums, correctly rounded statistics, partition invariance.

The oracle is fractions.Fraction on the float64 values of the inputs. The
serial tests simulate P ranks with threads (tests/simulated.py) whose fake
Allreduce adds the buffers in a random order per rank and per call; the MPI
tests at the end split one global batch across the real ranks in several
ways and compare bytes with a one-process run.
"""
from fractions import Fraction

import numpy as np
import pytest
from mpi4py import MPI

from mpibn import exact as E
from mpibn import SyncBatchNorm
from mpibn.sync import sync_batch_norm, sync_batch_norm_backward
from mpibn.comm import group_of, make_exchange
from conftest import shard_slices
from oracle import as_float, fraction_stats
from simulated import run_group

WORLD = MPI.COMM_WORLD


def adversarial(name, n=40, seed=0):
    """(n, 3) float64 batches that defeat float arithmetic in different ways."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    if name == "offset_1e8":
        return 1e8 + 1e-3 * z
    if name == "tiny_std":                       # neighbours of 1: std ~ 1e-15
        return 1.0 + np.spacing(1.0) * rng.integers(-4, 5, (n, 3))
    if name == "constant":
        return np.full((n, 3), 0.1) * [1.0, -3.0, 7e20]
    if name == "mixed":
        return z * 10.0 ** rng.integers(-300, 300, (n, 3))
    if name == "outlier":
        x = z.copy()
        x[n // 2] = [1e300, -1e150, 1e16]
        return x
    if name == "subnormal":
        return z * 5e-324 * 1000
    raise ValueError(name)


CASES = ["offset_1e8", "tiny_std", "constant", "mixed", "outlier", "subnormal"]


# -- exact sums and correct rounding (math only) -------------------------------------------

@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_sums_are_exact(case, grouped, monkeypatch):
    if not grouped:                       # force the np.unique numbering of exponent groups
        monkeypatch.setattr(E, "_MAX_BINS", 0)
    x = adversarial(case)
    w = np.random.default_rng(1).standard_normal(x.shape) * 1e-5
    lin, prod, special = E.exact_sums(x, w)
    _, sq, _ = E.exact_sums(x)
    assert not special.any()
    s1, s2, sxx = E.limbs_to_ints(lin), E.limbs_to_ints(prod), E.limbs_to_ints(sq)
    for c in range(3):
        xs, ws = [Fraction(float(v)) for v in x[:, c]], [Fraction(float(v)) for v in w[:, c]]
        assert E.as_fraction(s1[c]) == sum(xs)
        assert E.as_fraction(s2[c], E.PROD_BASE) == sum(a * b for a, b in zip(xs, ws))
        assert E.as_fraction(sxx[c], E.PROD_BASE) == sum(a * a for a in xs)


def test_limbs_stay_below_2_to_the_32_after_normalising():
    x = adversarial("mixed", n=3000)
    lin, prod, _ = E.exact_sums(-np.abs(x))
    for limbs in (lin, prod):
        assert (limbs[:, :-1] >= 0).all() and (limbs[:, :-1] < 2 ** 32).all()
        assert (np.abs(limbs[:, -1]) < 2 ** 20).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_statistics_are_correctly_rounded(case, dtype):
    big = np.finfo(dtype).max                 # keep casts of huge values finite
    x = np.clip(adversarial(case), -big, big).astype(dtype)
    lin, prod, special = E.exact_sums(x)
    mean, var, unbiased = E.exact_stats(x.shape[0], lin, prod, special)
    for c in range(3):
        em, ev, eu = fraction_stats(x[:, c])
        assert mean[c] == as_float(em), (c, mean[c], as_float(em))
        assert var[c] == as_float(ev) and unbiased[c] == as_float(eu), (c, var[c], as_float(ev))


def test_oracle_cases_are_hard_for_float_arithmetic():
    # Negative control: two-pass float64 statistics miss the correctly rounded
    # variance on these inputs, so the equalities above test something.
    misses = 0
    for case in ["offset_1e8", "tiny_std", "outlier"]:
        x = adversarial(case)
        with np.errstate(over="ignore"):
            var = ((x - x.mean(axis=0)) ** 2).mean(axis=0)
        misses += sum(var[c] != as_float(fraction_stats(x[:, c])[1]) for c in range(3))
    assert misses >= 3


def test_nonfinite_values_follow_ieee():
    x = np.array([[1.0, np.inf, np.nan, np.inf], [2.0, 3.0, 1.0, -np.inf]])
    lin, prod, special = E.exact_sums(x)
    mean, var, _ = E.exact_stats(2, lin, prod, special)
    assert mean[0] == 1.5 and var[0] == 0.25
    assert mean[1] == np.inf and np.isnan(var[1])
    assert np.isnan(mean[2]) and np.isnan(mean[3]) and np.isnan(var[3])


# -- through sync_batch_norm on simulated ranks --------------------------------------------

def simulated_step(x, dy, sizes, exact, gamma, beta, seed=0, tree=False):
    """Forward + backward of one global batch split as ``sizes`` over len(sizes) threads."""
    slices = shard_slices(sizes)

    def rank_fn(group, rank):
        rm, rv = np.zeros(x.shape[1]), np.ones(x.shape[1])
        ex = make_exchange(group, x.shape[1], exact)
        # 'propagate': some cases' variance overflows float64 (values near 1e300),
        # which nonfinite='raise' refuses to store in the moving variance.
        y, saved = sync_batch_norm(x[slices[rank]], gamma, beta, group_comm=group, running_mean=rm,
                                   running_var=rv, momentum=0.7, exchange=ex, exact=exact,
                                   nonfinite="propagate")
        dx, dgamma, dbeta = sync_batch_norm_backward(dy[slices[rank]], saved)
        return y, dx, saved.mean, saved.var, rm, rv, dgamma, dbeta, group.allreduce_calls

    return run_group(len(sizes), rank_fn, seed=seed, tree=tree)


def concat(results, i):
    return np.concatenate([r[i] for r in results])


SPLITS = [[40], [20, 20], [1, 39], [13, 0, 27], [10, 10, 0, 20], [5, 9, 11, 15], [39, 1, 0, 0]]


@pytest.mark.parametrize("case", ["offset_1e8", "mixed", "outlier"])
def test_partition_invariance_bitwise(case):
    x = adversarial(case, seed=2).reshape(10, 3, 2, 2)[:, :, :, :]
    x = np.concatenate([x] * 4)                               # (40, 3, 2, 2)
    x[:, 2] = np.where(np.abs(x[:, 2]) > 1e100, 1.0, x[:, 2])  # keep y finite in one channel
    dy = np.random.default_rng(3).standard_normal(x.shape)
    gamma, beta = np.array([1.5, -0.5, 2.0]), np.array([0.25, 0.0, -1.0])
    runs = [simulated_step(x, dy, sizes, True, gamma, beta, seed=i, tree=i % 2 == 1)
            for i, sizes in enumerate(SPLITS)]
    ref = runs[0]
    for sizes, res in zip(SPLITS, runs):
        for i in (0, 1):                                     # y, dx of the whole batch
            assert concat(res, i).tobytes() == concat(ref, i).tobytes(), (sizes, i)
        for r in res:                                        # mean, var, moving stats
            for i in (2, 3, 4, 5):
                assert r[i].tobytes() == ref[0][i].tobytes(), (sizes, i)
            assert r[8] == (2 if len(sizes) > 1 else 0)      # one Allreduce per pass
        # Local dbeta: the correctly rounded sum of this rank's share.
        for sl, r in zip(shard_slices(sizes), res):
            for c in range(3):
                assert r[7][c] == as_float(sum(Fraction(float(v)) for v in dy[sl, c].ravel()))


def test_default_mode_is_not_partition_invariant():
    # Negative control: without exact=True the statistics of this batch do
    # depend on the split (in the last bits), so the test above can fail.
    x = adversarial("offset_1e8", n=40, seed=2)
    dy = np.random.default_rng(3).standard_normal(x.shape)
    gamma, beta = np.ones(3), np.zeros(3)
    means = {simulated_step(x, dy, sizes, False, gamma, beta)[0][2].tobytes() for sizes in SPLITS}
    assert len(means) > 1


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_exact_statistics_through_sync(dtype):
    x = adversarial("offset_1e8" if dtype == np.float64 else "tiny_std").astype(dtype)
    dy = np.random.default_rng(4).standard_normal(x.shape).astype(dtype)
    res = simulated_step(x, dy, [15, 0, 25], True, np.ones(3), np.zeros(3))
    for c in range(3):
        em, ev, eu = fraction_stats(x[:, c])
        for r in res:
            assert r[2][c] == float(em) and r[3][c] == float(ev)
            assert r[5][c] == 0.7 * 1.0 + (1 - 0.7) * float(eu)
    assert concat(res, 0).dtype == dtype and concat(res, 1).dtype == dtype


def test_exact_layer_serial_and_argument_check():
    with pytest.raises(TypeError, match="exact must be a bool"):
        SyncBatchNorm(3, exact=1, comm=MPI.COMM_SELF)
    x = adversarial("offset_1e8")
    dy = np.random.default_rng(5).standard_normal(x.shape)
    with SyncBatchNorm(3, dtype=np.float64, comm=MPI.COMM_SELF, exact=True) as bn:
        bn.set_train()
        bn(x)
        bn.backward(dy)
        for c in range(3):
            em, ev, _ = fraction_stats(x[:, c])
            assert bn.batch_mean[c] == float(em) and bn.batch_var[c] == float(ev)
        bn.set_train(False)
        y_eval = bn(x)
        dx_eval = bn.backward(dy)
    assert np.isfinite(y_eval).all() and np.isfinite(dx_eval).all()


def test_exact_nonfinite_raise_and_propagate():
    x = np.random.default_rng(6).standard_normal((8, 2))
    x[3, 1] = np.inf

    def fwd(nonfinite):
        def rank_fn(group, rank):
            sl = slice(0, 5) if rank == 0 else slice(5, 8)
            rm = np.zeros(2)
            y, saved = sync_batch_norm(x[sl], np.ones(2), np.zeros(2), group_comm=group, running_mean=rm,
                                       nonfinite=nonfinite, exact=True)
            return saved.mean, saved.var, rm
        return run_group(2, rank_fn)

    with pytest.raises(FloatingPointError, match="rank 0 channel 1"):
        fwd("raise")
    with np.errstate(invalid="ignore"):
        mean, var, rm = fwd("propagate")[1]
    assert mean[1] == np.inf and np.isnan(var[1]) and np.isfinite(mean[0]) and np.isfinite(var[0])


def test_exact_agreed_errors_on_every_rank():
    # A bad input on one rank still joins the exact-mode collective, and
    # every rank raises the same exception, forward and backward.
    x = np.random.default_rng(9).standard_normal((6, 2))

    def rank_fn(group, rank):
        ex = make_exchange(group, 2, True)
        caught = []
        try:
            sync_batch_norm(x[:3] if rank == 0 else x[3:, :1], np.ones(2), np.zeros(2), group_comm=group,
                            exchange=ex, exact=True)
        except ValueError as exc:
            caught.append(str(exc))
        y, saved = sync_batch_norm(x[3 * rank:3 * rank + 3], np.ones(2), np.zeros(2), group_comm=group,
                                   exchange=ex, exact=True, tag=(0, 1))
        try:
            sync_batch_norm_backward(x[:2] if rank == 1 else x[:3], saved)
        except ValueError as exc:
            caught.append(str(exc))
        return caught, group.allreduce_calls

    for caught, calls in run_group(2, rank_fn):
        assert len(caught) == 2 and calls == 3
        assert "rank 1: x has 1 channels" in caught[0] and "rank 1: dy has shape (2, 2)" in caught[1]


# -- under mpiexec: real ranks, several splits and groups ----------------------------------

def world_splits(size):
    n = 4 * size + 3
    uneven = [2 * r + 1 for r in range(size - 1)]
    return n, [[n // size + (r < n % size) for r in range(size)],       # even-ish
               uneven + [n - sum(uneven)],
               [0] * (size - 1) + [n]]                                  # all on the last rank


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("groups", [None, "pairs", "outside"])
def test_partition_invariance_under_mpi(groups):
    size, rank = WORLD.Get_size(), WORLD.Get_rank()
    process_groups = {None: None, "pairs": [list(range(0, size, 2)), list(range(1, size, 2))],
                      "outside": [list(range(size - 1))] if size > 2 else None}[groups]
    members = group_of(rank, process_groups or [list(range(size))])
    n, splits = world_splits(len(members))
    rng = np.random.default_rng(7)
    x = 1e6 + rng.standard_normal((n, 3, 2, 2)) * [[[1e-3]], [[1.0]], [[1e3]]]
    x[0, 2, 0, 0] = 1e12                                    # an outlier
    dy = rng.standard_normal(x.shape)
    results = []
    for sizes in splits:
        sl = shard_slices(sizes)[members.index(rank)]
        bn = SyncBatchNorm(3, momentum=0.8, dtype=np.float64, process_groups=process_groups,
                           exact=True, gamma_init=np.array([1.0, 2.0, 0.5])).set_train()
        outs = []
        for _ in range(2):
            y = bn(x[sl])
            outs.append((y, bn.backward(dy[sl])))
        calls = bn.group_comm.allreduce_calls
        stats = np.concatenate([bn.batch_mean, bn.batch_var, bn.moving_mean.data, bn.moving_variance.data])
        bn.close()
        gathered = WORLD.allgather((rank, [o[0].tobytes() + o[1].tobytes() for o in outs], stats.tobytes()))
        results.append((gathered, calls))
    # One process, the group's whole batch: the reference bytes.
    with SyncBatchNorm(3, momentum=0.8, dtype=np.float64, comm=MPI.COMM_SELF, exact=True,
                       gamma_init=np.array([1.0, 2.0, 0.5])) as ref:
        ref.set_train()
        ref_out = [(ref(x), ref.backward(dy)) for _ in range(2)]
        ref_stats = np.concatenate([ref.batch_mean, ref.batch_var, ref.moving_mean.data,
                                    ref.moving_variance.data]).tobytes()

    for sizes, (gathered, calls) in zip(splits, results):
        by_rank = {r: (outs, stats) for r, outs, stats in gathered}
        assert calls == (4 if len(members) > 1 else 0)
        for step in range(2):
            y = np.concatenate([np.frombuffer(by_rank[m][0][step], np.float64)[:s * 12].reshape(s, 3, 2, 2)
                                for m, s in zip(members, sizes)])
            dx = np.concatenate([np.frombuffer(by_rank[m][0][step], np.float64)[s * 12:].reshape(s, 3, 2, 2)
                                 for m, s in zip(members, sizes)])
            assert y.tobytes() == ref_out[step][0].tobytes(), (sizes, step)
            assert dx.tobytes() == ref_out[step][1].tobytes(), (sizes, step)
        for m in members:
            assert by_rank[m][1] == ref_stats, (sizes, m)


@pytest.mark.mpi(min_size=2)
def test_exact_and_default_layers_share_one_group_buffer():
    # Both layers use the group's one buffer (the exact one widens it with
    # the summed region); alternating them must not mix their data.
    size, rank = WORLD.Get_size(), WORLD.Get_rank()
    rng = np.random.default_rng(8)
    x = 1e4 + rng.standard_normal((3 * size, 2, 3, 1))
    dy = rng.standard_normal(x.shape)
    sl = slice(3 * rank, 3 * rank + 3)
    plain = SyncBatchNorm(2, dtype=np.float64).set_train()
    exact = SyncBatchNorm(2, dtype=np.float64, exact=True).set_train()
    outs = []
    for bn in (plain, exact, plain, exact):
        y = bn(x[sl])
        outs.append((y, bn.backward(dy[sl]), bn.batch_mean.copy()))
    calls = plain.group_comm.allreduce_calls
    plain.close()
    exact.close()
    for i, (y, dx, mean) in enumerate(outs):
        with SyncBatchNorm(2, dtype=np.float64, comm=MPI.COMM_SELF, exact=i % 2 == 1) as ref:
            ref.set_train()
            y_ref = ref(x)
            dx_ref = ref.backward(dy)
        if i % 2:
            assert y.tobytes() == y_ref[sl].tobytes() and dx.tobytes() == dx_ref[sl].tobytes()
            assert mean.tobytes() == ref.batch_mean.tobytes()
        else:
            np.testing.assert_allclose(y, y_ref[sl], rtol=0, atol=1e-9)
            np.testing.assert_allclose(dx, dx_ref[sl], rtol=0, atol=1e-9)
    assert calls == 8
