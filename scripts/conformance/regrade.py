#!/usr/bin/env python3
"""Which cells changed grade between two versions of docs/conformance/*.json (Markdown table).

    python scripts/conformance/regrade.py BEFORE_REV [--dir docs/conformance]

BEFORE_REV is a git revision (the column files are read from it with ``git
show``); the current files are read from --dir. One row per cell whose
grade changed, and one per column that is new. docs/conformance/regrade.md
holds its output for the rubric's introduction, with the reasons.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402


def grade(entry, before=False):
    """The cell's grade as the report prints it, without the numbers (before the rubric, a
    "defect" whose note starts with "accuracy" was printed "defect (accuracy)")."""
    if entry is None:
        return "-"
    if before and entry.get("verdict") == "defect" and str(entry.get("note", "")).startswith("accuracy"):
        return "defect (accuracy)"
    return report.cell(entry).split("<br>")[0]


def old_columns(rev, directory):
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          cwd=directory, check=True).stdout.strip()
    rel = os.path.relpath(os.path.abspath(directory), root)
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{rel}"], capture_output=True, text=True,
                           cwd=root, check=True).stdout.split()
    out = {}
    for name in names:
        if name.endswith(".json"):
            text = subprocess.run(["git", "show", f"{rev}:{rel}/{name}"], capture_output=True, text=True,
                                  cwd=root, check=True).stdout
            doc = json.loads(text)
            out[doc.get("column", name[:-5])] = doc
    return out


def changes(before, after):
    rows = []
    for col, doc in after.items():
        if not doc.get("runnable", True):
            continue
        old = before.get(col)
        if old is None:
            rows.append((col, "(new column)", "-", f"{len(doc.get('scenarios') or {})} scenarios"))
            continue
        for name, entry in (doc.get("scenarios") or {}).items():
            was = grade((old.get("scenarios") or {}).get(name), before=True)
            now = grade(entry)
            if was != now:
                rows.append((col, name, was, now))
    return rows


def main(argv=None):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before")
    p.add_argument("--dir", default=os.path.join(root, "docs", "conformance"))
    args = p.parse_args(argv)
    rows = changes(old_columns(args.before, args.dir), report.load_columns(args.dir))
    print("| column | scenario | before | after |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
