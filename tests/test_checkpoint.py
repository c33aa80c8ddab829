"""State and checkpoints (mpibn.checkpoint): checked loads, atomic writes."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from mpi4py import MPI

import mpibn
from mpibn import SyncBatchNorm, checkpoint
from mpibn.checkpoint import FORMAT_KEY, FORMAT_VERSION

NAMES = ["gamma", "beta", "mean", "variance"]


def trained_layer(dtype=np.float32, seed=0, comm=MPI.COMM_SELF, channels=3, init_seed=None):
    """A layer whose four parameters all differ from their initial values.

    ``init_seed``: draw gamma and beta from their own seed (every rank of a
    synced layer must start from the same values); default: from ``seed``."""
    rng = np.random.default_rng(seed)
    init = rng if init_seed is None else np.random.default_rng(init_seed)
    bn = SyncBatchNorm(channels, dtype=dtype, comm=comm,
                       gamma_init=init.uniform(0.5, 2, channels), beta_init=init.normal(size=channels))
    bn.set_train()
    for _ in range(2):
        bn(rng.normal(3.0, 2.0, (5, channels)).astype(dtype))
    return bn


def snapshot(bn):
    return [p.data.copy() for p in bn.get_parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_state_dict_round_trip_is_bitwise_and_copies():
    src = trained_layer(seed=1)
    state = src.state_dict()
    assert list(state) == NAMES
    dst = SyncBatchNorm(3, comm=MPI.COMM_SELF)
    assert dst.moving_mean.data.tobytes() != src.moving_mean.data.tobytes()
    held = dst.moving_mean.data              # loading copies in place: references stay valid
    dst.load_state_dict(state)
    assert_bitwise(snapshot(dst), snapshot(src))
    assert dst.moving_mean.data is held
    state["mean"][:] = 99.0                  # the state is a copy
    assert not (src.moving_mean.data == 99.0).any()


@pytest.mark.parametrize("change, expected", [
    (lambda s: s.pop("variance"), "missing ['variance']"),
    (lambda s: s.update(extra=np.zeros(3, np.float32)), "unexpected ['extra']"),
    (lambda s: s.update(gamma=np.ones(4, np.float32)), "gamma: shape (4,) in the state, (3,) in the layer"),
    (lambda s: s.update(beta=np.zeros(3, np.float64)), "beta: dtype float64 in the state, float32 in the layer"),
    (lambda s: s.update(mean=np.array([0, np.nan, 0], np.float32)), "mean: holds NaN or Inf"),
    (lambda s: s.update(variance=np.array([1, -1, 1], np.float32)), "variance: holds negative variances"),
    (lambda s: s.update(gamma=[1.0, 1.0, 1.0]), "gamma: expected a numpy.ndarray, got list"),
])
def test_load_state_dict_refuses_and_changes_nothing(change, expected):
    bn = trained_layer(seed=2)
    before = snapshot(bn)
    state = trained_layer(seed=3).state_dict()
    change(state)
    with pytest.raises(ValueError) as info:
        bn.load_state_dict(state)
    assert expected in str(info.value)
    assert "nothing was changed" in str(info.value)
    assert_bitwise(snapshot(bn), before)


def test_load_state_dict_lists_every_difference():
    bn = trained_layer()
    state = {"gamma": np.ones(2, np.float32), "beta": np.zeros(3, np.float16), "mean": np.zeros(3, np.float32)}
    with pytest.raises(ValueError) as info:
        bn.load_state_dict(state)
    msg = str(info.value)
    for part in ("missing ['variance']", "gamma: shape (2,)", "beta: dtype float16"):
        assert part in msg


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_save_load_round_trip(tmp_path, dtype):
    bn = trained_layer(dtype)
    path = tmp_path / "bn.ckpt"
    assert mpibn.save_checkpoint(bn, path) is True
    params = mpibn.load_checkpoint(path)
    assert list(params) == NAMES
    assert [p.name for p in params.values()] == NAMES
    assert [p.requires_grad for p in params.values()] == [True, True, False, False]
    fresh = SyncBatchNorm(3, dtype=dtype, comm=MPI.COMM_SELF)
    assert mpibn.load_param_into_net(fresh, params) == ([], [])
    assert_bitwise(snapshot(fresh), snapshot(bn))
    with np.load(path, allow_pickle=False) as archive:     # plain arrays only, versioned
        assert int(archive[FORMAT_KEY]) == FORMAT_VERSION
        assert all(archive[n].dtype != object for n in archive.files)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_write_failing_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "bn.ckpt"
    old = trained_layer(seed=4)
    mpibn.save_checkpoint(old, path)
    first_bytes = path.read_bytes()

    def half_then_fail(fileobj, arrays):
        fileobj.write(first_bytes[: len(first_bytes) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_arrays", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        mpibn.save_checkpoint(trained_layer(seed=5), path)
    assert path.read_bytes() == first_bytes
    restored = SyncBatchNorm(3, comm=MPI.COMM_SELF)
    mpibn.load_param_into_net(restored, mpibn.load_checkpoint(path))
    assert_bitwise(snapshot(restored), snapshot(old))
    assert os.listdir(tmp_path) == ["bn.ckpt"]            # the temporary file was removed


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from mpi4py import MPI
    import mpibn
    from mpibn import checkpoint

    def die_midway(fileobj, arrays):
        fileobj.write(b"PK" + bytes(300))
        fileobj.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    bn = mpibn.SyncBatchNorm(3, comm=MPI.COMM_SELF)
    bn.moving_mean.data[:] = 7.0
    checkpoint._write_arrays = die_midway
    mpibn.save_checkpoint(bn, sys.argv[1])
""")


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="starts its own Python; run serially")
def test_writer_killed_midway_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "bn.ckpt"
    old = trained_layer(seed=6)
    mpibn.save_checkpoint(old, path)
    first_bytes = path.read_bytes()
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], timeout=60,
                           capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert path.read_bytes() == first_bytes
    stale = [f for f in os.listdir(tmp_path) if f != "bn.ckpt"]
    assert len(stale) == 1 and stale[0].startswith(".bn.ckpt.") and stale[0].endswith(".tmp")
    params = mpibn.load_checkpoint(path)
    assert params["mean"].data.tobytes() == old.moving_mean.data.tobytes()


def test_load_refuses_foreign_truncated_and_newer_files(tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, gamma=np.ones(3))
    with pytest.raises(ValueError, match="not an mpibn checkpoint"):
        mpibn.load_checkpoint(plain)

    good = tmp_path / "good.ckpt"
    mpibn.save_checkpoint(trained_layer(), good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable mpibn checkpoint"):
        mpibn.load_checkpoint(cut)

    newer = tmp_path / "newer.ckpt"
    np.savez(open(newer, "wb"), gamma=np.ones(3), **{FORMAT_KEY: np.array(FORMAT_VERSION + 1)})
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1} is newer"):
        mpibn.load_checkpoint(newer)

    pickled = tmp_path / "pickled.ckpt"
    np.savez(open(pickled, "wb"), gamma=np.array([{"x": 1}], dtype=object), **{FORMAT_KEY: np.array(1)})
    with pytest.raises(ValueError, match="not a readable mpibn checkpoint"):
        mpibn.load_checkpoint(pickled)

    with pytest.raises(FileNotFoundError):
        mpibn.load_checkpoint(tmp_path / "absent.ckpt")


def test_load_param_into_net_lax_and_strict():
    bn = SyncBatchNorm(3, comm=MPI.COMM_SELF)
    before = snapshot(bn)
    params = {"gamma": np.full(3, 2.0), "extra": np.zeros(3)}      # float64 into a float32 layer
    with pytest.raises(ValueError, match="missing .*unexpected .*gamma: dtype float64"):
        mpibn.load_param_into_net(bn, params, strict_load=True)
    assert_bitwise(snapshot(bn), before)
    assert mpibn.load_param_into_net(bn, params) == (["beta", "mean", "variance"], ["extra"])
    assert bn.gamma.data.dtype == np.float32 and (bn.gamma.data == 2.0).all()
    with pytest.raises(ValueError, match=r"shape \(2,\)"):        # shapes are never lax
        mpibn.load_param_into_net(bn, {"beta": np.zeros(2, np.float32)})


def test_writer_rank_argument(tmp_path):
    bn = trained_layer()
    with pytest.raises(ValueError, match=r"rank must be None or an int in \[0, 1\)"):
        mpibn.save_checkpoint(bn, tmp_path / "x.ckpt", rank=1)
    assert mpibn.save_checkpoint(bn, tmp_path / "y.ckpt", rank=None) is True
    assert os.listdir(tmp_path) == ["y.ckpt"]


@pytest.mark.mpi(min_size=2)
def test_one_rank_writes_every_rank_reads(mpi_tmp_path):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bn = trained_layer(comm=comm, seed=rank, init_seed=7)   # synced: the same moving stats everywhere
    path = mpi_tmp_path / "bn.ckpt"
    wrote = mpibn.save_checkpoint(bn, path, rank=size - 1)
    comm.Barrier()                                     # the reader waits for the writer
    params = mpibn.load_checkpoint(path)
    wrote_all = comm.allgather(wrote)
    bn.close()
    assert wrote_all == [r == size - 1 for r in range(size)]
    assert params["mean"].data.tobytes() == bn.moving_mean.data.tobytes()
    assert params["variance"].data.tobytes() == bn.moving_variance.data.tobytes()


@pytest.mark.mpi(min_size=4)
def test_per_rank_checkpoints_keep_each_groups_statistics(mpi_tmp_path):
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    bn = SyncBatchNorm(2, process_groups=[[0, 1], [2, 3]], comm=comm).set_train()
    bn(np.random.default_rng(rank).normal(rank, 1.0, (4, 2)).astype(np.float32))
    path = mpi_tmp_path / f"bn-rank{rank}.ckpt"
    mpibn.save_checkpoint(bn, path, rank=None)
    comm.Barrier()
    means = [mpibn.load_checkpoint(mpi_tmp_path / f"bn-rank{r}.ckpt")["mean"].data for r in range(4)]
    bn.close()
    assert means[0].tobytes() == means[1].tobytes()            # one group: bitwise equal
    assert means[2].tobytes() == means[3].tobytes()
    assert means[0].tobytes() != means[2].tobytes()            # two groups: different statistics
