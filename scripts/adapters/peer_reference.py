"""A peer's results against a golden set, as ``docs/conformance/<column>.json``.

Used by the ChainerMN and MindSpore adapters (``--json``). Only NumPy, the
standard library and ``mpibn.verify`` here (no MPI).

Two things a verdict needs that ``mpibn verify`` does not give:

* **Normwise errors in the 2-norm** over all ranks of a scenario
  concatenated, ``||a - e||_2 / ||e||_2`` (the plain ``||a - e||_2`` where
  ``||e||_2 == 0``), in float64 (``normwise``).
* **The reference under the peer's convention** (``reference``): the same
  batch norm recomputed in float64 from the golden inputs, with the knobs
  where frameworks legitimately differ. With the defaults it is mpibn's
  convention and reproduces the golden outputs (to rounding; tested in
  ``tests/test_adapters_chainermn.py``), so a quantity that is off against
  the golden files but matches ``reference(..., <peer knobs>)`` differs by
  *convention*; one off under both is a *defect*.

The knobs:

``weights``
    ``"count"``: the group's statistics are those of its concatenated batch
    (mpibn, MindSpore). ``"rank"``: every rank's mean and mean of squares
    weigh the same, whatever its number of samples (ChainerMN averages the
    per-rank values).
``moving_var_count``
    Which count unbiases the moving variance, ``var * n / (n - 1)``:
    ``"group"`` (the group's total, mpibn), ``"local"`` (the rank's own
    count, ``max(n - 1, 1)`` in the denominator, as ChainerMN's code does),
    ``"biased"`` (no correction).
``grad_share``
    What a rank gets as dgamma and dbeta: ``"own"`` (the sum over its own
    samples, mpibn) or ``"group_mean"`` (the group's sum divided by the
    number of ranks in the group, ChainerMN).
``stats_dtype``
    ``None``: statistics in float64. ``"float32"``: the batch mean and
    variance, and the moving statistics after each update, rounded to
    float32, as a framework that holds its statistics in float32 parameters
    must (torch CPU, MindSpore, ChainerMN's default). With |mean| >> std that
    rounding alone moves y by up to ulp(mean) / std: a limit of the format,
    not a defect of the kernel.

Not a knob of ``reference`` but a rung of ``judge``: ``float32_arithmetic``
accepts y, dx and dgamma when they are within 32 float32 ulps of the
conditioning of their formulas (elementwise, ``BOUND_KEYS``): for y,
|gamma| inv_std (|x| + |mean|) + |beta|; for dx, |gamma| inv_std (|dy| +
w |sum dy| + w |xhat| |sum dy xhat|) plus the propagated error of xhat;
for dgamma, sum |dy| (|x| + |mean|) inv_std. Where dx nearly cancels (a
group of 2 values: dx -> 0 as eps -> 0) or |mean| >> std, no float32
evaluation of the formula can do better, so such a difference is the
format's, not the kernel's.
"""

BOUND_KEYS = ("y", "dx", "dgamma")
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import concat, groups, uses_batch_statistics  # noqa: E402

QUANTITIES = ("y", "dx", "dgamma", "dbeta", "batch_mean", "batch_var", "moving_mean", "moving_var")


def _channel_axes(ndim):
    return (0,) + tuple(range(2, ndim))


def _expand(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def reference(s, ranks, weights="count", moving_var_count="group", grad_share="own", stats_dtype=None):
    """[{quantity: (2, ...) float64}] per rank: the scenario recomputed in float64 under the knobs."""
    out = [{k: [] for k in list(s["outputs"]) + ["bound_" + b for b in BOUND_KEYS]} for _ in ranks]
    training = uses_batch_statistics(s)
    eps, mom = s["eps"], s["momentum"]
    for members in groups(s):
        first = ranks[members[0]]
        gamma, beta = first["gamma"], first["beta"]
        mm = {r: ranks[r]["moving_mean0"].astype(np.float64).copy() for r in members}
        mv = {r: ranks[r]["moving_var0"].astype(np.float64).copy() for r in members}
        for step in range(2):
            x_all, sl = concat(ranks, members, "x", step)
            dy_all, _ = concat(ranks, members, "dy", step)
            x, dy = x_all.astype(np.float64), dy_all.astype(np.float64)
            nd, axes = x.ndim, _channel_axes(x.ndim)
            per = int(np.prod(x.shape[2:], dtype=int))          # values per sample and channel
            counts = {r: (sl[r].stop - sl[r].start) * per for r in members}
            total = sum(counts.values())
            with np.errstate(invalid="ignore", divide="ignore"):
                if training:
                    if weights == "count":
                        mean = x.mean(axis=axes) if total else np.full(x.shape[1], np.nan)
                        var = ((x - _expand(mean, nd)) ** 2).mean(axis=axes) if total else mean
                        w = np.full(x.shape[0], 1.0 / total if total else np.nan)
                    else:
                        p = len(members)
                        means = [x[sl[r]].mean(axis=axes) for r in members]     # NaN for an empty rank
                        mean = sum(means) / p
                        var = sum(((x[sl[r]] - _expand(mean, nd)) ** 2).mean(axis=axes) for r in members) / p
                        w = np.concatenate([np.full(sl[r].stop - sl[r].start, 1.0 / np.float64(p * counts[r]))
                                            for r in members])
                    if stats_dtype:
                        mean, var = (v.astype(stats_dtype).astype(np.float64) for v in (mean, var))
                    inv_std = 1.0 / np.sqrt(var + eps)
                    xhat = (x - _expand(mean, nd)) * _expand(inv_std, nd)
                    sum_dy, sum_dyx = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
                    # Gradient of sum(y * dy) through the (weighted) statistics.
                    wx = w.reshape((-1,) + (1,) * (nd - 1))
                    dx = _expand(gamma * inv_std, nd) * (dy - wx * (
                        _expand(sum_dy, nd) + xhat * _expand(sum_dyx, nd)))
                    g_inv = _expand(np.abs(gamma) * inv_std, nd)
                    spread = np.abs(x) + _expand(np.abs(mean), nd)          # what x - mean cancels
                    bound_dx = g_inv * (np.abs(dy) + wx * (_expand(np.abs(sum_dy), nd) + np.abs(xhat) * _expand(
                        np.abs(sum_dyx), nd)) + wx * _expand(np.abs(sum_dyx), nd) * spread * _expand(inv_std, nd))
                else:
                    r0 = members[0]
                    mean, var = mm[r0], mv[r0]
                    inv_std = 1.0 / np.sqrt(var + eps)
                    xhat = (x - _expand(mean, nd)) * _expand(inv_std, nd)
                    dx = _expand(gamma * inv_std, nd) * dy
                    bound_dx = np.abs(dx)
                    spread = np.abs(x) + _expand(np.abs(mean), nd)
                y = _expand(gamma, nd) * xhat + _expand(beta, nd)
                bound_y = _expand(np.abs(gamma) * inv_std, nd) * spread + _expand(np.abs(beta), nd)
                bound_g = np.abs(dy) * spread * _expand(inv_std, nd)
            for r in members:
                o, rows = out[r], sl[r]
                o["y"].append(y[rows])
                o["dx"].append(dx[rows])
                o["bound_y"].append(bound_y[rows])
                o["bound_dx"].append(bound_dx[rows])
                if grad_share == "own" or not training:
                    o["dgamma"].append((dy[rows] * xhat[rows]).sum(axis=axes))
                    o["dbeta"].append(dy[rows].sum(axis=axes))
                    o["bound_dgamma"].append(bound_g[rows].sum(axis=axes))
                else:
                    o["dgamma"].append(sum_dyx / len(members))
                    o["dbeta"].append(sum_dy / len(members))
                    o["bound_dgamma"].append(bound_g.sum(axis=axes) / len(members))
                if training:
                    n = {"group": total, "local": counts[r], "biased": None}[moving_var_count]
                    if n is None:
                        unbiased = var
                    elif moving_var_count == "local":
                        unbiased = var * n / max(n - 1.0, 1.0)
                    else:
                        unbiased = var * n / (n - 1.0) if n > 1 else var
                    mm[r] = mom * mm[r] + (1 - mom) * mean
                    mv[r] = mom * mv[r] + (1 - mom) * unbiased
                    if stats_dtype:
                        mm[r], mv[r] = (v.astype(stats_dtype).astype(np.float64) for v in (mm[r], mv[r]))
                if "batch_mean" in o:
                    o["batch_mean"].append(mean.copy())
                    o["batch_var"].append(var.copy())
                o["moving_mean"].append(mm[r].copy())
                o["moving_var"].append(mv[r].copy())
    return [{k: np.stack(v) for k, v in o.items()} for o in out]


def normwise(actual, expected):
    """||a - e||_2 / ||e||_2 over the ranks' arrays concatenated, float64 (plain ||a - e||_2 if e = 0).

    NaN where both are NaN counts as equal; any other NaN or inf makes the error inf.
    """
    a = np.concatenate([np.asarray(v, np.float64).ravel() for v in actual])
    e = np.concatenate([np.asarray(v, np.float64).ravel() for v in expected])
    both_nan = np.isnan(a) & np.isnan(e)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where(both_nan | (a == e), 0.0, a - e)
    if not np.all(np.isfinite(d)):
        return float("inf")
    ref = np.linalg.norm(np.where(np.isfinite(e), e, 0.0))
    err = np.linalg.norm(d)
    return float(err / ref) if ref > 0 else float(err)


def within_tolerance(actual, expected, dtype):
    """verify's test (``mpibn.verify.compare_quantity``): max|a - e| <= 32 eps of the scenario's dtype
    times max|e| over the ranks, no NaN or inf where the other side is finite, no rank stored with
    less precision than ``dtype``."""
    from mpibn.verify import compare_quantity
    return compare_quantity([(np.asarray(e), np.asarray(a)) for a, e in zip(actual, expected)], dtype).passed


def within_bound(actual, expected, bound, ulps=32):
    """|a - e| <= ulps * u(float32) * bound elementwise over the ranks (NaN or inf: never)."""
    u = float(np.finfo(np.float32).eps) / 2
    for a, e, b in zip(actual, expected, bound):
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(np.asarray(a, np.float64) - e)
        if not np.all(d <= ulps * u * b):
            return False
    return True


def json_number(v):
    """JSON has no inf or NaN: those become the strings "inf" and "nan" (None stays null)."""
    if v is None or np.isfinite(v):
        return v
    return "nan" if np.isnan(v) else "inf"


def judge(s, golden_ranks, results, ladder):
    """Verdict and errors of one scenario, each failing quantity explained by the first rung that fits.

    ``results``: per rank {quantity: array} from the peer (a quantity it does
    not produce is absent). ``ladder``: [(label, kind, knobs)], each rung
    adding knobs of ``reference`` to the previous ones; kind "convention"
    (documented or by design), "accuracy" (only the rounding of the
    arithmetic the framework chose: docs/conformance.md's "defect
    (accuracy)") or "defect" (reproduces what the code does, but nothing
    justifies it). Returns a dict with ``verdict`` ("pass"; "convention" when
    every failing quantity is explained by convention rungs; "accuracy" when
    by convention and accuracy rungs; else "defect"), ``errors`` (against the golden files),
    ``errors_peer_convention`` (failing quantities against the last convention
    rung), ``errors_as_implemented`` (those still failing there, against the
    last rung, if it is a defect rung) and ``explained`` {quantity: label or None}.
    """
    # Never silently skipped: a quantity some rank lacks is unexplained (a defect) whatever the rungs.
    wanted = [q for q in QUANTITIES if q in s["outputs"]]
    keys = [q for q in wanted if all(q in r for r in results)]
    missing = [q for q in wanted if q not in keys]
    act = {q: [r[q] for r in results] for q in keys}
    errors = {q: (normwise(act[q], [g[q] for g in golden_ranks]) if q in keys else None) for q in QUANTITIES}
    failing = [q for q in keys if not within_tolerance(act[q], [g[q] for g in golden_ranks], s["dtype"])]
    explained, knobs, refs = {q: None for q in failing + missing}, {}, {}
    for label, kind, add in ladder:
        add = dict(add)
        arithmetic = add.pop("float32_arithmetic", False)
        knobs = dict(knobs, **add)
        refs[label] = ref = reference(s, golden_ranks, **knobs)
        for q in failing + missing:
            if explained[q] is not None:
                continue
            if arithmetic:
                fits = q in act and q in BOUND_KEYS and within_bound(act[q], [r[q] for r in ref],
                                                                     [r["bound_" + q] for r in ref])
            else:
                fits = q in act and within_tolerance(act[q], [r[q] for r in ref], s["dtype"])
            if fits:
                explained[q] = label
    kinds = {label: kind for label, kind, _ in ladder}
    conv = [label for label, kind, _ in ladder if kind == "convention"]
    out = {"errors": errors, "errors_peer_convention": {}, "explained": explained}
    if conv:
        last = refs[conv[-1]]
        out["errors_peer_convention"] = {q: normwise(act[q], [r[q] for r in last]) for q in failing}
    still = [q for q in failing + missing if explained[q] is None or kinds[explained[q]] == "defect"]
    if still and ladder and ladder[-1][1] == "defect":
        last = refs[ladder[-1][0]]
        out["errors_as_implemented"] = {q: normwise(act[q], [r[q] for r in last]) for q in still if q in act}
    accuracy = [q for q in failing if explained[q] is not None and kinds[explained[q]] == "accuracy"]
    out["verdict"] = ("pass" if not failing and not missing else "defect" if still else
                      "accuracy" if accuracy else "convention")
    return out


def describe(explained, names, unexplained="off under every convention tried (numerical defect)"):
    """The note of a scenario: which quantities each rung explains ({label: text} in ``names``)."""
    if not explained:
        return "every quantity within verify's tolerance"
    parts = []
    for label, text in names.items():
        qs = [q for q, lab in explained.items() if lab == label]
        if qs:
            parts.append(f"{', '.join(qs)}: {text}")
    rest = [q for q, lab in explained.items() if lab is None]
    if rest:
        parts.append(f"{', '.join(rest)}: {unexplained}")
    return "; ".join(parts)


def column_cell(judged, note):
    """The scenario entry of a column file: docs/conformance.md shows "defect (accuracy)" for a
    "defect" whose note starts with "accuracy", so that is how an "accuracy" verdict is written."""
    verdict = judged["verdict"]
    if verdict == "accuracy":
        verdict, note = "defect", "accuracy: " + note
    cell = {"verdict": verdict, "errors": judged["errors"],
            "errors_peer_convention": judged["errors_peer_convention"]}
    if "errors_as_implemented" in judged:
        cell["errors_as_implemented"] = judged["errors_as_implemented"]
    cell["note"] = note
    return cell


def write_json(path, doc):
    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (float, np.floating)):
            return json_number(float(o))
        return o
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean(doc), f, indent=2, allow_nan=False)
        f.write("\n")


def scenarios_to_run(golden, scenarios):
    """(manifest, names): the golden set's manifest and the scenarios asked for
    (a comma-separated string, or None for all)."""
    with open(os.path.join(golden, "manifest.json")) as f:
        manifest = json.load(f)
    return manifest, scenarios.split(",") if scenarios else list(manifest["scenarios"])


def recorded_run(golden, out, json_only, script, argv, make):
    """An adapter's run record, OUT/run.json: read back with --json-only (to
    re-score without re-running), else {"command": ..., **make()} written there."""
    os.makedirs(out, exist_ok=True)
    record = os.path.join(out, "run.json")
    if json_only:
        with open(record) as f:
            return json.load(f)
    command = (f"python -m mpibn golden --out {golden} && {sys.executable} "
               + " ".join([os.path.relpath(os.path.abspath(script))] + list(argv or sys.argv[1:])))
    run = {"command": command, **make()}
    with open(record, "w") as f:
        json.dump(run, f, indent=2)
    return run
