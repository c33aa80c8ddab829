"""Issue 19, items 4-9: bad values that got through where the checks did not look.

One process (COMM_SELF); the same items across ranks are in
tests/test_failstop_mpi.py. Each test failed before the fix (c2ef9e9), as its
docstring says.
"""
import importlib.util
import os
import subprocess
import sys
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from mpi4py import MPI

import mpibn
from mpibn import SyncBatchNorm, load_checkpoint, load_param_into_net
from mpibn.checkpoint import FORMAT_KEY
from mpibn.comm import GroupComm, group_comm_for
from mpibn import sync_batch_norm
from mpibn.init import Normal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def layer(**kw):
    return SyncBatchNorm(3, comm=MPI.COMM_SELF, **kw).set_train()


def state(bn):
    return [p.data.tobytes() for p in bn.get_parameters()] + [
        None if p.grad is None else p.grad.tobytes() for p in bn.get_parameters()]


# -- item 4: NaN in dy -------------------------------------------------------------------------

@pytest.mark.parametrize("exact", [False, True])
def test_nan_in_dy_raises_naming_the_channel_and_changes_nothing(exact):
    """Before: no error; dx of channel 1 was NaN."""
    bn = layer(exact=exact)
    x = np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32)
    bn(x)
    before = state(bn)
    dy = np.ones_like(x)
    dy[2, 1, 0, 1] = np.nan
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in dy at rank 0 channel 1; no gradient"):
        bn.backward(dy)
    assert state(bn) == before
    dy[2, 1, 0, 1] = 0.0
    assert np.isfinite(bn.backward(dy)).all()           # the forward is still there
    propagate = layer(exact=exact, nonfinite="propagate")
    propagate(x)
    dy[2, 1, 0, 1] = np.nan
    assert np.isnan(propagate.backward(dy)[:, 1]).all()     # asked for: IEEE values through


# -- item 5: casts that overflow ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(gamma_init=1e40), dict(beta_init=np.full(3, -1e39)),
                                    dict(gamma_init=Normal(sigma=1e40, seed=1)),
                                    dict(moving_var_init=1e5, dtype=np.float16)],
                         ids=["number", "array", "initializer", "float16 variance"])
def test_initial_values_that_overflow_the_dtype_are_refused(kwargs):
    """Before: gamma_init=1e40 gave a float32 inf (while gamma_init=inf was refused)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # and no RuntimeWarning on the way
        with pytest.raises(ValueError, match=r"overflows float(16|32) at index\(es\) \[0, 1, 2\]"):
            layer(**kwargs)


def test_loading_a_value_that_overflows_the_layer_dtype_changes_nothing():
    """Before: a float32 moving variance of 1e5 loaded into a float16 layer as inf, and
    eval then gave 0 for that channel."""
    bn = layer(dtype=np.float16)
    before = state(bn)
    with pytest.raises(ValueError, match=r"variance: overflows float16 when cast from float32 at "
                                         r"index\(es\) \[1\].*nothing was changed|nothing was changed.*"
                                         r"variance: overflows float16"):
        load_param_into_net(bn, {"mean": np.zeros(3, np.float32),
                                 "variance": np.array([1.0, 1e5, 2.0], np.float32)})
    assert state(bn) == before
    assert load_param_into_net(bn, {"variance": np.array([1.0, 6e4, 2.0], np.float32)}) == \
        (["gamma", "beta", "mean"], [])                 # 6e4 fits float16: loaded


# -- item 6: checkpoints are read entry by entry, headers first ---------------------------------------

def npy_header(shape, dtype):
    import io
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": shape})
    return out.getvalue()


def write_npz(path, entries):
    """entries: name -> (header shape, dtype, data bytes, or (chunk, repeats) streamed)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, (shape, dtype, data) in entries.items():
            with z.open(name + ".npy", "w", force_zip64=True) as f:
                f.write(npy_header(shape, dtype))
                if isinstance(data, tuple):
                    chunk, repeats = data
                    for _ in range(repeats):
                        f.write(chunk)
                else:
                    f.write(data)


def good_entries(channels=3):
    return {FORMAT_KEY: ((), "<i8", np.array(1, "<i8").tobytes()),
            **{n: ((channels,), "<f4", np.ones(channels, "<f4").tobytes())
               for n in ("gamma", "beta", "mean", "variance")}}


@pytest.mark.parametrize("what", ["unknown entry", "oversized entry"])
def test_a_small_file_with_a_huge_compressed_entry_is_refused_without_reading_it(tmp_path, what):
    """Before: np.load read every entry first; a 256 MiB entry of zeros compressed into a
    small file raised peak memory by 256 MiB, and an unknown entry was loaded."""
    path = tmp_path / "bomb.npz"
    entries = good_entries()
    big = (np.zeros(1 << 20, np.uint8).tobytes(), 256)            # 256 MiB of zeros
    if what == "unknown entry":
        entries["payload"] = (((1 << 25),), "<f8", big)
        says = r"unknown entries \['payload'\]"
    else:
        entries["gamma"] = (((1 << 25),), "<f8", big)
        says = r"entry 'gamma': shape \(33554432,\), dtype float64; expected shape \(C,\) with 1 <= C <= max_channels"
    write_npz(path, entries)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=says):
            load_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_checkpoint_headers_are_checked_before_the_data(tmp_path):
    cases = {
        "2-D": ({"gamma": ((3, 1), "<f4", np.ones(3, "<f4").tobytes())}, r"entry 'gamma': shape \(3, 1\)"),
        "int": ({"mean": ((3,), "<i4", np.ones(3, "<i4").tobytes())}, r"entry 'mean': shape \(3,\), dtype int32"),
        "object": ({"beta": ((3,), "|O", b"")}, r"entry 'beta': shape \(3,\), dtype object"),
        "short": ({"variance": ((3,), "<f4", np.ones(2, "<f4").tobytes())}, "holds less data than its header"),
        "long": ({"variance": ((3,), "<f4", np.ones(4, "<f4").tobytes())}, "holds more data than its header"),
        "shapes": ({"variance": ((4,), "<f4", np.ones(4, "<f4").tobytes())}, "parameters have different shapes"),
        "version": ({FORMAT_KEY: ((2,), "<i8", np.ones(2, "<i8").tobytes())}, r"expected a scalar integer"),
    }
    for name, (change, says) in cases.items():
        path = tmp_path / f"{name}.npz"
        write_npz(path, {**good_entries(), **change})
        with pytest.raises(ValueError, match=says):
            load_checkpoint(path)
    write_npz(tmp_path / "ok.npz", good_entries())
    assert sorted(load_checkpoint(tmp_path / "ok.npz")) == ["beta", "gamma", "mean", "variance"]
    with pytest.raises(ValueError, match="max_channels=2"):
        load_checkpoint(tmp_path / "ok.npz", max_channels=2)


def test_a_text_file_is_not_a_checkpoint_and_pickle_is_not_suggested(tmp_path):
    """Before: 'Cannot load file containing pickled data when allow_pickle=False'."""
    path = tmp_path / "notes.txt"
    path.write_text("gamma = 1, 1, 1\n")
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert "not a zip (.npz) archive" in str(info.value) and "pickle" not in str(info.value)


# -- item 7: overflow is overflow ----------------------------------------------------------------------

def test_variance_overflow_is_named_with_no_warning():
    """Before: 'NaN or Inf in the training batch', and a RuntimeWarning."""
    bn = layer(dtype=np.float64)
    before = state(bn)
    x = np.random.default_rng(0).normal(size=(4, 3)) * 1e160
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FloatingPointError, match=r"the variance overflows float64 at rank 0 channel 0, "
                                                     r"rank 0 channel 1, rank 0 channel 2 \(x is finite"):
            bn(x)
        with pytest.raises(FloatingPointError, match=r"x is finite, but its sum overflows float64 at "
                                                     r"channel\(s\) \[0, 1, 2\]"):
            bn(np.full((4, 3), 1e308))
    assert state(bn) == before


# -- item 8: every MPIBN_* variable is checked like its argument ---------------------------------------

@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan"])
def test_debug_timeout_from_the_environment_is_checked_like_the_argument(monkeypatch, value):
    """Before: 0 and -1 were accepted (healthy ranks then 'never arrived'); 'abc' gave a bare
    float() error that named no variable."""
    monkeypatch.setenv("MPIBN_DEBUG_TIMEOUT", value)
    says = rf"MPIBN_DEBUG_TIMEOUT must be a number of seconds > 0 \(or unset\), got '{value}'"
    with pytest.raises(ValueError, match=says):
        layer()
    with pytest.raises(ValueError, match=says):
        group_comm_for(MPI.COMM_SELF, [[0]])
    with pytest.raises(ValueError, match=says):
        sync_batch_norm(np.ones((2, 3)), np.ones(3), np.zeros(3), group_comm=None)
    with pytest.raises(ValueError, match=r"debug_timeout must be a number of seconds > 0 or None, got 0"):
        layer(debug_timeout=0)
    monkeypatch.setenv("MPIBN_DEBUG_TIMEOUT", "2.5")
    assert GroupComm(None, (0,), 0).debug_timeout == 2.5


@pytest.mark.parametrize("variable, value, says", [
    ("MPIBN_LOCKSTEP", "maybe", "MPIBN_LOCKSTEP must be 1 or 0, got 'maybe'"),
    ("MPIBN_FAILSTOP_GRACE", "0", "MPIBN_FAILSTOP_GRACE must be a number of seconds > 0 or 'off', got '0'"),
    ("MPIBN_FAILSTOP_GRACE", "soon", "MPIBN_FAILSTOP_GRACE must be a number of seconds > 0 or 'off', got 'soon'"),
])
def test_other_variables_are_checked_and_named(monkeypatch, variable, value, says):
    from mpibn import env
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=says):
        env.lockstep() if variable == "MPIBN_LOCKSTEP" else env.failstop_grace()


def test_script_variables_are_checked_and_named():
    """Before: MPIBN_NP=abc gave int()'s traceback; MPIBN_EXAMPLE_BACKEND=tf ran the numpy backend."""
    out = subprocess.run([PY, os.path.join(ROOT, "scripts", "run.py"), "test"], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, MPIBN_NP="abc"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "run.py: MPIBN_NP must be an integer >= 1 (the ranks of the mpiexec stage), " \
                                 "got 'abc'", out.stderr
    spec = importlib.util.spec_from_file_location("example", os.path.join(ROOT, "scripts", "example_reference_test.py"))
    os.environ["MPIBN_EXAMPLE_BACKEND"] = "tf"
    try:
        with pytest.raises(ValueError, match="MPIBN_EXAMPLE_BACKEND must be 'jax' or 'numpy'"):
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        del os.environ["MPIBN_EXAMPLE_BACKEND"]


# -- item 9: smaller ones ---------------------------------------------------------------------------------

@pytest.mark.timeout(200)
@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own mpiexec")
def test_demo_far_from_zero_passes():
    """Before: --offset 1000 printed MISMATCH and exited 1 (an absolute 1e-13 on a mean of 1000)."""
    out = subprocess.run([PY, "-m", "mpibn", "demo", "--np", "4", "--offset", "1000"], capture_output=True,
                         text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0 and "MISMATCH" not in out.stdout, out.stdout + out.stderr
    assert "equal the concatenated batch's (to 1e-12 x max|x|/std = 1.0e-09)" in out.stdout, out.stdout


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="runs the command line itself")
def test_golden_out_that_is_a_file_is_one_clear_error(tmp_path):
    """Before: 4 tracebacks (NotADirectoryError) and an MPI abort."""
    target = tmp_path / "golden.txt"
    target.write_text("not a directory")
    for out in (target, target / "sub"):
        done = subprocess.run([PY, "-m", "mpibn", "golden", "--out", str(out)], capture_output=True,
                              text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 2 and "Traceback" not in done.stderr and "Abort" not in done.stderr
        assert "is a file, not a directory" in done.stderr.splitlines()[-1], done.stderr


def test_training_example_does_not_overwrite_the_committed_figure():
    """Before: the default --plot was docs/training.png of the checkout."""
    spec = importlib.util.spec_from_file_location("train", os.path.join(ROOT, "scripts", "train_data_parallel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build_parser().parse_args([]).plot == "training.png"


def test_bench_writes_into_the_current_directory_not_docs(tmp_path, monkeypatch):
    """Before: mpibn bench run from a checkout wrote docs/performance.json and .png."""
    from mpibn.cli.bench import default_out
    monkeypatch.chdir(ROOT)
    assert default_out(smoke=False) == ROOT          # the checkout's root, not its docs/
    monkeypatch.chdir(tmp_path)
    assert default_out(smoke=False) == str(tmp_path)


def test_bench_help_starts_with_a_sentence():
    """Before: 'mpibn bench``: how fast ...'."""
    out = subprocess.run([PY, "-m", "mpibn", "bench", "--help"], capture_output=True, text=True, timeout=60)
    description = out.stdout.split("\n\n")[1]
    assert out.returncode == 0 and description.startswith("How fast is mpibn's SyncBatchNorm") and \
        "``" not in out.stdout, out.stdout


@pytest.mark.parametrize("command", [
    [PY, "-c", "import numpy, mpibn; mpibn.SyncBatchNorm(3)"],
    [PY, "-m", "mpibn", "bench", "--smoke"],
], ids=["SyncBatchNorm", "bench --smoke"])
def test_no_mpi_library_is_one_clear_line(command, tmp_path):
    """Before: mpi4py's 'cannot load MPI library' with every libmpi path it tried."""
    env = dict(os.environ, MPI4PY_LIBMPI=str(tmp_path / "libmpi.so"))   # a library that is not there
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "mpibn needs an MPI library" in last and "pip install 'mpibn[mpich]'" in last, out.stderr
    assert "cannot open shared object file" not in out.stderr, out.stderr
    if "bench" in command:
        assert out.stderr.strip().count("\n") == 0, out.stderr       # exactly one line
    # ... while the math, and mpibn.testing, need no MPI at all:
    done = subprocess.run([PY, "-c", "import numpy as np, mpibn.testing as t, mpibn.functional as F; "
                                     "print(F.batch_norm_stats(np.ones((2, 3, 1)))[0])"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr
