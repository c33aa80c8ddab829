#!/usr/bin/env python3
"""Why the group's statistics travel as (count, mean, centred m2), not (sum, sum of squares).

    python scripts/variance_demo.py            # the synchronisation schemes
    python scripts/variance_demo.py --shard    # one shard's m2 against exact arithmetic
    python scripts/variance_demo.py --merge    # four shards merged, against exact arithmetic
    python scripts/variance_demo.py --split    # one batch split four ways

Four uneven "ranks" (400, 300, 200 and 100 values) hold data with a large
mean and a small spread, and a drift between ranks so that their means
differ. Each way of synchronising is simulated on one process (no MPI:
mpibn.functional is pure NumPy) and compared with the exact variance of the
concatenated values (fractions.Fraction, no rounding):

* the sum and sum of squares, var = E[x^2] - E[x]^2 (a rounding problem);
* the count-weighted average of the ranks' variances, which drops the
  between-rank term (wrong even with equal shards, in exact arithmetic);
* Flax's scheme, an unweighted mean over ranks of E[x] and of E[x^2],
  evaluated in exact arithmetic, so that only the scheme's error shows
  (in floating point it also cancels as the first row does);
* mpibn: count, mean and centred m2, merged.

``--shard`` measures instead the accuracy of one rank's local moments
(``batch_norm_stats``) on one channel of n = 100,352 values, shaped
(32, 1, 3136) so that the shard is larger than SMALL_SHARD and its head is
the first 2 samples (one block: blocks.WHOLE), then of n = 401,408 values,
shaped (128, 1, 3136) (blocks of 10 samples, head 8 samples); once in
random order and once sorted (the head then holds the smallest values, the
worst case for the shift). It prints the block plan the sums follow and the
error bound that plan gives.
``--merge`` merges 4 such shards and compares the variance with exact
arithmetic; ``--split`` splits the first case's float64 data four ways.

The default output is quoted in docs/derivation.md, the others in
docs/ground-truth.md; tests/test_docs_numbers.py holds every quoted number.
"""
import argparse
import math
from fractions import Fraction

import numpy as np

from mpibn.functional import batch_norm_stats, merge_stats

SHARDS = (400, 300, 200, 100)


def exact_var(x):
    values = [Fraction(float(v)) for v in x]
    mean = sum(values) / len(values)
    return float(sum((v - mean) ** 2 for v in values) / len(values))


def naive(shards, acc):
    """Each rank sends (n, sum x, sum x^2); var = E[x^2] - E[x]^2 (TF/Keras, Horovod TF, Paddle)."""
    n = sum(len(s) for s in shards)
    s1 = sum(np.sum(s, dtype=acc) for s in shards)
    s2 = sum(np.sum(s.astype(acc) * s.astype(acc), dtype=acc) for s in shards)
    return float(s2 / acc(n) - (s1 / acc(n)) ** 2)


def within_only(shards):
    """Each rank's variance, averaged with the counts as weights: the between-rank term is lost."""
    n = sum(len(s) for s in shards)
    return float(sum(len(s) * s.astype(np.float64).var() for s in shards) / n)


def flax_pmean(shards):
    """Flax: var = mean_r E_r[x^2] - (mean_r E_r[x])^2, unweighted over ranks (exact arithmetic)."""
    ex, ex2 = [], []
    for s in shards:
        values = [Fraction(float(v)) for v in s]
        ex.append(sum(values) / len(values))
        ex2.append(sum(v * v for v in values) / len(values))
    mean = sum(ex) / len(ex)
    return float(mean), float(sum(ex2) / len(ex2) - mean * mean)


def mpibn(shards):
    """Each rank sends (n, mean, centred m2); merge_stats combines them."""
    rows = [batch_norm_stats(s.reshape(-1, 1, 1)) for s in shards]
    total, mean, m2 = merge_stats([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    return float(mean[0]), float(m2[0] / total)


def exact_m2(x):
    """Exact sum((x - mean)^2) of float values, as a float: integers on a common 2^-k grid."""
    ratios = [float(v).as_integer_ratio() for v in x]
    scale = max(d for _, d in ratios)
    ints = [n * (scale // d) for n, d in ratios]            # x_i = ints[i] / scale, exactly
    s1, s2 = sum(ints), sum(v * v for v in ints)
    return float(Fraction(len(ints) * s2 - s1 * s1, len(ints) * scale * scale))


def summation_factor(shape):
    """Worst-case growth f(n) of the rounding error of one channel's sums under
    the block plan ``batch_norm_stats`` uses for a 4-D array of this shape
    (``mpibn.blocks.plan``): each block holds m values of the channel,
    contiguous, which NumPy sums pairwise (runs of up to 128 values over 8
    accumulators of 16 terms, a tree of depth 3, longer runs halved: about
    19 + log2(m / 128) roundings, Higham ch. 4), and the channel's n / m
    block results are then added one after the other."""
    from mpibn.blocks import plan        # the kernels' own plan: the bound follows the code
    n = shape[0] * shape[2]
    layout = plan(shape)
    m = n if layout == "whole" else layout[0] * layout[2]
    pairwise = 19 + max(0, math.ceil(math.log2(m / 128)))
    return layout, m, pairwise + (-(-n // m) - 1)


def shard_accuracy():
    rng = np.random.default_rng(0)
    u = 2.0 ** -53
    for shape in ((32, 1, 3136), (128, 1, 3136)):
        n = shape[0] * shape[2]
        head = -(-shape[0] // 16)
        layout, m, f = summation_factor(shape)
        print(f"one shard, one channel, n = {n} values, shape {shape}: relative error of m2")
        print(f"  block plan {layout!r}: pairwise sums of {m} values per channel, worst-case factor f(n) = {f}")
        print(f"  worst-case bound u f(n) = {u * f:.1e}; random-sign rule of thumb u sqrt(f(n)) = "
              f"{u * math.sqrt(f):.1e}")
        print(f"  shift K = the mean of the first {head} of {shape[0]} samples; "
              f"kappa = n (mean - K)^2 / m2 <= {shape[0] // head}")
        for mu, sigma, dtype in [(0.0, 1.0, np.float64), (1e4, 1.0, np.float64),
                                 (1e4, 0.1, np.float32), (5.0, 1.0, np.float32)]:
            x = rng.normal(mu, sigma, n).astype(dtype)
            errors, kappas = [], []
            for values in (x, np.sort(x)):
                _, _, m2 = batch_norm_stats(values.reshape(shape))
                true = exact_m2(values)
                errors.append(abs(float(m2[0]) - true) / true)
                v64 = values.astype(np.float64)
                kappas.append(n * (v64.mean() - v64[:head * shape[2]].mean()) ** 2 / true)
            print(f"  {np.dtype(dtype).name} data, mean {mu:g}, std {sigma:g}: random order "
                  f"{errors[0]:.1e}, sorted {errors[1]:.1e}   (kappa {kappas[0]:.2f}, sorted {kappas[1]:.2f})")


def merge_accuracy():
    """P ranks' moments merged: the local term against the between-rank term."""
    rng = np.random.default_rng(1)
    ranks, shape = 4, (32, 1, 3136)
    n = shape[0] * shape[2]
    f = summation_factor(shape)[2]
    u = 2.0 ** -53
    x = rng.normal(5.0, 1.0, ranks * n).astype(np.float32)
    shards = np.split(x, ranks)
    true = exact_m2(x) / x.size
    mu, sigma = float(np.mean(x, dtype=np.float64)), math.sqrt(true)
    print(f"{ranks} ranks x {n} float32 values from N(5, 1), merged: relative error of the variance")
    for label, data in (("shards in random order", shards),
                        ("each shard sorted", [np.sort(s) for s in shards])):
        rows = [batch_norm_stats(s.reshape(shape)) for s in data]
        total, mean, m2 = merge_stats([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        spread = max(abs(float(r[1][0]) - mu) for r in rows)
        between = u * abs(mu) / sigma * spread / sigma
        heads = [s[:-(-shape[0] // 16) * shape[2]].astype(np.float64).mean() for s in data]
        kappa = max(n * (float(r[1][0]) - k) ** 2 / float(r[2][0]) for r, k in zip(rows, heads))
        print(f"  {label}: measured {abs(float(m2[0]) / total - true) / true:.1e}; local bound "
              f"u f(n_r) (1 + kappa) = {u * f * (1 + kappa):.1e}; between-rank term "
              f"u (|mu|/sigma)(spread/sigma) = {between:.1e}")


def split_variation():
    """The same float64 batch split four ways: the default mode's variance moves with the split."""
    rng = np.random.default_rng(0)
    x = rng.normal(1e8, 1.0, sum(SHARDS))
    cuts = np.cumsum((0,) + SHARDS)
    whole = np.concatenate([x[a:b] + i * 1.0 for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))])
    true = exact_var(whole)
    print(f"the float64 data of the first case (mean 1e8), split four ways: variance, relative error")
    results = []
    for split in ((400, 300, 200, 100), (250, 250, 250, 250), (1000,), (100, 200, 300, 400)):
        parts = np.split(whole, np.cumsum(split)[:-1])
        _, var = mpibn(parts)
        results.append(var)
        print(f"  shards {split}: var {var:.10g}, relative error {(var - true) / true:+.1e}")
    print(f"  largest relative difference between splits: {(max(results) - min(results)) / true:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", action="store_true",
                        help="measure one shard's m2 against exact arithmetic instead")
    parser.add_argument("--merge", action="store_true",
                        help="measure the merged variance of 4 shards against exact arithmetic")
    parser.add_argument("--split", action="store_true",
                        help="the first case's data split four ways: how the variance moves")
    args = parser.parse_args()
    for flag, job in ((args.shard, shard_accuracy), (args.merge, merge_accuracy),
                      (args.split, split_variation)):
        if flag:
            job()
    if args.shard or args.merge or args.split:
        return
    rng = np.random.default_rng(0)
    # The last two cases share one draw: the same float32 data, whose sum of
    # squares is accumulated in float32 in one and in float64 in the other.
    cases = [("float64 data, mean 1e8, std 1; sum of squares in float64", np.float64, 1e8, 1.0, np.float64),
             ("float32 data, mean 1e4, std 0.1; sum of squares in float32", np.float32, 1e4, 0.1, np.float32),
             ("the same float32 data; sum of squares in float64", np.float32, 1e4, 0.1, np.float64)]
    drawn, shown = {}, set()
    for title, dtype, mu, sigma, acc in cases:
        key = (dtype, mu, sigma)
        if key not in drawn:
            drawn[key] = rng.normal(mu, sigma, sum(SHARDS)).astype(dtype)
        x = drawn[key]
        # A drift between ranks, so that their means differ (as real shards do).
        cuts = np.cumsum((0,) + SHARDS)
        shards = [x[a:b] + dtype(i * sigma) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        whole = np.concatenate(shards)
        true = exact_var(whole)
        true_mean = float(sum(Fraction(float(v)) for v in whole) / len(whole))
        print(f"{title}: exact variance {true:.10g}, exact mean {true_mean:.10g}")
        v = naive(shards, acc)
        print(f"  sum and sum of squares, E[x^2]-E[x]^2 : var {v:+.6g}   relative error "
              f"{(v - true) / true:+.1e}")
        if key in shown:
            print("  (the other rows do not depend on how the sum of squares is accumulated: as in the case above)")
            continue
        shown.add(key)
        v = within_only(shards)
        print(f"  weighted mean of rank variances       : var {v:.6g}   relative error "
              f"{(v - true) / true:+.1e}  (between-rank term dropped)")
        m, v = flax_pmean(shards)
        print(f"  unweighted pmean of E[x], E[x^2] (Flax): mean {m:.10g} var {v:.6g}   relative "
              f"error {(v - true) / true:+.1e}  (exact arithmetic)")
        m, v = mpibn(shards)
        print(f"  mpibn: count, mean, centred m2 (merge): mean {m:.10g} var {v:.10g}   relative "
              f"error {(v - true) / true:+.1e}  (mpibn's float64 arithmetic)")


if __name__ == "__main__":
    main()
