#!/usr/bin/env python3
"""Check the backward formulas against finite differences, as a student would.

    python scripts/gradient_check.py

Four simulated ranks in the groups [[0, 1], [2, 3]] hold shards of 3, 1, 2
and 0 samples of shape (C, H, W) = (3, 2, 2), in float64
(``mpibn.testing.reference``: the real layer on every rank, no MPI). The
loss is L = sum over ranks of sum(dy * y) for a fixed random dy, whose
gradient with respect to every y is dy: so dL/dx is the dx that
``backward(dy)`` returns, and dL/dgamma, dL/dbeta are the group's sums of
the ranks' dgamma, dbeta. Each is compared with a central difference
(L(x + h e_j) - L(x - h e_j)) / 2h, h = 1e-6, over every input value and
every gamma and beta. The formulas are derived in docs/derivation.md,
section 4.
"""
import numpy as np

from mpibn.testing import reference

GROUPS = [[0, 1], [2, 3]]
SHARDS = (3, 1, 2, 0)
C, H, W = 3, 2, 2
STEP = 1e-6


def main():
    rng = np.random.default_rng(0)
    xs = [rng.normal(2.0, 1.5, (b, C, H, W)) for b in SHARDS]
    dys = [rng.normal(size=(b, C, H, W)) for b in SHARDS]
    gamma, beta = rng.normal(1.0, 0.3, C), rng.normal(0.0, 0.3, C)

    def run(xs, gamma, beta, backward=False):
        return reference(xs, dys if backward else None, process_groups=GROUPS, gamma=gamma,
                         beta=beta, dtype=np.float64)

    def loss(xs, gamma=gamma, beta=beta):
        return sum(float(np.sum(dy * r.y)) for dy, r in zip(dys, run(xs, gamma, beta)))

    results = run(xs, gamma, beta, backward=True)
    dx_err = dx_max = 0.0
    for r, x in enumerate(xs):
        for j in np.ndindex(x.shape):
            plus = [v.copy() for v in xs]
            minus = [v.copy() for v in xs]
            plus[r][j] += STEP
            minus[r][j] -= STEP
            fd = (loss(plus) - loss(minus)) / (2 * STEP)
            dx_err = max(dx_err, abs(fd - results[r].dx[j]))
            dx_max = max(dx_max, abs(results[r].dx[j]))
    print(f"dx: max |finite difference - backward| = {dx_err:.1e} over {sum(x.size for x in xs)} "
          f"values (max |dx| = {dx_max:.2f})")
    for name, index in (("gamma", 0), ("beta", 1)):
        errors = []
        for group in GROUPS:
            analytic = sum(getattr(results[r], "dgamma" if index == 0 else "dbeta") for r in group)
            for c in range(C):
                params = [gamma.copy(), beta.copy()]
                params[index][c] += STEP
                up = sum(float(np.sum(dys[r] * run(xs, *params)[r].y)) for r in group)
                params[index][c] -= 2 * STEP
                down = sum(float(np.sum(dys[r] * run(xs, *params)[r].y)) for r in group)
                errors.append(abs((up - down) / (2 * STEP) - analytic[c]))
        print(f"d{name} (summed over each group): max |finite difference - backward| = "
              f"{max(errors):.1e}")


if __name__ == "__main__":
    main()
