"""Reading a golden set safely: the manifest and the .npz files, checked before they are trusted.

``python -m mpibn verify`` compares files it did not write, so every one of
them is checked against the format before a number is compared: the
manifest (``load_manifest``: types, a known format version, scenario names
that are plain names, never paths) and then every file against the manifest
(``check_arrays``: the shape and dtype of each key). A problem is a
``VerifyError`` whose message is one line naming the file and the field or
key; the command line turns it into exit status 2, never a traceback.
"""
import json
import math
import numbers
import os

import numpy as np

from .golden import FORMAT, FORMAT_VERSION, INPUT_KEYS, OUTPUT_KEYS

__all__ = ["VerifyError", "FLOAT_DTYPES", "load_manifest", "check_manifest", "load_npz", "read_npz",
           "unknown_keys", "check_arrays", "expected_shape", "is_plain_name"]

#: The scenario dtypes a golden set may ask for.
FLOAT_DTYPES = ("float16", "float32", "float64")
#: Per-sample outputs: (steps, n_r, C[, H, W]) in the scenario's dtype; the rest are (steps, C) float64.
SAMPLE_KEYS = ("y", "dx")


class VerifyError(Exception):
    """A golden or results file (or a field or key in it) is missing or malformed."""


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def is_plain_name(name):
    """A scenario name that is a file name and nothing else: no separator, not '.', '..' or absolute."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(s in name for s in seps)
            and "\0" not in name and not os.path.isabs(name) and not os.path.splitdrive(name)[0])


def _list_of(test):
    return lambda v: isinstance(v, list) and all(test(x) for x in v)


# field -> (test, what it must be); optional fields are checked only when present.
_TOP = {
    "ranks": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "scenarios": (lambda v: isinstance(v, dict) and len(v) > 0, "a non-empty object {name: scenario}"),
}
_TOP_OPTIONAL = {
    "mpibn_version": (lambda v: isinstance(v, str), "a string"),
    "default_dtype": (lambda v: v in FLOAT_DTYPES, f"one of {list(FLOAT_DTYPES)}"),
    "statistics_mode": (lambda v: isinstance(v, str), "a string"),
    "input_keys": (_list_of(lambda x: isinstance(x, str)), "a list of strings"),
    "conventions": (lambda v: isinstance(v, dict), "an object"),
}
_SCENARIO = {
    "dtype": (lambda v: v in FLOAT_DTYPES, f"one of {list(FLOAT_DTYPES)}"),
    "outputs": (lambda v: (isinstance(v, list) and len(v) > 0 and len(set(map(str, v))) == len(v)
                           and all(x in OUTPUT_KEYS for x in v)),
                f"a non-empty list of distinct output keys from {list(OUTPUT_KEYS)}"),
    "tail": (lambda v: isinstance(v, list) and len(v) in (1, 3) and all(_is_int(x) and x >= 1 for x in v),
             "[C] or [C, H, W], positive integers"),
}
_SCENARIO_OPTIONAL = {
    "description": (lambda v: isinstance(v, str), "a string"),
    "process_groups": (lambda v: v is None or _list_of(_list_of(_is_int))(v), "null or a list of lists of ranks"),
    "offset": (_is_number, "a finite number"),
    "scale": (_is_number, "a finite number"),
    "eps": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "momentum": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "training": (lambda v: isinstance(v, bool), "true or false"),
    "use_batch_statistics": (lambda v: v is None or isinstance(v, bool), "null, true or false"),
    "exact": (lambda v: isinstance(v, bool), "true or false"),
    "seed": (_is_int, "an integer"),
    "constant_channels": (_list_of(_is_int), "a list of channel indices"),
    "groups_of_rank": (_list_of(_list_of(_is_int)), "a list (one per rank) of lists of ranks"),
}


def _check_fields(obj, required, optional, where, path):
    for key, (test, what) in required.items():
        if key not in obj:
            raise VerifyError(f"{path}: field {where}{key!r} is missing; it must be {what}")
    for key, (test, what) in list(required.items()) + list(optional.items()):
        if key in obj and not test(obj[key]):
            raise VerifyError(f"{path}: field {where}{key!r} must be {what}, got {obj[key]!r:.80}")


def check_manifest(manifest, path):
    """Raise VerifyError (one line naming ``path`` and the field) unless ``manifest`` is a valid one."""
    if not isinstance(manifest, dict):
        raise VerifyError(f"{path}: the manifest must be a JSON object, got a {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise VerifyError(f"{path}: field 'format' must be {FORMAT!r}, got {manifest.get('format')!r:.80}")
    version = manifest.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise VerifyError(f"{path}: field 'format_version' is {version!r:.80}; this mpibn reads version "
                          f"{FORMAT_VERSION}")
    _check_fields(manifest, _TOP, _TOP_OPTIONAL, "", path)
    ranks = manifest["ranks"]
    for name, s in manifest["scenarios"].items():
        if not is_plain_name(name):
            raise VerifyError(f"{path}: scenario name {name!r:.80} in field 'scenarios' is not a plain name "
                              f"(no path separator, not '.', '..' or absolute): it names files")
        where = f"scenarios[{name!r}]."
        if not isinstance(s, dict):
            raise VerifyError(f"{path}: field {where[:-1]} must be an object, got {s!r:.80}")
        _check_fields(s, _SCENARIO, _SCENARIO_OPTIONAL, where, path)
        shards = s.get("shards")
        if not (isinstance(shards, list) and len(shards) == ranks and all(_is_int(n) and n >= 0 for n in shards)):
            raise VerifyError(f"{path}: field {where}'shards' must list {ranks} sample counts >= 0 (one per "
                              f"rank, 'ranks' is {ranks}), got {shards!r:.80}")
        files = [f"{name}/rank{r}.npz" for r in range(ranks)]
        if "files" in s and s["files"] != files:
            raise VerifyError(f"{path}: field {where}'files' must be {files!r:.120}, got {s['files']!r:.120}")
        if "name" in s and s["name"] != name:
            raise VerifyError(f"{path}: field {where}'name' is {s['name']!r:.80}, not the scenario's key")
    return manifest


def load_manifest(golden):
    """The manifest of the golden directory ``golden``, validated (``check_manifest``)."""
    path = os.path.join(golden, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise VerifyError(f"{path}: no such file (is {golden!r} a directory written by "
                          f"'python -m mpibn golden'?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise VerifyError(f"{path}: not valid JSON ({str(exc)[:120]})") from None
    except OSError as exc:
        raise VerifyError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return check_manifest(manifest, path)


def load_npz(path, keys, missing_ok=False):
    """{key: array} for those of ``keys`` in an .npz file (``read_npz`` without the names)."""
    return read_npz(path, keys, missing_ok)[0]


def read_npz(path, keys, missing_ok=False):
    """{key: array} for those of ``keys`` in an .npz file, and the names of every key it holds.

    VerifyError naming the file (and the key) when it cannot be read or, unless
    ``missing_ok``, lacks one of ``keys``.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            found = {k: npz[k] for k in keys if k in names}
    except FileNotFoundError:
        raise VerifyError(f"{path}: no such file") from None
    except Exception as exc:        # noqa: BLE001 - any way a file is unreadable is the same answer
        raise VerifyError(f"{path}: not a readable .npz file ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not missing_ok:
        for k in keys:
            if k not in found:
                unknown = unknown_keys(names)
                hint = f" (it has unknown key(s) {unknown}: a misspelling?)" if unknown else ""
                raise VerifyError(f"{path}: missing key {k!r}{hint}")
    return found, names


def unknown_keys(names):
    """The names that are neither inputs nor outputs of the golden format (misspellings show here)."""
    return [n for n in names if n not in INPUT_KEYS and n not in OUTPUT_KEYS]


def expected_shape(manifest, scenario, rank, key):
    """The shape of ``key`` in rank ``rank``'s file of ``scenario`` as the manifest describes it."""
    s = manifest["scenarios"][scenario]
    if key in SAMPLE_KEYS:
        return (manifest["steps"], s["shards"][rank]) + tuple(s["tail"])
    return (manifest["steps"], s["tail"][0])


def check_arrays(manifest, scenario, rank, arrays, path, golden):
    """VerifyError unless every array has the manifest's shape and a float dtype.

    ``golden``: the golden file's own dtypes are checked too (y and dx in the
    scenario's dtype, the rest float64, as ``python -m mpibn golden`` writes
    them); a result may use any float dtype (too little precision is a
    failure of the comparison, with its reason, not unusable input).
    """
    dtype = np.dtype(manifest["scenarios"][scenario]["dtype"])
    for key, a in arrays.items():
        shape = expected_shape(manifest, scenario, rank, key)
        if a.shape != shape:
            raise VerifyError(f"{path}: key {key!r} has shape {a.shape}, the manifest says {shape} (steps "
                              f"{manifest['steps']}, shards[{rank}], tail)")
        if golden:
            want = dtype if key in SAMPLE_KEYS else np.dtype(np.float64)
            if a.dtype.newbyteorder("=") != want:
                raise VerifyError(f"{path}: key {key!r} has dtype {a.dtype}, the golden format says {want} "
                                  f"(scenario dtype {dtype})")
        elif a.dtype.kind != "f":
            raise VerifyError(f"{path}: key {key!r} has dtype {a.dtype}; results must be floating point "
                              f"(the scenario asks for {dtype})")
