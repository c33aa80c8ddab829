#!/usr/bin/env python3
"""Why the group's statistics travel as (count, mean, centred m2), not (sum, sum of squares).

    python scripts/variance_demo.py

Four uneven "ranks" (400, 300, 200 and 100 values) hold data with a large
mean and a small spread. Each way of synchronising is simulated on one
process (no MPI: mpibn.functional is pure NumPy) and compared with the
exact variance of the concatenated values (fractions.Fraction, no rounding).
The numbers are quoted in docs/derivation.md.
"""
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


def mean_of_means(shards):
    """Each rank sends its own mean and variance; the group averages them (Flax, Paddle, Ascend)."""
    means = [s.astype(np.float64).mean() for s in shards]
    var = np.mean([s.astype(np.float64).var() for s in shards])
    return float(np.mean(means)), float(var)


def mpibn(shards):
    """Each rank sends (n, mean, centred m2); merge_stats combines them."""
    rows = [batch_norm_stats(s.reshape(-1, 1, 1)) for s in shards]
    total, mean, m2 = merge_stats([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    return float(mean[0]), float(m2[0] / total)


def main():
    rng = np.random.default_rng(0)
    cases = [("float64 data, mean 1e8, std 1", np.float64, 1e8, 1.0, np.float64),
             ("float32 data, mean 1e4, std 0.1, float32 sums", np.float32, 1e4, 0.1, np.float32),
             ("float32 data, mean 1e4, std 0.1, float64 sums", np.float32, 1e4, 0.1, np.float64)]
    for title, dtype, mu, sigma, acc in cases:
        x = rng.normal(mu, sigma, sum(SHARDS)).astype(dtype)
        # A drift between ranks, so that their means differ (as real shards do).
        cuts = np.cumsum((0,) + SHARDS)
        shards = [x[a:b] + dtype(i * sigma) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        whole = np.concatenate(shards)
        true = exact_var(whole)
        true_mean = float(sum(Fraction(float(v)) for v in whole) / len(whole))
        print(f"{title}: exact variance {true:.10g}, exact mean {true_mean:.10g}")
        v = naive(shards, acc)
        print(f"  sum and sum of squares, E[x^2]-E[x]^2 : var {v:+.6g}   relative error "
              f"{abs(v - true) / true:.1e}")
        m, v = mean_of_means(shards)
        print(f"  mean of per-rank means and variances  : mean {m:.10g} var {v:.6g}   relative "
              f"error of var {abs(v - true) / true:.1e}")
        m, v = mpibn(shards)
        print(f"  mpibn: count, mean, centred m2 (merge): mean {m:.10g} var {v:.10g}   relative "
              f"error {abs(v - true) / true:.1e}")


if __name__ == "__main__":
    main()
