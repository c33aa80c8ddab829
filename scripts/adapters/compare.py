#!/usr/bin/env python3
"""Several backends against one golden set, side by side (Markdown).

    python scripts/adapters/compare.py GOLDEN NAME=RESULTS [NAME=RESULTS ...] [--scenarios ...]

Each cell is the normwise relative error max|r - e| / max|e| of ``python -m
mpibn verify`` and its verdict at verify's default tolerance (32 eps of the
result's dtype); "-" where the backend could not run the scenario.
"""
import argparse
import sys

from mpibn.verify import verify


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("golden")
    parser.add_argument("results", nargs="+", metavar="NAME=RESULTS")
    parser.add_argument("--scenarios")
    parser.add_argument("--quantities")
    args = parser.parse_args(argv)
    names, tables = [], []
    for item in args.results:
        name, _, path = item.partition("=")
        rows, _ = verify(args.golden, path, scenarios=args.scenarios.split(",") if args.scenarios else None,
                         quantities=args.quantities.split(",") if args.quantities else None,
                         skip_missing=True)
        names.append(name)
        tables.append({(r[0], r[1]): r for r in rows})
    keys = list(tables[0])
    print("| scenario | quantity | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for key in keys:
        cells = []
        for t in tables:
            r = t.get(key)
            cells.append("-" if r is None or r[4] is None else f"{r[4]:.1e} {r[6]}")
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
