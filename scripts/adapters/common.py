"""Shared by the adapters: read a golden directory, write results in its layout.

An adapter runs another framework on the inputs of ``python -m mpibn golden``
and writes ``OUT/<scenario>/rank<r>.npz`` with the output keys, which
``python -m mpibn verify GOLDEN OUT`` then compares. Only NumPy and the
standard library here.
"""
import json
import os

import numpy as np


def load(golden):
    """(manifest, {scenario: [rank arrays dict, ...]})."""
    with open(os.path.join(golden, "manifest.json")) as f:
        manifest = json.load(f)
    data = {}
    for name, s in manifest["scenarios"].items():
        ranks = []
        for path in s["files"]:
            with np.load(os.path.join(golden, path)) as npz:
                ranks.append({k: npz[k] for k in npz.files})
        data[name] = ranks
    return manifest, data


def groups(scenario):
    """Distinct groups (tuples of ranks, in rank order) of a scenario."""
    return sorted({tuple(g) for g in scenario["groups_of_rank"]})


def uses_batch_statistics(scenario):
    ubs = scenario["use_batch_statistics"]
    return scenario["training"] if ubs is None else ubs


def concat(ranks, members, key, step):
    """The group's batch for one step: its ranks' arrays in rank order, and each rank's slice."""
    parts = [ranks[r][key][step] for r in members]
    ends = np.cumsum([0] + [p.shape[0] for p in parts])
    return np.concatenate(parts), {r: slice(ends[i], ends[i + 1]) for i, r in enumerate(members)}


def storable(a):
    """``a`` as a .npz file can hold it: bfloat16 (ml_dtypes, TensorFlow, JAX) as float32, which
    represents it exactly; everything else as it is."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "V" and a.dtype.name == "bfloat16" else a


def write(out, name, rank, arrays):
    os.makedirs(os.path.join(out, name), exist_ok=True)
    np.savez(os.path.join(out, name, f"rank{rank}.npz"), **{k: storable(v) for k, v in arrays.items()})
