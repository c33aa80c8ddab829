#!/usr/bin/env python3
"""Score one backend's results on a golden set: ``docs/conformance/<column>.json``.

    python scripts/conformance/column.py GOLDEN RESULTS --column torch-cpu --out docs/conformance/torch-cpu.json \\
        --framework "..." --convention "..." --versions torch=2.13.0 ... --command "..." \\
        [--peer-weights device] [--peer-moving-var biased] [--peer-stats-dtype float32] [--notes NOTES.json]

Per scenario (the format is described in docs/conformance.md, "Column
files"): the normwise relative error ||a - e||_2 / ||e||_2 over
all ranks (float64; the plain norm where ||e|| = 0; "inf" or "nan" as strings
where the backend gave non-finite numbers) of every quantity, against the
golden values; the verdict at ``mpibn verify``'s tolerance
(``mpibn.verify.compare_quantity``: max abs <= 32 eps of the SCENARIO's
dtype times max |e|, less precision than that or NaN/inf where mpibn is
finite failing whatever the tolerance; a quantity some rank lacks is a
defect): "pass" when every quantity passes; otherwise the failing
quantities are recomputed under the peer's convention
(``peer_convention.recompute`` with the --peer-* knobs) and scored again:
all pass there -> "convention", some still fail -> "defect". A scenario
with no results is "unsupported" (or what --notes says: {scenario: {"verdict",
"note"}} overrides, for crashes and scenarios a peer cannot express).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_convention import recompute  # noqa: E402

from mpibn.verify import VERDICT_RULE, compare_quantity, load_manifest, load_npz  # noqa: E402


def normwise(pairs):
    """||a - e||_2 / ||e||_2 over all ranks (plain norm when ||e|| = 0); float or 'inf'/'nan'."""
    e = np.concatenate([np.ravel(p[0]).astype(np.float64) for p in pairs])
    a = np.concatenate([np.ravel(p[1]).astype(np.float64) for p in pairs])
    if not np.isfinite(a).all() and np.isfinite(e).all():
        return "nan" if np.isnan(a).any() else "inf"
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where((e == a) | (np.isnan(e) & np.isnan(a)), 0.0, a - e)
    num, den = float(np.linalg.norm(d)), float(np.linalg.norm(e[np.isfinite(e)]))
    return num / den if den > 0 else num


def score_scenario(golden, results, name, s, peer):
    """(entry dict) for one scenario, or None when the backend wrote nothing for it."""
    if not os.path.isdir(os.path.join(results, name)):
        return None
    keys = s["outputs"]
    golden_files = [load_npz(os.path.join(golden, f), list(keys) + ["x", "dy", "gamma", "beta", "moving_mean0",
                                                                     "moving_var0"]) for f in s["files"]]
    result_files = [load_npz(os.path.join(results, f), keys, missing_ok=True) for f in s["files"]]
    errors, failing, missing = {}, [], []
    for k in keys:
        if not all(k in f for f in result_files):
            # Never silently skipped: a quantity some rank lacks is off under any convention.
            errors[k] = None
            missing.append(k)
            continue
        pairs = [(g[k], r[k]) for g, r in zip(golden_files, result_files)]
        errors[k] = normwise(pairs)
        if not compare_quantity(pairs, s["dtype"]).passed:
            failing.append(k)
    entry = {"verdict": "pass", "errors": errors}
    if not failing and not missing:
        return entry
    theirs = recompute(s, golden_files, **peer)
    peer_errors, still = {}, []
    for k in failing:
        pairs = [(theirs[r][k], result_files[r][k]) for r in range(len(result_files))]
        ref_finite = all(np.isfinite(p[0]).all() for p in pairs)
        # NaN under the peer's convention (e.g. the mean of an empty device's mean) is no match.
        peer_errors[k] = normwise(pairs) if ref_finite else "nan"

        if not ref_finite or not compare_quantity(pairs, s["dtype"]).passed:
            still.append(k)
    entry["errors_peer_convention"] = peer_errors
    entry["verdict"] = "defect" if still or missing else "convention"
    notes = [f"missing on some rank: {', '.join(missing)}"] if missing else []
    notes += ([f"off under both conventions: {', '.join(still)}"] if still else
              [f"matches under the peer's convention: {', '.join(failing)}"] if failing else [])
    entry["note"] = "; ".join(notes)
    return entry


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("golden")
    p.add_argument("results")
    p.add_argument("--column", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--framework", required=True)
    p.add_argument("--convention", required=True)
    p.add_argument("--versions", nargs="*", default=[], metavar="NAME=VERSION")
    p.add_argument("--command", required=True)
    p.add_argument("--peer-weights", choices=["group", "device"], default="group")
    p.add_argument("--peer-moving-var", choices=["unbiased", "biased"], default="unbiased")
    p.add_argument("--peer-stats-dtype", default=None)
    p.add_argument("--notes", help="JSON {scenario: {verdict, note}} overriding or annotating entries")
    args = p.parse_args(argv)
    from mpibn import __version__
    manifest = load_manifest(args.golden)
    peer = {"weights": args.peer_weights, "moving_var": args.peer_moving_var,
            "stats_dtype": np.dtype(args.peer_stats_dtype) if args.peer_stats_dtype else None}
    notes = {}
    if args.notes:
        with open(args.notes) as f:
            notes = json.load(f)
    scenarios = {}
    for name, s in manifest["scenarios"].items():
        entry = score_scenario(args.golden, args.results, name, s, peer)
        if entry is None:
            entry = {"verdict": "unsupported", "errors": {k: None for k in ("y", "dx", "batch_var", "moving_var")},
                     "note": "no results for this scenario"}
        extra = notes.get(name, {})
        if "verdict" in extra:
            entry["verdict"] = extra["verdict"]
        if "note" in extra:
            entry["note"] = (extra["note"] + ("; " + entry["note"] if entry.get("note") else ""))
        scenarios[name] = entry
    doc = {"column": args.column, "framework": args.framework, "runnable": True,
           "versions": dict(v.split("=", 1) for v in args.versions),
           "command": args.command,
           "golden": f"{manifest['format']} format_version {manifest['format_version']}, mpibn "
                     f"{manifest.get('mpibn_version')} ({manifest.get('statistics_mode')}), "
                     f"{manifest['ranks']} ranks; scored with mpibn {__version__}",
           "convention": args.convention, "verdict_rule": VERDICT_RULE,
           "peer_convention_recomputed": {k: (str(v) if v is not None else None) for k, v in peer.items()},
           "scenarios": scenarios}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    counts = {}
    for e in scenarios.values():
        counts[e["verdict"]] = counts.get(e["verdict"], 0) + 1
    print(f"{args.column}: {counts} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
