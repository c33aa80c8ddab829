"""Layer state and checkpoints: checked on load, atomic on disk.

The state of a ``SyncBatchNorm`` is its four parameters, keyed by their
MindSpore names: ``gamma``, ``beta``, ``mean`` (moving mean) and
``variance`` (moving variance), each an array (C,) of the layer's dtype.

* ``state_dict(layer)`` / ``load_state_dict(layer, state)`` (also methods of
  the layer): copies out; loading checks every name, shape, dtype and value
  first and changes nothing unless all pass (the error lists every
  difference).
* ``save_checkpoint(layer, path)``, ``load_checkpoint(path)`` and
  ``load_param_into_net(layer, params)``, shaped like MindSpore's functions.

File format: an ``.npz`` archive (no pickle: loading uses
``allow_pickle=False``, so a checkpoint cannot run code) holding one array
per parameter name plus ``__mpibn_format__`` = FORMAT_VERSION.

Writing is atomic: the archive goes to a temporary file in the target's
directory, is flushed and fsync'ed, then ``os.replace``-d over the target
(and the directory fsync'ed). A writer that dies or raises midway leaves
the previous checkpoint intact; at worst a stale ``.<name>.*.tmp`` file.

Who writes: ``save_checkpoint`` communicates nothing. Only the rank whose
rank in the layer's parent communicator is ``rank`` (default 0) writes;
the others return at once, so calling it on every rank or only on the
writer are both safe. With ``process_groups``, different groups hold
different moving statistics: pass ``rank=None`` (every calling rank
writes) with a path per rank or per group. A rank that reads a checkpoint
another rank wrote must synchronise first (e.g. ``comm.Barrier()``).
"""
import os
import tempfile

import numpy as np

from .parameter import Parameter

__all__ = ["FORMAT_VERSION", "state_dict", "load_state_dict", "save_checkpoint", "load_checkpoint",
           "load_param_into_net"]

#: Version of the on-disk format; a file with a larger number is refused.
FORMAT_VERSION = 1
FORMAT_KEY = "__mpibn_format__"


def _params(layer):
    return {p.name: p for p in layer.get_parameters()}


def state_dict(layer):
    """{name: copy of the parameter's array (C,)}, in the layer's order."""
    return {name: p.data.copy() for name, p in _params(layer).items()}


def _as_array(value):
    # a Parameter (its .data) or an array (whose own .data is a memoryview)
    return value if isinstance(value, np.ndarray) else getattr(value, "data", value)


def state_differences(layer, state, *, cast=False, missing_ok=False, unexpected_ok=False):
    """Sentences for everything in ``state`` that cannot be loaded, or [].

    Names must match the layer's parameter names; each value must be a
    NumPy array (or Parameter) of shape (C,), of the layer's dtype (any
    float dtype when ``cast``), finite, and the variance non-negative.
    """
    params = _params(layer)
    diffs = []
    missing = [n for n in params if n not in state]
    unexpected = [n for n in state if n not in params]
    if missing and not missing_ok:
        diffs.append(f"missing {missing}")
    if unexpected and not unexpected_ok:
        diffs.append(f"unexpected {unexpected} (the layer has {list(params)})")
    for name, p in params.items():
        if name not in state:
            continue
        value = _as_array(state[name])
        if not isinstance(value, np.ndarray):
            diffs.append(f"{name}: expected a numpy.ndarray, got {type(value).__name__}")
            continue
        if value.shape != p.data.shape:
            diffs.append(f"{name}: shape {value.shape} in the state, {p.data.shape} in the layer")
        float_ok = value.dtype in (np.float16, np.float32, np.float64)
        if value.dtype != p.data.dtype and not (cast and float_ok):
            diffs.append(f"{name}: dtype {value.dtype} in the state, {p.data.dtype} in the layer")
        if float_ok and not np.isfinite(value).all():
            diffs.append(f"{name}: holds NaN or Inf")
        elif float_ok and name == "variance" and (value < 0).any():
            diffs.append(f"{name}: holds negative variances")
    return diffs


def _load(layer, state, **checks):
    diffs = state_differences(layer, state, **checks)
    if diffs:
        raise ValueError(f"cannot load state into {layer!r}, nothing was changed: " + "; ".join(diffs))
    # Every check passed: now copy in place (arrays held elsewhere stay valid).
    for name, p in _params(layer).items():
        if name in state:
            np.copyto(p.data, _as_array(state[name]), casting="unsafe")


def load_state_dict(layer, state):
    """Load ``state`` (as from ``state_dict``) into ``layer``: all or nothing.

    Raises ValueError, with the layer unchanged, listing every missing or
    unexpected name and every wrong shape, dtype or non-finite value.
    """
    _load(layer, state)


def load_param_into_net(layer, params, strict_load=False):
    """MindSpore-style load of ``params`` ({name: Parameter or array}).

    Returns (param_not_load, ckpt_not_load): the layer's parameter names
    absent from ``params``, and the names in ``params`` the layer lacks.
    Shapes must match and values be finite. ``strict_load=False`` (the
    MindSpore default) tolerates missing and extra names and casts between
    float dtypes; ``strict_load=True`` refuses all three. Nothing changes
    when it raises ValueError.
    """
    lax = not strict_load
    _load(layer, params, cast=lax, missing_ok=lax, unexpected_ok=lax)
    names = _params(layer)
    return [n for n in names if n not in params], [n for n in params if n not in names]


def _write_arrays(fileobj, arrays):
    # One place that writes bytes, so tests can make it fail midway.
    np.savez(fileobj, **arrays)


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:           # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _about(exc, path):
    """``exc`` (an OSError met on the temporary file) retold about ``path``, the
    file the caller asked for: same type and errno, so ``except`` clauses still
    match; the temporary name means nothing to the caller."""
    if exc.errno is None:
        return type(exc)(f"cannot write checkpoint {path!r}: {exc}")
    return type(exc)(exc.errno, f"cannot write checkpoint ({exc.strerror})", path)


def atomic_save(path, arrays):
    """Write ``arrays`` as an .npz at ``path``: all of it, or nothing changes.

    An OSError names ``path`` (the original error, naming the temporary
    file, is its ``__cause__``)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise _about(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            _write_arrays(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp made it 0600
        os.replace(tmp, path)                # atomic on POSIX and Windows
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _about(exc, path) from exc
        raise
    _fsync_dir(directory)                    # make the rename itself durable


def save_checkpoint(layer, path, *, rank=0):
    """Write the layer's state to ``path`` (.npz) if this rank is the writer.

    ``rank``: the writing rank in the layer's parent communicator (default
    0), or None for "this rank writes". Communicates nothing. Returns True
    on the rank that wrote, False elsewhere.
    """
    size = layer.comm.Get_size()
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < size:
            raise ValueError(f"rank must be None or an int in [0, {size}), got {rank!r}")
        if layer.comm.Get_rank() != rank:
            return False
    arrays = state_dict(layer)
    arrays[FORMAT_KEY] = np.array(FORMAT_VERSION)
    atomic_save(path, arrays)
    return True


def load_checkpoint(path):
    """{name: Parameter} from a file written by ``save_checkpoint``.

    Raises ValueError for a file that is not an mpibn checkpoint, is
    truncated, or was written by a newer format version.
    """
    try:
        with np.load(os.fspath(path), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable mpibn checkpoint ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:                 # zipfile.BadZipFile and friends
        raise ValueError(f"{path}: not a readable mpibn checkpoint ({type(exc).__name__}: {exc})") from exc
    version = arrays.pop(FORMAT_KEY, None)
    if version is None or version.shape != () or version.dtype.kind not in "iu":
        raise ValueError(f"{path}: not an mpibn checkpoint (no {FORMAT_KEY} entry)")
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {int(version)} is newer than this mpibn's "
                         f"{FORMAT_VERSION}; upgrade mpibn to read it")
    return {name: Parameter(data, name, requires_grad=name in ("gamma", "beta")) for name, data in arrays.items()}
