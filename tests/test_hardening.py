"""Issue 10 (hardening), on one process: misuse gets a clear error, never a wrong number.

Each test names the item of issue 10 it covers. The same misuse across
ranks is in tests/test_hardening_mpi.py.
"""
import errno
import os
import warnings

import numpy as np
import pytest
from mpi4py import MPI

import mpibn
from mpibn import SyncBatchNorm
from mpibn import functional as F
from mpibn.comm import group_of, validate_process_groups
from mpibn.sync import sync_batch_norm, sync_batch_norm_backward
from conftest import global_batch
from oracle import plain_batch_norm

SELF = MPI.COMM_SELF
C = 3
# np.asmatrix warns that matrix is not recommended: that is the point of the test
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


def layer(**kw):
    kw.setdefault("comm", SELF)
    return SyncBatchNorm(C, **kw)


def batch(shape=(6, C, 2, 3), seed=0, dtype=np.float32):
    x, dy = global_batch(seed, shape, offset=2.0, scale=3.0)
    return x.astype(dtype), dy.astype(dtype)


# -- item 2: x changed in place between forward and backward ---------------------------

EDITS = {
    "x *= 10": lambda x: x.__imul__(10),
    "x[0] += 1": lambda x: x[0].__iadd__(1),
    "x[...] = other": lambda x: x.__setitem__(Ellipsis, np.random.default_rng(9).normal(size=x.shape)),
    "swap samples": lambda x: x.__setitem__([0, 1], x[[1, 0]]),
    "one element": lambda x: x.__setitem__((3, 1, 1, 2), x[3, 1, 1, 2] + 0.5),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_x_changed_in_place_before_backward_raises(edit, training):
    bn = layer().set_train(training)
    x, dy = batch()
    bn(x)
    EDITS[edit](x)
    with pytest.raises(RuntimeError, match=r"x was modified in place between forward\(\) and backward\(\)"):
        bn.backward(dy)
    assert bn.gamma.grad is None and bn.beta.grad is None


def test_one_unsampled_element_is_caught_in_training_only():
    # (6, 3, 2, 3): L = 6, sampled positions l = 0, 1, 3, 5; (h, w) = (0, 2) is l = 2.
    x, dy = batch()
    train = layer().set_train()
    train(x)
    x[3, 1, 0, 2] += 0.5
    with pytest.raises(RuntimeError, match="modified in place"):
        train.backward(dy)
    # eval compares the samples only (documented): the change goes unseen
    x, dy = batch()
    evaluating = layer()
    evaluating(x)
    x[3, 1, 0, 2] += 0.5
    evaluating.backward(dy)


def test_x_unchanged_or_copied_gives_the_right_dx():
    # Control: a copy passed to forward may be changed at will; and the
    # fingerprint does not fire on an untouched x (2-D, 4-D, strided).
    x, dy = batch()
    bn = layer(dtype=np.float64).set_train()
    x_ref = x.copy()
    bn(x.copy())
    x *= 10                              # the caller's own array: forward kept a copy
    dx = bn.backward(dy)
    x[...] = x_ref
    _, dx_ref, _, _ = plain_batch_norm(x_ref, dy, np.ones(C), np.zeros(C), 1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=2e-7, atol=1e-7)          # dx is float32, as x
    wide = np.random.default_rng(1).normal(size=(5, 2 * C)).astype(np.float32)
    for x_ in (x, x[:, :, ::2], wide[:, ::2]):
        bn(x_)
        bn.backward(np.ones_like(x_) * 0.5 + x_)       # no error


def test_a_strided_view_changed_through_its_base_is_caught():
    base = np.random.default_rng(2).normal(size=(5, 2 * C)).astype(np.float32)
    view = base[:, ::2]                 # as_ncl keeps it as a view: backward would read base's data
    bn = layer().set_train()
    bn(view)
    base[2] += 1.0
    with pytest.raises(RuntimeError, match="modified in place"):
        bn.backward(np.ones_like(view))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("copy_bytes", [0, None], ids=["sum-and-samples", "default"])
def test_fingerprint_sees_any_single_element_change(dtype, contiguous, copy_bytes, monkeypatch):
    from mpibn import fingerprint as fingerprint_module
    from mpibn.fingerprint import fingerprint
    if copy_bytes is not None:      # small arrays are copied whole by default; test the sum too
        monkeypatch.setattr(fingerprint_module, "_COPY_BYTES", copy_bytes)
    rng = np.random.default_rng(3)
    full = rng.normal(size=(7, 3, 11)).astype(dtype)
    x3 = full if contiguous else full[:, :, ::2]
    before = fingerprint(x3)
    for flat in rng.choice(x3.size, 40, replace=False):
        i = np.unravel_index(flat, x3.shape)
        old = x3[i]
        x3[i] = np.nextafter(old, dtype(np.inf))            # the smallest change there is
        assert fingerprint(x3) != before, i
        x3[i] = old
        assert fingerprint(x3) == before


# -- item 3: H or W = 0 ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, C, 0, 4), (2, C, 4, 0), (0, C, 0, 0)])
@pytest.mark.parametrize("exact", [False, True])
def test_zero_height_or_width_counts_zero_values(shape, exact):
    x = np.zeros(shape, np.float32)
    bn = layer(exact=exact)
    y = bn(x)                                        # eval: moving statistics, nothing to do
    dx = bn.backward(x)
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == np.float32
    assert (bn.gamma.grad == 0).all() and (bn.beta.grad == 0).all()
    bn.set_train()
    with pytest.raises(ValueError, match="expected more than 1 value per channel in training, got 0 "):
        bn(x)
    assert F.batch_norm_stats(F.as_ncl(x))[0] == 0


# -- item 5: unexpected exceptions, masked arrays, np.matrix -----------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["masked", "matrix"])
def test_masked_and_matrix_inputs_are_refused(kind, training):
    x, dy = batch(shape=(4, C))
    bad = np.ma.masked_array(x, mask=x > 3) if kind == "masked" else np.asmatrix(x)
    says = r"numpy\.ma\.MaskedArray; its mask would be ignored" if kind == "masked" else r"numpy\.matrix"
    bn = layer().set_train(training)
    with pytest.raises(TypeError, match=f"x is a {says}"):
        bn(bad)
    bn(x)
    with pytest.raises(TypeError, match=f"dy is a {says}"):
        bn.backward(np.ma.masked_array(dy) if kind == "masked" else np.asmatrix(dy))


def test_exception_deep_in_the_math_names_itself_and_chains(monkeypatch):
    def broken(x, *args, **kwargs):
        raise ZeroDivisionError("deep inside")
    monkeypatch.setattr(F, "batch_norm_stats", broken)
    bn = layer().set_train()
    before = [p.data.copy() for p in bn.get_parameters()]
    with pytest.raises(ZeroDivisionError, match="ZeroDivisionError raised in this rank's own computation") as info:
        bn(batch()[0])
    assert isinstance(info.value.__cause__, ZeroDivisionError) and str(info.value.__cause__) == "deep inside"
    assert all((p.data == b).all() for p, b in zip(bn.get_parameters(), before))


def test_library_exception_types_become_runtime_error(monkeypatch):
    class Odd(Exception):
        pass

    def broken(*a, **k):
        raise Odd("no")
    monkeypatch.setattr(F, "batch_norm_backward_reduce", broken)
    bn = layer().set_train()
    x, dy = batch()
    bn(x)
    with pytest.raises(RuntimeError, match="Odd raised in this rank's own computation") as info:
        bn.backward(dy)
    assert isinstance(info.value.__cause__, Odd)


# -- item 7: non-native byte order ------------------------------------------------------

@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_big_endian_input_is_accepted(dtype, training, exact):
    x, dy = batch(dtype=dtype)
    swapped = np.dtype(dtype).newbyteorder("S")
    results = []
    for xs, dys in ((x, dy), (x.astype(swapped), dy.astype(swapped))):
        bn = layer(exact=exact, dtype=np.float64).set_train(training)
        y = bn(xs)
        dx = bn.backward(dys)
        results.append((y, dx, bn.moving_mean.data.copy(), bn.gamma.grad))
    for native, other in zip(*results):
        assert other.dtype == native.dtype and other.dtype.isnative
        assert other.tobytes() == native.tobytes()
    assert results[0][0].dtype == dtype


# -- item 8, 9: process_groups [] and canonical order ------------------------------------

def test_empty_process_groups_list_is_refused():
    with pytest.raises(ValueError, match=r"process_groups is \[\], which names no group; pass None"):
        layer(process_groups=[])


def test_process_groups_in_any_order_are_the_same_partition():
    canon = validate_process_groups([[1, 0], [3, 2]], 4)
    assert canon == validate_process_groups([[2, 3], [0, 1]], 4) == ((0, 1), (2, 3))
    assert validate_process_groups([[3], [2, 0]], 4) == ((0, 2), (3,))


def test_group_of_a_rank():
    groups = validate_process_groups([[1, 0], [3]], 5)
    assert [group_of(r, groups) for r in range(5)] == [(0, 1), (0, 1), (2,), (3,), (4,)]


# -- item 11: the moving statistics overflow their dtype ---------------------------------

def test_float16_moving_variance_overflow_raises_and_changes_nothing():
    x = np.random.default_rng(4).normal(0, 1500, (8, C)).astype(np.float16)   # var ~ 2e6 > 65504
    bn = layer(dtype=np.float16).set_train()
    before = [p.data.copy() for p in bn.get_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # no NumPy overflow warning either
        with pytest.raises(FloatingPointError, match=r"the moving variance overflows float16 at channel\(s\) "
                                                     r"\[0, 1, 2\] \(largest finite 65504\); moving statistics "
                                                     r"left unchanged"):
            bn(x)
    assert all(p.data.tobytes() == b.tobytes() for p, b in zip(bn.get_parameters(), before))
    # nonfinite='propagate' stores the Inf, as asked
    loose = layer(dtype=np.float16, nonfinite="propagate").set_train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loose(x)
    assert np.isinf(loose.moving_variance.data).all()


# -- item 19: messages ------------------------------------------------------------------

def test_backward_without_forward_says_which_forward_was_missing():
    with pytest.raises(RuntimeError) as info:
        layer().backward(np.zeros((2, C), np.float32))        # eval mode
    assert "backward() was called without a forward() before it" in str(info.value)
    with pytest.raises(RuntimeError, match=r"without a training forward\(\) before it"):
        layer().set_train().backward(np.zeros((2, C), np.float32))


@pytest.mark.parametrize("training", [True, False])
def test_second_functional_backward_names_the_channel_count(training):
    x, dy = batch()
    y, saved = sync_batch_norm(x, np.ones(C), np.zeros(C), group_comm=None, training=training,
                               running_mean=np.zeros(C), running_var=np.ones(C))
    sync_batch_norm_backward(dy, saved)
    with pytest.raises(RuntimeError) as info:
        sync_batch_norm_backward(dy, saved)
    assert "SyncBatchNorm(num_features=3).backward" in str(info.value)
    assert "backward() was called twice for one forward()" in str(info.value)


def test_tags_number_layers_one_two_three():
    from mpibn.errors import describe_tag
    assert describe_tag((2, 1)) == "layer 1 forward call 1"
    assert describe_tag((5, 7)) == "layer 2 backward call 7"
    assert describe_tag((0, 0)) == "a stateless call"
    assert describe_tag((-1, -1)) == "a backward() with no forward()"


def test_failed_save_names_the_path_asked_for(tmp_path):
    bn = layer()
    missing = tmp_path / "no such dir" / "bn.ckpt"
    with pytest.raises(FileNotFoundError) as info:
        mpibn.save_checkpoint(bn, missing)
    assert str(missing) in str(info.value) and ".tmp" not in str(info.value)
    assert info.value.errno == errno.ENOENT and info.value.filename == str(missing)
    with pytest.raises(IsADirectoryError) as info:
        mpibn.save_checkpoint(bn, tmp_path)                      # a directory is in the way
    assert str(tmp_path) in str(info.value) and ".tmp" not in str(info.value)
    left = [f for f in os.listdir(tmp_path.parent) if f.startswith(f".{tmp_path.name}.")]
    assert left == []                                             # no temporary file left


def test_local_error_type_travels_by_name_through_the_row():
    from mpibn.errors import Problem
    for exc, expect in [(IndexError("i"), IndexError), (MemoryError(), MemoryError),
                        (UnicodeDecodeError("utf-8", b"x", 0, 1, "bad"), RuntimeError)]:
        sent = Problem.from_exception(exc)
        got = Problem.from_numbers(float(sent.code), [float(d) for d in sent.details])   # as the buffer holds them
        raised = got.exception(got.describe())
        assert type(raised) is expect
        assert str(raised).startswith(f"{type(exc).__name__} raised in this rank's own computation")


# -- item 1: the lockstep switch (its effect across ranks: tests/test_hardening_mpi.py) --------

def test_lockstep_argument_and_environment(monkeypatch):
    assert layer().lockstep is False
    monkeypatch.setenv("MPIBN_LOCKSTEP", "1")
    assert layer().lockstep is True and layer(lockstep=False).lockstep is False
    monkeypatch.setenv("MPIBN_LOCKSTEP", "maybe")
    with pytest.raises(ValueError, match="MPIBN_LOCKSTEP must be 1 or 0, got 'maybe'"):
        layer()
    with pytest.raises(TypeError, match="lockstep must be a bool or None, got str: 'yes'"):
        layer(lockstep="yes")


def test_lockstep_counts_eval_forwards_in_the_tag():
    x = batch()[0]
    plain, strict = layer(), layer(lockstep=True)
    for bn in (plain, strict):
        bn(x)                                  # eval
        bn.set_train()(x)
    assert plain._saved.tag[1] == 1 and strict._saved.tag[1] == 2
