"""``python -m mpibn verify GOLDEN RESULTS``: compare another backend with mpibn.

RESULTS has the golden layout (``RESULTS/<scenario>/rank<r>.npz``) with the
output keys the manifest lists for each scenario (``y``, ``dx``, ``dgamma``,
...; inputs are not needed). For every scenario and quantity, over all
ranks, it prints::

    max abs   max |r - e|
    max rel   max |r - e| / max |e|        (normwise: elementwise relative
                                            error means nothing where e = 0)
    max ulps  distance in units in the last place of the RESULT's dtype,
              after rounding mpibn's value to that dtype
    pass      max abs <= atol + rtol * max |e|   (and max ulps <= --max-ulps if given)

rtol defaults to 32 eps of the result's dtype (float16 9.8e-4, float32
1.2e-7, float64 2.2e-16 before the factor), or of the scenario's dtype for
y and dx when that is the less precise (a bfloat16 scenario: eps 7.8e-3;
its arrays are stored as float32, which holds bfloat16 values exactly). NaN in both places counts as
equal. Exit status: 0 all pass, 1 some quantity fails or nothing was
compared, 2 unusable input (a missing or malformed file or key, an unknown
scenario or quantity, named in the message).
"""
import json
import os
import zipfile

import numpy as np

from .errors import is_bfloat16
from .golden import FORMAT, FORMAT_VERSION, array_dtype

#: Quantities in the scenario's (input) dtype; the rest are float64 in the golden files.
IN_SCENARIO_DTYPE = ("y", "dx")

__all__ = ["VerifyError", "load_manifest", "load_npz", "compare", "compare_quantity", "QuantityResult",
           "verify", "format_table"]


class VerifyError(Exception):
    """A golden or results file (or key) is missing or malformed."""


def load_manifest(golden):
    path = os.path.join(golden, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise VerifyError(f"{path}: no such file (is {golden!r} a directory written by "
                          f"'python -m mpibn golden'?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerifyError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VerifyError(f"{path}: key 'format' must be {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise VerifyError(f"{path}: key 'format_version' is {manifest.get('format_version')!r}; "
                          f"this mpibn reads version {FORMAT_VERSION}")
    for key in ("ranks", "scenarios"):
        if key not in manifest:
            raise VerifyError(f"{path}: missing key {key!r}")
    return manifest


def load_npz(path, keys, missing_ok=False):
    """{key: array} for ``keys`` from an .npz file; VerifyError naming file and key."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {k: npz[k] for k in keys if k in npz.files}
    except FileNotFoundError:
        raise VerifyError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise VerifyError(f"{path}: not a readable .npz file ({exc})") from None
    for k in keys:
        if k not in found and not missing_ok:
            raise VerifyError(f"{path}: missing key {k!r}")
    return found


def _ulps(a, b):
    """Elementwise ulp distance between arrays of one float dtype (int64)."""
    itype = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    top = np.int64(1) << (8 * a.dtype.itemsize - 1)
    ia, ib = a.view(itype).astype(np.int64), b.view(itype).astype(np.int64)
    ia = np.where(ia < 0, -(ia + top), ia)       # sign-magnitude -> monotone line
    ib = np.where(ib < 0, -(ib + top), ib)
    return np.abs(ia - ib)


def _is_float(dtype):
    return dtype.kind == "f" or is_bfloat16(dtype)


def coarser(a, b):
    """The less precise of two float dtypes (the larger eps)."""
    return a if np.finfo(a).eps >= np.finfo(b).eps else b


def compare(expected, result, dtype=None):
    """(max_abs, max_abs_expected, max_ulps, dtype) of result against expected, NaN==NaN.

    ``dtype``: the precision to judge in when it is coarser than the result's
    (a bfloat16 scenario's y stored as float32); ulps are counted in it."""
    rdtype = result.dtype if _is_float(result.dtype) else np.dtype(np.float64)
    if dtype is not None:
        rdtype = coarser(np.dtype(dtype), rdtype)
    e64, r64 = expected.astype(np.float64), result.astype(np.float64)
    both_nan = np.isnan(e64) & np.isnan(r64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(both_nan | (e64 == r64), 0.0, np.abs(r64 - e64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    scale = np.abs(np.where(np.isfinite(e64), e64, 0.0)).max(initial=0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        ulps = _ulps(expected.astype(rdtype), result.astype(rdtype))
    ulps = np.where(both_nan, 0, ulps)
    return float(diff.max(initial=0.0)), float(scale), int(ulps.max(initial=0)), rdtype


class QuantityResult:
    """One quantity over all ranks: ``compare_quantity``'s verdict and measures."""

    def __init__(self, per_rank, dtype, tolerance, passed):
        self.per_rank = per_rank                   # [(max_abs, max_abs_expected, max_ulps)] by rank
        self.dtype = np.dtype(dtype)
        self.max_abs = max((p[0] for p in per_rank), default=0.0)
        self.scale = max((p[1] for p in per_rank), default=0.0)
        self.max_ulps = max((p[2] for p in per_rank), default=0)
        self.max_rel = self.max_abs / self.scale if self.scale > 0 else self.max_abs
        self.tolerance, self.passed = tolerance, passed


def compare_quantity(pairs, rtol=None, atol=0.0, max_ulps=None, dtype=None):
    """Compare one quantity over all ranks: ``pairs`` = [(expected, result)] by rank.

    Normwise over the ranks together: pass when max |r - e| <= atol + rtol *
    max |e| (rtol default 32 eps of the result's dtype) and, if given, max
    ulps <= ``max_ulps``. The one comparison of ``verify`` and
    ``mpibn.testing.assert_matches``. ``dtype``: judge in this precision when
    it is coarser than the result's (``compare``).
    """
    per_rank, dt = [], np.dtype(np.float64)
    for expected, result in pairs:
        d, s, u, dt = compare(expected, result, dtype)
        per_rank.append((d, s, u))
    res = QuantityResult(per_rank, dt, 0.0, True)
    res.tolerance = (32 * np.finfo(dt).eps if rtol is None else rtol) * res.scale + atol
    res.passed = res.max_abs <= res.tolerance and (max_ulps is None or res.max_ulps <= max_ulps)
    return res


def scenario_dtype(s):
    """A manifest scenario's input dtype; VerifyError for bfloat16 without ml_dtypes."""
    try:
        return array_dtype(s.get("dtype", "float64"))
    except ImportError:
        raise VerifyError(f"scenario {s.get('name')!r} is {s.get('dtype')}: its tolerance needs "
                          f"ml_dtypes (pip install ml_dtypes)") from None
    except TypeError:
        raise VerifyError(f"scenario {s.get('name')!r}: unknown dtype {s.get('dtype')!r}") from None


def verify(golden, results, scenarios=None, quantities=None, rtol=None, atol=0.0, max_ulps=None,
           skip_missing=False):
    """Rows [scenario, quantity, dtype, max_abs, max_rel, max_ulps, status] and overall ok."""
    manifest = load_manifest(golden)
    table = manifest["scenarios"]
    names = scenarios or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise VerifyError(f"{os.path.join(golden, 'manifest.json')}: no scenario(s) {unknown}; "
                          f"it has {list(table)}")
    rows, ok = [], True
    for name in names:
        keys = [q for q in table[name]["outputs"] if quantities is None or q in quantities]
        if skip_missing and not os.path.isdir(os.path.join(results, name)):
            rows += [[name, k, "-", None, None, None, "missing"] for k in keys]
            continue
        pairs = {k: [] for k in keys}                 # (expected, result) per rank
        for rank in range(manifest["ranks"]):
            rel = os.path.join(name, f"rank{rank}.npz")
            exp = load_npz(os.path.join(golden, rel), keys)
            res = load_npz(os.path.join(results, rel), keys, missing_ok=skip_missing)
            for k in res:
                if res[k].shape != exp[k].shape:
                    raise VerifyError(f"{os.path.join(results, rel)}: key {k!r} has shape {res[k].shape}, "
                                      f"expected {exp[k].shape}")
                if res[k].dtype.kind not in "fiu":
                    raise VerifyError(f"{os.path.join(results, rel)}: key {k!r} has dtype {res[k].dtype}, "
                                      f"expected a number type (store bfloat16 as float32)")
                pairs[k].append((exp[k], res[k]))
        for k in keys:
            if not pairs[k]:
                rows.append([name, k, "-", None, None, None, "missing"])
                continue
            q = compare_quantity(pairs[k], rtol=rtol, atol=atol, max_ulps=max_ulps,
                                 dtype=scenario_dtype(table[name]) if k in IN_SCENARIO_DTYPE else None)
            ok &= q.passed
            rows.append([name, k, q.dtype.name, q.max_abs, q.max_rel, q.max_ulps,
                         "pass" if q.passed else "FAIL"])
    return rows, ok


def format_table(rows, markdown=False):
    head = ["scenario", "quantity", "dtype", "max abs", "max rel", "max ulps", "result"]

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2e}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in body]
    return "\n".join(line.rstrip() for line in lines)
