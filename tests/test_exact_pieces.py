"""exact=True from fixed-point pieces: exact sums, certified rounding, its fallbacks.

The oracle is fractions.Fraction on the values of the inputs. Each test
states what it would catch: the fast paths (pieces summed in exact
chunks, the certified double-double finish) are checked against it on
data chosen to hit their edges (exact ties, many binades, subnormals),
and their fallbacks are forced on purpose and must give the same bytes.
"""
import os
import platform
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpibn import exact as E
from mpibn import exact_pieces as EP
from mpibn import exact_round as ER
from mpibn.sync import sync_batch_norm, sync_batch_norm_backward
from mpibn.comm import make_exchange
from conftest import shard_slices
from oracle import as_float, fraction_stats
from simulated import run_group


def frac_sum(values, weights=None):
    xs = [Fraction(float(v)) for v in np.ravel(values)]
    if weights is None:
        return sum(xs, Fraction(0))
    return sum((a * Fraction(float(b)) for a, b in zip(xs, np.ravel(weights))), Fraction(0))


def is_midpoint(fraction):
    """True when ``fraction`` lies exactly halfway between two float64 neighbours."""
    f = float(fraction)
    if Fraction(f) == fraction:
        return False
    other = np.nextafter(f, np.inf if Fraction(f) < fraction else -np.inf)
    return (Fraction(f) + Fraction(float(other))) / 2 == fraction


def log_uniform(rng, shape, low=-30, high=30):
    """Random signs, magnitudes log-uniform over 2^low .. 2^high (many binades)."""
    return rng.choice([-1.0, 1.0], shape) * 2.0 ** rng.uniform(low, high, shape)


def ncl_columns(a):
    a3 = a if a.ndim == 3 else a[:, :, None]
    return [a3[:, c, :] for c in range(a3.shape[1])]


def check_stats(x, count=None):
    """exact_stats of x's exact sums against Fraction, channel by channel (bitwise)."""
    lin, prod, special = E.exact_sums(x, balanced=True)
    mean, var, unbiased = E.exact_stats(count or x.size // x.shape[1], lin, prod, special)
    for c, col in enumerate(ncl_columns(x)):
        em, ev, eu = fraction_stats(col)
        assert (mean[c], var[c], unbiased[c]) == (as_float(em), as_float(ev), as_float(eu)), c


def check_backward(dy, x, mean, inv_std):
    """backward_means against Fraction: T1/N and inv_std * sum dy (x - mean) / N, rounded once."""
    lin, prod, special = E.exact_sums(dy, x, balanced=True)
    n = x.size // x.shape[1]
    mdy, mdx = E.backward_means([n] * x.shape[1], lin, prod, mean, inv_std, special)
    for c, (d, v) in enumerate(zip(ncl_columns(dy), ncl_columns(x))):
        centred = frac_sum(d, v) - Fraction(float(mean[c])) * frac_sum(d)
        assert mdy[c] == as_float(frac_sum(d) / n), c
        assert mdx[c] == as_float(Fraction(float(inv_std[c])) * centred / n), c


# -- exact sums: every block plan, dtype and path ----------------------------------------

# One block; several channels per block with short, cut and long rows; one channel
# per block (a channel fills a block, a prime row length that cannot be cut,
# a row longer than a block).
SHAPES = [(7, 3), (300, 5), (40, 5, 9), (3, 2, 700), (2, 2, 40000), (300, 4, 50), (5, 300, 3),
          (300, 2, 500), (2, 2, 1031), (1, 1, 140000)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_piece_sums_are_exact(shape, dtype):
    # Every block plan and both backward paths (exact float16/32 products,
    # pieces of float64 dy times pieces of x): the limbs equal those of the
    # general integer method (itself checked against Fraction in
    # test_exact.py), and Fraction's sums on the small shapes.
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    x3, dy3 = (a if a.ndim == 3 else a[:, :, None] for a in (x, dy))
    assert not EP.piece_sums(x3)[2].any() and not EP.piece_sums(dy3, x3)[2].any()   # all fast
    channels_last = (lambda a: a.transpose(0, 2, 1).reshape(-1, a.shape[1]))
    for got, want in ((E.exact_sums(x), E._general_sums(channels_last(x3))),
                      (E.exact_sums(dy, x), E._general_sums(channels_last(dy3), channels_last(x3)))):
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    if x.size > 5000:
        return
    lin, prod, _ = E.exact_sums(x)
    t_lin, t_prod, _ = E.exact_sums(dy, x)
    s1, s2, t1, t2 = (E.limbs_to_ints(a) for a in (lin, prod, t_lin, t_prod))
    for c, (col, dcol) in enumerate(zip(ncl_columns(x), ncl_columns(dy))):
        assert E.as_fraction(s1[c]) == frac_sum(col)
        assert E.as_fraction(s2[c], E.PROD_BASE) == frac_sum(col, col)
        assert E.as_fraction(t1[c]) == frac_sum(dcol)
        assert E.as_fraction(t2[c], E.PROD_BASE) == frac_sum(dcol, col)


@pytest.mark.parametrize("shape", [(300, 5), (40, 5, 9), (3, 2, 700), (1, 1, 140000), (300, 2, 500)])
def test_piece_sums_without_numpy_vecdot(shape, monkeypatch):
    # np.vecdot is NumPy >= 2.0; setup.cfg allows 1.22 and the MindSpore
    # extra needs NumPy < 2, where exact mode raised AttributeError. Without
    # it the same exact sums come from einsum: the same limbs, bit for bit.
    if not hasattr(np, "vecdot"):
        pytest.skip("this NumPy has no np.vecdot: every exact-mode test here runs the fallback")
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 100.0).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    with_vecdot = [E.exact_sums(x), E.exact_sums(dy, x)]
    monkeypatch.delattr(np, "vecdot")
    without = [E.exact_sums(x), E.exact_sums(dy, x)]
    for got, want in zip(without, with_vecdot):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_balanced_limbs_are_sparse_and_bounded():
    # The form that travels: |limb| <= 2^31 + 1 whatever the sign, and a
    # negative sum as sparse as a positive one (normalised limbs would fill
    # every limb above it with 2^32 - 1), so the finish reads few limbs.
    x = -np.abs(np.random.default_rng(2).standard_normal((500, 3)))
    lin, prod, _ = E.exact_sums(x, balanced=True)
    assert (np.abs(lin) <= 2 ** 31 + 1).all() and (np.abs(prod) <= 2 ** 31 + 1).all()
    assert np.count_nonzero(lin.any(axis=0)) <= 4
    assert E.limbs_to_ints(lin) == E.limbs_to_ints(E.exact_sums(x)[0])


# -- correct rounding, exact ties ---------------------------------------------------------

def test_exact_ties_are_rounded_to_even():
    # Exact midpoints between two floats, built on purpose: the certificate
    # cannot separate them from their neighbours (no error bound can), so
    # they must reach the exact finish and round half to even.
    # Channel 0: mean of 2^16 float32 values = (2^24 + 2^-29) / 2^16, a 54-bit
    # numerator over a power of two (the float32 ties). Channel 1:
    # var = (2^27 - 1)^2 / 4 over two values, an odd 54-bit square.
    n = 1 << 16
    x = np.zeros((n, 2), np.float32)
    x[0, 0], x[1, 0] = 2.0 ** 24, 2.0 ** -29
    x[0, 1] = 2.0 ** 27 - 1
    mean, var, _ = fraction_stats(x[:, 0])
    assert is_midpoint(mean)
    assert is_midpoint(fraction_stats(np.array([0.0, 2.0 ** 27 - 1]))[1])
    lin, prod, special = E.exact_sums(x, balanced=True)
    q, ok = ER.round_all([(ER.Digits.from_limbs(lin, E.LIN_BASE), n, None)])
    assert not ok[0]                                        # the tie is not certified ...
    got = E.exact_stats(n, lin, prod, special)
    assert got[0][0] == as_float(mean) == 2.0 ** 8          # ... and rounds to the even neighbour
    two = np.array([[0.0], [2.0 ** 27 - 1]])
    check_stats(two)


def test_midpoint_mean_float64():
    # Four float64 values whose exact mean is halfway between two floats.
    rng = np.random.default_rng(5)
    for _ in range(20):
        head = np.round(rng.uniform(0, 1, 3) * 2 ** 20) / 2 ** 20
        m = 1.0 + rng.integers(0, 2 ** 52) * 2.0 ** -52
        target = 4 * (Fraction(m) + Fraction(1, 2 ** 53))
        last = target - sum(Fraction(float(v)) for v in head)
        if Fraction(float(last)) != last:
            continue
        x = np.append(head, float(last))[:, None]
        assert is_midpoint(fraction_stats(x)[0])
        check_stats(x)


@pytest.mark.parametrize("seed", range(6))
def test_statistics_correctly_rounded_on_small_cases(seed):
    # Small random cases of every kind, float16/32/64, checked bitwise.
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    for x in (rng.standard_normal((n, 3)), 1e4 + rng.standard_normal((n, 3)) * 1e-3,
              np.round(rng.standard_normal((n, 3)) * 8) / 8, rng.standard_normal((n, 3)) * 1e20):
        for dtype in (np.float16, np.float32, np.float64):
            xd = np.clip(x, -6e4, 6e4).astype(dtype) if dtype == np.float16 else x.astype(dtype)
            check_stats(xd)
            lin, prod, special = E.exact_sums(xd, balanced=True)
            mean, var, _ = E.exact_stats(n, lin, prod, special)
            dy = rng.standard_normal((n, 3)).astype(dtype)
            check_backward(dy, xd, mean, 1.0 / np.sqrt(var + 1e-5))


# -- many binades, subnormals -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_binades(dtype):
    # Magnitudes log-uniform over 2^-30 .. 2^30: a block spans 60 binades
    # plus the mantissa, so it needs several pieces (float32: 4, float64: 6
    # of 22 bits), not the 2 to 4 of ordinary data.
    rng = np.random.default_rng(11)
    x = log_uniform(rng, (400, 3)).astype(dtype)
    dy = log_uniform(rng, (400, 3)).astype(dtype)
    e, lo, _ = EP._scan(x[:, :, None])
    assert (-(-(e - lo) // EP.BITS) >= 4).all()
    check_stats(x)
    lin, prod, special = E.exact_sums(x, balanced=True)
    mean, var, _ = E.exact_stats(400, lin, prod, special)
    check_backward(dy, x, mean, 1.0 / np.sqrt(var + 1e-5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_subnormals(dtype):
    # Subnormal inputs (and channels mixing them with normal values): the
    # pieces' scaling by 2^-E must stay exact, and var underflows.
    tiny = np.finfo(dtype).smallest_subnormal
    rng = np.random.default_rng(12)
    x = (rng.integers(-1000, 1000, (60, 3)) * tiny).astype(dtype)
    x[:, 2] = np.where(rng.random(60) < 0.5, x[:, 2], rng.standard_normal(60) * 1e-30).astype(dtype)
    check_stats(x)
    lin, prod, special = E.exact_sums(x, balanced=True)
    mean, var, _ = E.exact_stats(60, lin, prod, special)
    check_backward(rng.standard_normal((60, 3)).astype(dtype), x, mean, np.ones(3))


# -- the fallbacks, forced --------------------------------------------------------------

def _layer_bytes(x, dy):
    """y, dx, dgamma, dbeta and the statistics of one exact step, as bytes."""
    def rank_fn(group, rank):
        ex = make_exchange(group, x.shape[1], True)
        y, saved = sync_batch_norm(x, np.full(x.shape[1], 1.5), np.zeros(x.shape[1]), group_comm=group,
                                   exchange=ex, exact=True)
        dx, dgamma, dbeta = sync_batch_norm_backward(dy, saved)
        return b"".join(a.tobytes() for a in (y, dx, dgamma, dbeta, saved.mean, saved.var))
    return run_group(1, rank_fn)[0]


@pytest.mark.parametrize("force", ["pieces", "window", "certificate", "span"])
def test_forced_fallbacks_give_the_same_bytes(force, monkeypatch):
    # Each fast path, made to give up on purpose, must hand over to its
    # fallback without changing a bit: "pieces" (KMAX = 0: every channel
    # by the general integer sums), "window" (values below the window: a
    # channel spanning 1e-300 .. 1e150 cannot be pieced), "certificate"
    # (a margin of 1: no quotient certified, all finished with Python
    # ints), "span" (MAX_LIMBS = 0: the digits too wide, ditto).
    rng = np.random.default_rng(13)
    x = 1e3 + rng.standard_normal((24, 3, 2, 2))
    dy = rng.standard_normal(x.shape)
    if force == "window":
        # 1e-300 .. 1e150: far too wide for the pieces, yet the variance
        # stays finite (a finite variance is what nonfinite='raise' asks)
        x[:, 1] *= 10.0 ** rng.integers(-300, 150, x[:, 1].shape)
        x[:, 1, 0, 0] = 0.0
        with np.errstate(over="ignore"):
            e, lo, _ = EP._scan(x[:, 1:2].reshape(24, 1, 4))
        assert -(-(e - lo) // EP.BITS)[0] > EP.KMAX           # really below the window
    before = _layer_bytes(x, dy)
    calls = []
    general = E._general_sums
    monkeypatch.setattr(E, "_general_sums", lambda *a: calls.append(1) or general(*a))
    ints = E.limbs_to_ints
    monkeypatch.setattr(E, "limbs_to_ints", lambda *a: calls.append(2) or ints(*a))
    if force == "pieces":
        monkeypatch.setattr(EP, "KMAX", 0)
    elif force == "certificate":
        monkeypatch.setattr(ER, "_ERR", 1.0)
    elif force == "span":
        monkeypatch.setattr(ER, "MAX_LIMBS", 0)
    after = _layer_bytes(x, dy)
    assert after == before
    assert calls, "the fallback did not run"


# -- any split, the same bytes (hypothesis) ---------------------------------------------

def split_step(x, dy, sizes, seed):
    slices = shard_slices(sizes)
    gamma, beta = np.linspace(0.5, 2.0, x.shape[1]), np.linspace(-1.0, 1.0, x.shape[1])

    def rank_fn(group, rank):
        rm, rv = np.zeros(x.shape[1]), np.ones(x.shape[1])
        ex = make_exchange(group, x.shape[1], True)
        y, saved = sync_batch_norm(x[slices[rank]], gamma, beta, group_comm=group, running_mean=rm,
                                   running_var=rv, exchange=ex, exact=True, nonfinite="propagate")
        dx, _, _ = sync_batch_norm_backward(dy[slices[rank]], saved)
        return y, dx, saved.mean.tobytes() + saved.var.tobytes() + rm.tobytes() + rv.tobytes()

    res = run_group(len(sizes), rank_fn, seed=seed, tree=seed % 2 == 1)
    stats = {r[2] for r in res}
    assert len(stats) == 1                                     # every rank agrees
    return np.concatenate([r[0] for r in res]).tobytes(), np.concatenate([r[1] for r in res]).tobytes(), \
        stats.pop()


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       kind=st.sampled_from(["normal", "offset", "binades", "coarse"]),
       shape=st.sampled_from([(3,), (2, 1, 3), (3, 2, 2)]),
       cuts=st.lists(st.integers(0, 12), min_size=1, max_size=4), seed=st.integers(0, 2 ** 16))
def test_any_split_gives_the_same_bytes(dtype, kind, shape, cuts, seed):
    # A batch of 12 samples split at random points over 2 to 5 simulated
    # ranks (empty shards included) whose Allreduce adds in a random order:
    # y, dx and every statistic bitwise equal to the one-rank run.
    rng = np.random.default_rng(seed)
    full = (12,) + shape
    x = {"normal": rng.standard_normal(full), "offset": 1e4 + rng.standard_normal(full) * 1e-2,
         "binades": log_uniform(rng, full, -12, 12), "coarse": np.round(rng.standard_normal(full) * 4)}[kind]
    x, dy = x.astype(dtype), rng.standard_normal(full).astype(dtype)
    points = sorted(cuts)
    sizes = np.diff([0] + points + [12]).tolist()
    assert split_step(x, dy, sizes, seed) == split_step(x, dy, [12], seed)


# -- real ranks: many splits, groups, empty shards, one sample per rank ------------------

def mpi_splits(size, rng):
    """(total, sizes) per split of a group of ``size`` ranks: even, uneven, all on the
    last rank, empty shards, one sample per rank, and random cuts. Eight splits for
    any size: layers are made collectively, so every rank must make as many."""
    n = 3 * size + 2
    splits = [[n // size + (r < n % size) for r in range(size)], [n] + [0] * (size - 1),
              [0] * (size - 1) + [n], [1] * size if size > 1 else [2]]
    for _ in range(4):
        cuts = np.sort(rng.integers(0, n + 1, size - 1))
        splits.append(np.diff(np.concatenate([[0], cuts, [n]])).tolist())
    return [(sum(sizes), sizes) for sizes in splits]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("groups", [None, "pairs", "outside", "one_and_rest"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_splits_over_real_ranks(groups, dtype):
    # Every split of each group's batch over real ranks (MPI's own
    # reduction order) gives y, dx and every statistic bitwise equal to
    # one process holding the whole batch, on data over 40 binades.
    from mpi4py import MPI
    from mpibn import SyncBatchNorm
    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    process_groups = {None: None, "pairs": [list(range(0, size, 2)), list(range(1, size, 2))],
                      "outside": [list(range(size - 1))] if size > 2 else None,
                      "one_and_rest": [[0], list(range(1, size))]}[groups]
    members = next((g for g in process_groups or [list(range(size))] if rank in g), [rank])
    rng = np.random.default_rng(21)
    gamma = np.array([1.0, 2.0, 0.5])
    failures = []
    for shape in [(3, 2, 3), (3,)]:
        for total, sizes in mpi_splits(len(members), rng):
            data = np.random.default_rng(total)
            x = (log_uniform(data, (total,) + shape, -20, 20)).astype(dtype)
            dy = data.standard_normal(x.shape).astype(dtype)
            sl = shard_slices(sizes)[members.index(rank)]
            bn = SyncBatchNorm(3, momentum=0.8, dtype=np.float64, process_groups=process_groups,
                               exact=True, gamma_init=gamma).set_train()
            y, dx = bn(x[sl]), None
            dx = bn.backward(dy[sl])
            stats = np.concatenate([bn.batch_mean, bn.batch_var, bn.moving_mean.data, bn.moving_variance.data])
            bn.close()
            with SyncBatchNorm(3, momentum=0.8, dtype=np.float64, comm=MPI.COMM_SELF, exact=True,
                               gamma_init=gamma) as ref:
                ref.set_train()
                y_ref, dx_ref = ref(x), None
                dx_ref = ref.backward(dy)
                ref_stats = np.concatenate([ref.batch_mean, ref.batch_var, ref.moving_mean.data,
                                            ref.moving_variance.data])
            if (y.tobytes(), dx.tobytes(), stats.tobytes()) != \
                    (y_ref[sl].tobytes(), dx_ref[sl].tobytes(), ref_stats.tobytes()):
                failures.append((shape, sizes))
    everyone = world.allgather(failures)
    assert everyone == [[]] * size, everyone


# -- one answer on every machine: BLAS kernels -------------------------------------------

_BYTES_SCRIPT = r"""
import hashlib, numpy as np
from mpibn.testing import reference
rng = np.random.default_rng(3)
h = hashlib.sha256()
for shape, dtype in [((64, 8, 40, 40), np.float32), ((256, 64), np.float32), ((16, 8, 14, 14), np.float64),
                     ((600, 3), np.float64)]:
    x = (5 + rng.standard_normal(shape) * 2.0 ** rng.uniform(-8, 8, shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for r in reference([x[:shape[0] // 3], x[shape[0] // 3:]], [dy[:shape[0] // 3], dy[shape[0] // 3:]],
                       exact=True, dtype=dtype):
        for v in (r.y, r.dx, r.dgamma, r.dbeta, r.batch_mean, r.batch_var, r.moving_var):
            h.update(np.ascontiguousarray(v).tobytes())
print(h.hexdigest())
"""


@pytest.mark.timeout(300)
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="OpenBLAS x86 core types")
def test_same_bytes_under_different_blas_kernels():
    # The pieces' sums go through BLAS (vecdot, gemv) and einsum, whose
    # summation order differs between kernels; being exact, they must not
    # change a bit. Each kernel in its own process (OPENBLAS_CORETYPE is read
    # when OpenBLAS loads); two simulated ranks run as threads there, which
    # is how this test once caught scratch buffers shared between threads.
    digests = {}
    for core in ("Prescott", "Haswell", "Sandybridge"):
        env = dict(os.environ, OPENBLAS_CORETYPE=core, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", _BYTES_SCRIPT], env=env, capture_output=True,
                             text=True, timeout=240)
        assert out.returncode == 0, out.stderr
        digests[core] = out.stdout.strip()
    assert len(set(digests.values())) == 1 and len(digests["Prescott"]) == 64, digests
