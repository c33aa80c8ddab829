"""``python -m mpibn verify GOLDEN RESULTS``: compare another backend with mpibn.

RESULTS has the golden layout (``RESULTS/<scenario>/rank<r>.npz``) with the
output keys the manifest lists for each scenario (``y``, ``dx``, ``dgamma``,
...; inputs are not needed). For every scenario and quantity, over all
ranks, it prints::

    dtype     the scenario's dtype: the precision the backend was asked to
              compute in, where the tolerance comes from
    max abs   max |r - e|
    max rel   max |r - e| / max |e|        (normwise: elementwise relative
                                            error means nothing where e = 0)
    max ulps  distance in units in the last place of the scenario's dtype,
              after rounding both values to it
    pass      max abs <= atol + rtol * max |e|   (and max ulps <= --max-ulps if given)

rtol defaults to 32 eps of the SCENARIO's dtype (float16 9.8e-4, float32
1.2e-7, float64 2.2e-16 before the factor), never of the dtype a result is
stored in; every tolerance and error is computed in float64. Whatever the
tolerance, a quantity fails when a rank stores it with less precision than
the scenario's dtype, or has NaN or inf where mpibn's value is finite (or
the reverse); NaN in both places counts as equal. A quantity some rank
lacks is never a pass. The manifest and then every file are checked before
anything is compared (``mpibn.manifest``). Exit status: 0 all pass, 1 some
quantity fails or is missing, or nothing was compared, 2 unusable input (a
missing or malformed file, field or key, an unknown scenario or quantity,
named in the one-line message). The rules: docs/ground-truth.md.
"""
import os

import numpy as np

from .errors import is_bfloat16
from .rounding import finfo
from .manifest import (FLOAT_DTYPES, VerifyError, check_arrays, load_manifest, load_npz, read_npz,  # noqa: F401
                       scenario_dtype, unknown_keys)

__all__ = ["VerifyError", "load_manifest", "load_npz", "default_rtol", "compare", "compare_quantity",
           "QuantityResult", "verify", "verify_scenario", "VERDICT_RULE", "format_table", "summary", "ranks_text",
           "check_tolerances"]


#: What a conformance column records it was scored with (docs/conformance.md flags columns without it).
VERDICT_RULE = ("scenario dtype: 32 eps of the scenario's dtype (never the stored dtype), in float64; less "
                "precision, NaN/inf against finite values and missing quantities fail whatever the tolerance")


def default_rtol(dtype):
    """32 eps of ``dtype`` (64 u, u its unit roundoff), a float64 number."""
    return 32.0 * float(finfo(dtype).eps)


def _scenario_dtype(dtype):
    if isinstance(dtype, str) and dtype == "bfloat16":
        return scenario_dtype(dtype)            # ml_dtypes, imported only here
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d.name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float16, float32, float64 or bfloat16 (the precision the backend was asked "
                         f"to compute in), got {dtype!r}")
    return d


def check_tolerances(rtol, atol, max_ulps):
    """ValueError unless rtol and atol are numbers >= 0 (None: default) and max_ulps an int >= 0 or None."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is None and name == "rtol":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    if max_ulps is not None and (isinstance(max_ulps, bool) or not isinstance(max_ulps, (int, np.integer))
                                 or max_ulps < 0):
        raise ValueError(f"max_ulps must be an integer >= 0 or None, got {max_ulps!r}")


def _ulps(a, b):
    """Elementwise ulp distance between arrays of one float dtype (int64)."""
    itype = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    top = np.int64(1) << (8 * a.dtype.itemsize - 1)
    ia, ib = a.view(itype).astype(np.int64), b.view(itype).astype(np.int64)
    ia = np.where(ia < 0, -(ia + top), ia)       # sign-magnitude -> monotone line
    ib = np.where(ib < 0, -(ib + top), ib)
    return np.abs(ia - ib)


def _stored_problem(result, dtype):
    """Why ``result``'s dtype cannot hold an answer in ``dtype``, or None."""
    if result.dtype.kind != "f" and not is_bfloat16(result.dtype):
        return f"stored as {result.dtype}, not a floating-point type"
    if finfo(result.dtype).nmant < finfo(dtype).nmant:
        return (f"stored as {result.dtype}, less precision than the {dtype.name} the backend was asked to "
                f"compute in (the tolerance is {dtype.name}'s)")
    return None


def compare(expected, result, dtype):
    """One rank's (max_abs, max_abs_expected, max_ulps, problems) of ``result`` against ``expected``.

    Everything in float64 (no overflow): max |r - e| over the elements,
    max |e| over the finite expected elements, and the ulp distance in
    ``dtype`` (the precision asked for) after rounding both to it. NaN
    against NaN and equal infinities count as equal; any other element where
    either side is NaN or inf is an error of inf, and a problem (so is a
    result stored with less precision than ``dtype``), which fails whatever
    the tolerance.
    """
    dtype = _scenario_dtype(dtype)
    expected, result = np.asarray(expected), np.asarray(result)
    problems = [p for p in [_stored_problem(result, dtype)] if p]
    if is_bfloat16(result.dtype):
        result = result.astype(np.float32)          # exact; ml_dtypes' type has kind "V"
    if result.dtype.kind not in "fiub":
        return float("inf"), 0.0, float("inf"), problems
    e64, r64 = expected.astype(np.float64), result.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        same = (e64 == r64) | (np.isnan(e64) & np.isnan(r64))
        nonfinite = ~same & ~(np.isfinite(e64) & np.isfinite(r64))
        diff = np.where(same, 0.0, np.abs(r64 - e64))
        diff[nonfinite] = np.inf
        ulps = _ulps(e64.astype(dtype), r64.astype(dtype))
    ulps = np.where(same | nonfinite, 0, ulps)
    if nonfinite.any():
        i = np.flatnonzero(nonfinite.reshape(-1))
        where = np.unravel_index(i[0], e64.shape)
        what = ("NaN or inf where the reference is finite" if np.isfinite(e64.reshape(-1)[i[0]])
                else "not the reference's NaN or inf")
        problems.append(f"{len(i)} element(s) {what} (first at index {tuple(int(j) for j in where)}: "
                        f"expected {float(e64.reshape(-1)[i[0]])!r}, got {float(r64.reshape(-1)[i[0]])!r})")
    scale = float(np.abs(np.where(np.isfinite(e64), e64, 0.0)).max(initial=0.0))
    max_ulps = float("inf") if nonfinite.any() else int(ulps.max(initial=0))
    return float(diff.max(initial=0.0)), scale, max_ulps, problems


def ranks_text(ranks):
    """'rank 1', 'ranks 0, 2' or 'ranks 0-3' (runs of consecutive ranks joined)."""
    ranks = sorted(ranks)
    runs, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            runs.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(runs)


class QuantityResult:
    """One quantity over all ranks: ``compare_quantity``'s verdict, measures and reasons."""

    def __init__(self, per_rank, dtype, tolerance, rtol, missing, reasons):
        self.per_rank = per_rank        # [(max_abs, max_abs_expected, max_ulps)] by rank, None if missing
        self.dtype = np.dtype(dtype)    # the precision asked for: where the tolerance comes from
        present = [p for p in per_rank if p is not None]
        self.max_abs = max((p[0] for p in present), default=None)
        self.scale = max((p[1] for p in present), default=None)
        self.max_ulps = max((p[2] for p in present), default=None)
        self.max_rel = (None if self.max_abs is None else
                        self.max_abs / self.scale if self.scale > 0 else self.max_abs)
        self.tolerance, self.rtol = tolerance, rtol
        self.missing, self.reasons = list(missing), list(reasons)
        self.passed = False

    @property
    def status(self):
        """'pass', 'FAIL', or 'missing: rank 1' (never 'pass' while any rank lacks the quantity)."""
        if self.missing:
            return "missing: " + ranks_text(self.missing)
        return "pass" if self.passed else "FAIL"

    @property
    def note(self):
        """Why it did not pass, in words ('' when it passed)."""
        if self.passed:
            return ""
        parts = ([f"missing on {ranks_text(self.missing)}"] if self.missing else []) + self.reasons
        if self.max_abs is not None and self.max_abs > self.tolerance and not self.reasons:
            parts.append(f"max abs {self.max_abs:.3e} > tolerance {self.tolerance:.3e} (rtol {self.rtol:.3e}, "
                         f"{'32 eps of ' + self.dtype.name if self.rtol == default_rtol(self.dtype) else 'given'},"
                         f" x max|expected| {self.scale:.3e}, + atol)")
        return "; ".join(parts)


def compare_quantity(pairs, dtype, rtol=None, atol=0.0, max_ulps=None):
    """Compare one quantity over all ranks: ``pairs`` = [(expected, result or None)] by rank.

    ``dtype``: the precision the backend was asked to compute in (the
    scenario's dtype), never the dtype the result is stored in. Normwise over
    the ranks together: pass when no rank lacks the result (None), none
    stores it with less precision than ``dtype``, no NaN or inf stands where
    the reference has a finite value (or the reverse), max |r - e| <= atol +
    rtol * max |e| (rtol default 32 eps of ``dtype``; all in float64) and,
    if given, max ulps in ``dtype`` <= ``max_ulps``. The one comparison of
    ``verify`` and ``mpibn.testing.assert_matches``.
    """
    dtype = _scenario_dtype(dtype)
    check_tolerances(rtol, atol, max_ulps)
    rtol = default_rtol(dtype) if rtol is None else float(rtol)
    per_rank, missing, said = [], [], {}
    for r, (expected, result) in enumerate(pairs):
        if result is None:
            per_rank.append(None)
            missing.append(r)
            continue
        d, s, u, problems = compare(expected, result, dtype)
        per_rank.append((d, s, u))
        for p in problems:
            said.setdefault(p, []).append(r)
    reasons = [f"{ranks_text(ranks)}: {p}" for p, ranks in said.items()]     # each reason once
    res = QuantityResult(per_rank, dtype, 0.0, rtol, missing, reasons)
    scale = res.scale or 0.0
    res.tolerance = float(atol) + (rtol * scale if scale > 0 else 0.0)
    if max_ulps is not None and res.max_ulps is not None and res.max_ulps > max_ulps:
        res.reasons.append(f"max ulps {res.max_ulps} > max_ulps {max_ulps}")
    res.passed = (not missing and not res.reasons and res.max_abs is not None
                  and res.max_abs <= res.tolerance)
    return res


def _read_rank(manifest, golden, results, name, rank, keys, skip_missing):
    """(expected, result, all key names of the result file) for one rank, every array checked."""
    rel = os.path.join(name, f"rank{rank}.npz")
    gpath, rpath = os.path.join(golden, rel), os.path.join(results, rel)
    expected, _ = read_npz(gpath, keys)
    check_arrays(manifest, name, rank, expected, gpath, golden=True)
    if skip_missing and not os.path.exists(rpath):
        return expected, {}, []
    result, names = read_npz(rpath, keys, missing_ok=skip_missing)
    check_arrays(manifest, name, rank, result, rpath, golden=False)
    return expected, result, names


def verify_scenario(manifest, golden, results, name, quantities=None, rtol=None, atol=0.0, max_ulps=None,
                    skip_missing=False):
    """Rows [scenario, quantity, dtype, max_abs, max_rel, max_ulps, status, note] of one scenario.

    A key in a result file that is neither an input nor an output of the
    golden format gets a row of its own, status "unknown key" (so that a
    misspelling shows); it changes no verdict.
    """
    s = manifest["scenarios"][name]
    keys = [q for q in s["outputs"] if quantities is None or q in quantities]
    pairs, unknown = {k: [] for k in keys}, {}
    for rank in range(manifest["ranks"]):
        expected, result, names = _read_rank(manifest, golden, results, name, rank, keys, skip_missing)
        for k in unknown_keys(names):
            unknown.setdefault(k, []).append(rank)
        for k in keys:
            pairs[k].append((expected[k], result.get(k)))
    rows = []
    for k in keys:
        q = compare_quantity(pairs[k], s["dtype"], rtol=rtol, atol=atol, max_ulps=max_ulps)
        rows.append([name, k, s["dtype"], q.max_abs, q.max_rel, q.max_ulps, q.status, q.note])
    for k, ranks in unknown.items():
        rows.append([name, k, "-", None, None, None, "unknown key",
                     f"not compared ({ranks_text(ranks)}): {k!r} is no key of the golden format; a misspelling?"])
    return rows


def verify(golden, results, scenarios=None, quantities=None, rtol=None, atol=0.0, max_ulps=None,
           skip_missing=False):
    """Rows [scenario, quantity, dtype, max_abs, max_rel, max_ulps, status, note] and overall ok.

    The manifest is validated first, then every file against it (shapes,
    dtypes): a problem is a VerifyError naming the file and the field or key.
    ``dtype`` in the rows is the scenario's, the tolerance's dtype. Without
    ``skip_missing`` a missing results file or key is a VerifyError; with it,
    the row says "missing: rank r" for every rank that lacks it, and ok is
    False. ok is True only when every selected quantity of every selected
    scenario passes on every rank, and at least one was compared.
    """
    manifest = load_manifest(golden)
    path = os.path.join(golden, "manifest.json")
    try:
        check_tolerances(rtol, atol, max_ulps)
    except ValueError as exc:
        raise VerifyError(str(exc)) from None
    table = manifest["scenarios"]
    names = list(table) if scenarios is None else list(scenarios)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise VerifyError(f"{path}: no scenario(s) {unknown}; it has {list(table)}")
    if quantities is not None:
        known = sorted({q for entry in table.values() for q in entry["outputs"]})
        unknown = [q for q in quantities if q not in known]
        if unknown:
            raise VerifyError(f"{path}: no quantity(ies) {unknown}; it has {known}")
    rows = []
    for name in names:
        rows += verify_scenario(manifest, golden, results, name, quantities, rtol, atol, max_ulps, skip_missing)
    statuses = [r[6] for r in rows if r[6] != "unknown key"]
    ok = bool(statuses) and all(st == "pass" for st in statuses)
    return rows, ok


def format_table(rows, markdown=False):
    """The rows as a table, then one line per row that carries a note (why it failed, unknown keys)."""
    head = ["scenario", "quantity", "dtype", "max abs", "max rel", "max ulps", "result"]

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if v == float("inf") else f"{v:.2e}"
        return str(v)

    body = [[cell(v) for v in row[:7]] for row in rows]
    notes = [f"{row[0]} {row[1]}: {row[7]}" for row in rows if len(row) > 7 and row[7]]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines + ([""] + [f"* {n}" for n in notes] if notes else []))
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in body]
    return "\n".join([line.rstrip() for line in lines] + ([""] + notes if notes else []))


def summary(rows, ok):
    """(the closing line, exit status) for ``verify``'s rows: 0 only when everything passed."""
    statuses = [r[6] for r in rows if r[6] != "unknown key"]
    passed = statuses.count("pass")
    failed = statuses.count("FAIL")
    missing = sum(st.startswith("missing") for st in statuses)
    if passed + failed == 0:
        # Nothing checked is no evidence of agreement: never report success.
        return ("mpibn verify: nothing was compared (no selected quantity in the selected scenarios, or "
                "all of them missing); that is not a pass", 1)
    text = f"{passed} of {len(statuses)} quantities pass"
    text += f"; {failed} FAIL" if failed else ""
    text += f"; {missing} missing on some or all ranks (not a pass)" if missing else ""
    return text, (0 if ok else 1)
