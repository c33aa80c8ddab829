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
import zipfile
import zlib

import numpy as np

from .parameter import Parameter
from .rounding import finfo

__all__ = ["FORMAT_VERSION", "MAX_CHANNELS", "state_dict", "load_state_dict", "save_checkpoint", "load_checkpoint",
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
        elif float_ok and value.shape == p.data.shape and value.dtype != p.data.dtype:
            # Checked after the cast: a float32 1e5 is finite, a float16 1e5 is inf.
            with np.errstate(over="ignore"):
                cast_value = value.astype(p.data.dtype)
            if not np.isfinite(cast_value).all():
                bad = np.flatnonzero(~np.isfinite(cast_value))
                diffs.append(f"{name}: overflows {p.data.dtype} when cast from {value.dtype} at index(es) "
                             f"{bad[:8].tolist()} (largest finite {float(finfo(p.data.dtype).max):g})")
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


#: Largest channel count ``load_checkpoint`` accepts unless told otherwise (8 MiB per float64 entry).
MAX_CHANNELS = 1 << 20
_PARAMETER_NAMES = ("gamma", "beta", "mean", "variance")
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def load_checkpoint(path, *, max_channels=MAX_CHANNELS):
    """{name: Parameter} from a file written by ``save_checkpoint``.

    Reads only what a checkpoint holds, and checks before it reads: the
    archive's entries must be known names (``gamma``, ``beta``, ``mean``,
    ``variance``, ``__mpibn_format__``), and each entry's .npy header (shape
    (C,) with C <= ``max_channels``, a float dtype; the format a scalar
    integer) is checked before a byte of its data is read. So a small file
    cannot make this allocate gigabytes (a compressed entry of zeros), and
    an unknown entry is refused, not read. Raises ValueError for a file that
    is not an mpibn checkpoint, is truncated or corrupt, holds unknown or
    oversized entries, or was written by a newer format version;
    FileNotFoundError when there is no file.
    """
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = _read_entries(path, archive, max_channels)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except ValueError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError) as exc:
        why = "not a zip (.npz) archive" if isinstance(exc, zipfile.BadZipFile) and "not a zip" in str(exc) \
            else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{path}: not a readable mpibn checkpoint ({why})") from exc
    return {name: Parameter(data, name, requires_grad=name in ("gamma", "beta")) for name, data in arrays.items()}


def _read_entries(path, archive, max_channels):
    """The checked arrays of an open archive: headers first, then data of known size."""
    entries = {}
    for info in archive.infolist():
        name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        entries[name] = info
    unknown = [n for n in entries if n not in _PARAMETER_NAMES and n != FORMAT_KEY]
    if FORMAT_KEY not in entries:
        raise ValueError(f"{path}: not an mpibn checkpoint (no {FORMAT_KEY} entry)")
    if unknown:
        raise ValueError(f"{path}: not a readable mpibn checkpoint (unknown entries {unknown[:8]}; a "
                         f"checkpoint holds {list(_PARAMETER_NAMES)} and {FORMAT_KEY}); nothing was read")
    version = _read_entry(path, archive, entries[FORMAT_KEY], FORMAT_KEY, max_channels)
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {int(version)} is newer than this mpibn's "
                         f"{FORMAT_VERSION}; upgrade mpibn to read it")
    arrays = {name: _read_entry(path, archive, info, name, max_channels)
              for name, info in entries.items() if name != FORMAT_KEY}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) > 1:
        raise ValueError(f"{path}: not a readable mpibn checkpoint (its parameters have different "
                         f"shapes: { {n: a.shape for n, a in arrays.items()} })")
    return arrays


def _read_entry(path, archive, info, name, max_channels):
    """One entry: its header checked, then exactly the bytes it announces, then the end."""
    with archive.open(info) as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError as exc:            # not a .npy header: numpy's words, with the path
            raise ValueError(f"{path}: not a readable mpibn checkpoint (entry {name!r}: {exc})") from None
        if name == FORMAT_KEY:
            expected = shape == () and dtype.kind in "iu" and dtype.itemsize <= 8
            want = "a scalar integer"
        else:
            expected = len(shape) == 1 and 1 <= shape[0] <= max_channels and \
                (dtype in _FLOATS or dtype.newbyteorder("=") in _FLOATS)
            want = f"shape (C,) with 1 <= C <= max_channels={max_channels}, float16, float32 or float64"
        if not expected:
            raise ValueError(f"{path}: not a readable mpibn checkpoint (entry {name!r}: shape {shape}, "
                             f"dtype {dtype}; expected {want}); its data was not read")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = f.read(size)
        if len(data) != size or f.read(1):
            raise ValueError(f"{path}: not a readable mpibn checkpoint (entry {name!r} holds "
                             f"{'less' if len(data) != size else 'more'} data than its header says)")
    return np.frombuffer(data, dtype).reshape(shape).astype(dtype.newbyteorder("="))
