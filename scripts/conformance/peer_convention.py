"""A golden scenario's outputs recomputed under another framework's *convention* (float64).

Used by ``column.py`` to tell a convention difference from a defect: a
quantity that is off against mpibn's golden values but matches this
recomputation is a convention; off under both, a defect. Only NumPy.

The knobs (each a documented behaviour of some framework, not a bug):

* ``weights="group"``: statistics of the group's concatenated batch (every
  value weighs 1/N; mpibn, torch SyncBatchNorm, Keras). ``"device"``: the
  mean of per-device statistics (every value of rank r weighs 1/(P n_r);
  Flax/JAX ``pmean``). An empty device makes this undefined (NaN).
* ``moving_var="unbiased"`` (N/(N-1) times the batch variance; MindSpore,
  torch) or ``"biased"`` (Flax, Keras).
* ``stats_dtype``: None, or the dtype the framework holds mean and variance
  in before normalising (e.g. float32): they are rounded to it first.

Weighted batch norm, weights w_i (sum 1) over the group's values::

    mean = sum w_i x_i,  var = sum w_i (x_i - mean)^2,  s = 1/sqrt(var + eps)
    y_i  = gamma (x_i - mean) s + beta,  xhat_i = (x_i - mean) s
    dx_i = gamma s (dy_i - w_i sum dy - w_i xhat_i sum dy xhat)     (sums over the group's values)

with w_i = 1/N this is the usual formula (mean of dy, mean of dy xhat).

Each quantity q also gets ``bound_q`` (elementwise, >= 0): the first-order
change of q when every input value (x, dy, gamma, beta, the initial moving
statistics) moves by one unit of relative size, with absolute values
throughout, so that u * bound_q bounds the change a one-ulp (unit roundoff
u) perturbation of the inputs can cause. ``column.py`` judges an *accuracy
limit* against it (docs/conformance.md, "Rubric")::

    mean: sum w|x|                     var: 2 sum w |x - mean| |x|
    y:    |gamma| s (|x| + b_mean) + |gamma| |xhat| (1 + s^2 b_var / 2) + |beta|
    dx:   |gamma| s (|dy| + w sum|dy| + w |xhat| sum|dy xhat|
                     + w |sum dy xhat| s (|x| + b_mean)) + |dx| (1 + s^2 b_var / 2)
    dgamma: sum |dy| (|xhat| + s (|x| + b_mean) + |xhat| s^2 b_var / 2)      dbeta: sum |dy|
    moving: momentum (|old| + b_old) + (1 - momentum) b_batch
"""
import numpy as np


def _ncl(a):
    return a.reshape(a.shape[0], a.shape[1], int(np.prod(a.shape[2:]))).astype(np.float64)


def recompute(s, ranks, weights="group", moving_var="unbiased", stats_dtype=None):
    """{rank: {quantity: (2, ...) float64}} for golden scenario ``s`` (manifest dict) and its rank files."""
    training = s["training"] if s["use_batch_statistics"] is None else s["use_batch_statistics"]
    out = {}
    for members in sorted({tuple(g) for g in s["groups_of_rank"]}):
        f0 = ranks[members[0]]
        gamma, beta = f0["gamma"][None, :, None], f0["beta"][None, :, None]
        mm, mv = f0["moving_mean0"].copy(), f0["moving_var0"].copy()
        res = {r: {k: [] for k in list(s["outputs"]) + ["bound_" + q for q in s["outputs"]]}
               for r in members}
        b_mm, b_mv = np.abs(mm), np.abs(mv)
        for step in range(2):
            xs = [_ncl(ranks[r]["x"][step]) for r in members]
            dys = [_ncl(ranks[r]["dy"][step]) for r in members]
            x, dy = np.concatenate(xs), np.concatenate(dys)
            per_slot = x.shape[2]
            counts = [len(a) * per_slot for a in xs]
            total = sum(counts)
            if weights == "group":
                w = np.full(len(x), 1.0 / total if total else np.nan)
            else:
                with np.errstate(divide="ignore"):
                    w = np.concatenate([np.full(len(a), 1.0 / (len(members) * c) if c else np.nan)
                                        for a, c in zip(xs, counts)])
                if any(c == 0 for c in counts):
                    w = np.full(len(x), np.nan)          # an empty device: pmean of 0/0
            wb = w[:, None, None]
            if training:
                with np.errstate(invalid="ignore", divide="ignore"):
                    mean = (wb * x).sum(axis=(0, 2))
                    var = (wb * (x - mean[None, :, None]) ** 2).sum(axis=(0, 2))
                    if not np.isfinite(w).all():
                        mean, var = np.full_like(mean, np.nan), np.full_like(var, np.nan)
            else:
                mean, var = mm.copy(), mv.copy()
            used_mean, used_var = mean, var
            if stats_dtype is not None:
                used_mean = mean.astype(stats_dtype).astype(np.float64)
                used_var = var.astype(stats_dtype).astype(np.float64)
            inv = 1.0 / np.sqrt(used_var + s["eps"])
            xhat = (x - used_mean[None, :, None]) * inv[None, :, None]
            y = gamma * xhat + beta
            with np.errstate(invalid="ignore"):
                if training:
                    b_mean = (wb * np.abs(x)).sum(axis=(0, 2))
                    b_var = 2 * (wb * np.abs(x - mean[None, :, None]) * np.abs(x)).sum(axis=(0, 2))
                else:
                    b_mean, b_var = b_mm.copy(), b_mv.copy()
            sb = inv[None, :, None]
            grow = 1 + sb ** 2 * b_var[None, :, None] / 2          # what a change of var does to s
            spread = np.abs(x) + b_mean[None, :, None]
            b_y = np.abs(gamma) * sb * spread + np.abs(gamma) * np.abs(xhat) * grow + np.abs(beta)
            if training:
                sdy = dy.sum(axis=(0, 2))[None, :, None]
                sdyx = (dy * xhat).sum(axis=(0, 2))[None, :, None]
                dx = gamma * inv[None, :, None] * (dy - wb * sdy - wb * xhat * sdyx)
                a_dy, a_dyx = np.abs(dy).sum(axis=(0, 2))[None, :, None], \
                    (np.abs(dy) * np.abs(xhat)).sum(axis=(0, 2))[None, :, None]
                b_dx = np.abs(gamma) * sb * (np.abs(dy) + wb * a_dy + wb * np.abs(xhat) * a_dyx
                                             + wb * np.abs(sdyx) * sb * spread) + np.abs(dx) * grow
                mom = s["momentum"]
                mm = mom * mm + (1 - mom) * mean
                bias = total / (total - 1) if moving_var == "unbiased" and total > 1 else 1.0
                mv = mom * mv + (1 - mom) * var * bias
                b_mm = mom * (np.abs(mm) + b_mm) + (1 - mom) * b_mean
                b_mv = mom * (np.abs(mv) + b_mv) + (1 - mom) * bias * b_var
            else:
                dx = gamma * inv[None, :, None] * dy
                b_dx = np.abs(dx) * (2 + grow)
            ends = np.cumsum([0] + [len(a) for a in xs])
            for i, r in enumerate(members):
                sl = slice(ends[i], ends[i + 1])
                shape = ranks[r]["x"].shape[1:]
                o = res[r]
                o["y"].append(y[sl].reshape(shape))
                o["dx"].append(dx[sl].reshape(shape))
                o["dgamma"].append((dy[sl] * xhat[sl]).sum(axis=(0, 2)))
                o["dbeta"].append(dy[sl].sum(axis=(0, 2)))
                o["bound_y"].append(b_y[sl].reshape(shape))
                o["bound_dx"].append(b_dx[sl].reshape(shape))
                o["bound_dgamma"].append((np.abs(dy[sl]) * (np.abs(xhat[sl]) + sb * spread[sl]
                                                            + np.abs(xhat[sl]) * (grow - 1))).sum(axis=(0, 2)))
                o["bound_dbeta"].append(np.abs(dy[sl]).sum(axis=(0, 2)))
                if "batch_mean" in o:
                    o["batch_mean"].append(mean)
                    o["batch_var"].append(var)
                    o["bound_batch_mean"].append(b_mean)
                    o["bound_batch_var"].append(b_var)
                o["moving_mean"].append(mm.copy())
                o["moving_var"].append(mv.copy())
                o["bound_moving_mean"].append(b_mm.copy())
                o["bound_moving_var"].append(b_mv.copy())
        for r, o in res.items():
            out[r] = {k: np.stack(v) for k, v in o.items()}
    return out
