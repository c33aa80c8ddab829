"""mpibn.testing: the in-process reference is bitwise the layer under mpiexec; assert_matches.

The MPI tests (``mpiexec -n 4 ... --with-mpi``) run the real SyncBatchNorm
on COMM_WORLD, gather every rank's results, and compare them bit for bit
with ``reference`` called on all shards in one process, on every rank.
"""
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn import golden as G
from mpibn.testing import QUANTITIES, assert_matches, reference

WORLD = MPI.COMM_WORLD
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shards(seed, sizes, tail, dtype):
    rng = np.random.default_rng(seed)
    xs = [(3.0 + 2.0 * rng.standard_normal((n,) + tail)).astype(dtype) for n in sizes]
    dys = [rng.standard_normal((n,) + tail).astype(dtype) for n in sizes]
    return xs, dys


def layer_steps(comm, x_steps, dy_steps, steps, **kw):
    """Run the real layer for ``steps`` training steps on this rank: per step a dict of results."""
    c = x_steps[0].shape[1]
    rng = np.random.default_rng(7)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c)
    bn = SyncBatchNorm(c, gamma_init=gamma, beta_init=beta, moving_mean_init=np.full(c, 2.5),
                       moving_var_init=np.full(c, 3.0), comm=comm, **kw)
    bn.set_train(True)
    out = []
    try:
        for t in range(steps):
            y = bn(x_steps[t])
            dx = bn.backward(dy_steps[t])
            out.append(dict(y=y, dx=dx, dgamma=bn.gamma.grad, dbeta=bn.beta.grad, batch_mean=bn.batch_mean,
                            batch_var=bn.batch_var, moving_mean=bn.moving_mean.data.copy(),
                            moving_var=bn.moving_variance.data.copy()))
    finally:
        bn.close()
    return out, gamma, beta


def reference_steps(xs_steps, dys_steps, gamma, beta, c, **kw):
    """The same steps with mpibn.testing.reference, moving statistics carried over."""
    mm, mv, out = np.full(c, 2.5), np.full(c, 3.0), []
    kw.setdefault("dtype", np.float32)    # layer_steps' layer has the layer's default; reference's follows xs
    for xs, dys in zip(xs_steps, dys_steps):
        res = reference(xs, dys, gamma=gamma, beta=beta, moving_mean=mm, moving_var=mv, **kw)
        mm, mv = [r.moving_mean for r in res], [r.moving_var for r in res]
        out.append(res)
    return out


def assert_bitwise(layer, ref):
    for key in QUANTITIES:
        a, b = np.asarray(layer[key]), np.asarray(getattr(ref, key))
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        assert a.tobytes() == b.tobytes(), (key, np.abs(a.astype(np.float64) - b).max())


CASES = {
    # name: (shard sizes for P ranks, tail, input dtype, process_groups)
    "groups_outside_uneven_empty": (lambda p: [0 if r == 1 else 1 + 2 * r for r in range(p)], (3, 4, 4),
                                    np.float32, lambda p: [list(range(p - 1))]),
    "two_groups_2d": (lambda p: [2 + r for r in range(p)], (5,), np.float32,
                      lambda p: [list(range(0, p, 2)), list(range(1, p, 2))]),
    "whole_world_float16": (lambda p: [3] * p, (3, 2, 2), np.float16, lambda p: None),
    "float64_empty_last": (lambda p: [4] * (p - 1) + [0], (2, 3, 3), np.float64, lambda p: [list(range(p))]),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_is_bitwise_the_layer_under_mpiexec(case, exact):
    size, rank = WORLD.Get_size(), WORLD.Get_rank()
    sizes_of, tail, dtype, groups_of = CASES[case]
    sizes, groups = sizes_of(size), groups_of(size)
    if groups is not None and any(len(g) == 0 for g in groups):
        groups = [g for g in groups if g]
    steps = 2
    per_step = [shards(100 + t, sizes, tail, dtype) for t in range(steps)]
    layer, gamma, beta = layer_steps(WORLD, [p[0][rank] for p in per_step], [p[1][rank] for p in per_step],
                                     steps, process_groups=groups, exact=exact)
    ref = reference_steps([p[0] for p in per_step], [p[1] for p in per_step], gamma, beta, tail[0],
                          process_groups=groups, exact=exact)
    WORLD.Barrier()                    # every collective done before the first assert
    for t in range(steps):
        assert_bitwise(layer[t], ref[t][rank])


def test_reference_is_bitwise_the_layer_on_one_rank():
    xs, dys = shards(3, [5], (4, 3, 3), np.float32)
    for exact in (False, True):
        layer, gamma, beta = layer_steps(MPI.COMM_SELF, [xs[0], xs[0][::-1].copy()], [dys[0], dys[0]], 2,
                                         exact=exact)
        ref = reference_steps([xs, [xs[0][::-1].copy()]], [dys, dys], gamma, beta, 4, exact=exact)
        for t in range(2):
            assert_bitwise(layer[t], ref[t][0])


def golden_reference(s, size):
    """reference() on golden scenario ``s``'s shards: its two steps, moving statistics carried over."""
    data = [G.inputs(s, r) for r in range(size)]
    mm, mv, out = data[0]["moving_mean0"], data[0]["moving_var0"], []
    for step in range(G.STEPS):
        res = reference([d["x"][step] for d in data], [d["dy"][step] for d in data],
                        process_groups=s.process_groups, gamma=data[0]["gamma"], beta=data[0]["beta"],
                        moving_mean=mm, moving_var=mv, eps=s.eps, momentum=s.momentum, training=s.training,
                        use_batch_statistics=s.use_batch_statistics, exact=s.exact, dtype=np.float64)
        mm, mv = [r.moving_mean for r in res], [r.moving_var for r in res]
        out.append(res)
    return out


def assert_golden_bitwise(s, layer_files, ref):
    """The layer's golden outputs (one dict per rank) against golden_reference's, bit for bit."""
    for r, files in enumerate(layer_files):
        for key in s.outputs():
            for step in range(G.STEPS):
                a, b = files[key][step], np.asarray(getattr(ref[step][r], key))
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (s.name, r, key, step)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("exact", [False, True])
def test_reference_is_bitwise_the_layer_on_every_golden_scenario(exact, dtype):
    # The layer under mpiexec writes the golden files; rank 0 checks reference() against all of them.
    # Not wide_c2048 in exact mode: its exact sums over 2048 channels take seconds on 4 simulated
    # ranks (the default mode and the one-rank test below have that shape).
    size = WORLD.Get_size()
    table = {name: s for name, s in G.scenarios(size, dtype, exact=exact).items()
             if not (exact and name == "wide_c2048")}
    gathered = {name: WORLD.gather(G.run_scenario(WORLD, s), root=0) for name, s in table.items()}
    if WORLD.Get_rank() == 0:
        for name, s in table.items():
            assert_golden_bitwise(s, gathered[name], golden_reference(s, size))


def test_reference_is_bitwise_the_layer_on_every_golden_scenario_one_rank():
    for exact in (False, True):
        for s in G.scenarios(1, "float32", exact=exact).values():
            assert_golden_bitwise(s, [G.run_scenario(MPI.COMM_SELF, s)], golden_reference(s, 1))


def test_reference_runs_the_layer(monkeypatch):
    # One copy of the per-step code: every simulated rank is a SyncBatchNorm that runs forward and backward.
    calls = []
    for method in ("construct", "backward"):
        real = getattr(SyncBatchNorm, method)
        monkeypatch.setattr(SyncBatchNorm, method, lambda self, a, real=real, method=method: calls.append(
            (method, self.group_comm.rank, self.group_comm.size, 2 * self._serial)) or real(self, a))
    xs, dys = shards(4, [2, 0, 3], (2,), np.float32)
    res = reference(xs, dys, process_groups=[[0, 1]])
    assert sorted(calls) == [("backward", 0, 1, 2), ("backward", 0, 2, 2), ("backward", 1, 2, 2),
                             ("construct", 0, 1, 2), ("construct", 0, 2, 2), ("construct", 1, 2, 2)]
    assert res[1].dgamma.dtype == np.float32 and QUANTITIES is G.OUTPUT_KEYS


def test_reference_values_against_the_concatenated_batch():
    # Independent check of the simulated group: the textbook formulas on the group's batch.
    from oracle import plain_batch_norm
    xs, dys = shards(5, [3, 0, 1, 4], (3,), np.float64)
    res = reference(xs, dys, process_groups=[[0, 1, 2]], dtype=np.float64)
    y, dx, mean, var = plain_batch_norm(np.concatenate(xs[:3]), np.concatenate(dys[:3]), np.ones(3),
                                        np.zeros(3), 1e-5)
    np.testing.assert_allclose(np.concatenate([r.y for r in res[:3]]), y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.concatenate([r.dx for r in res[:3]]), dx, rtol=1e-12, atol=1e-12)
    for r in res[:3]:
        np.testing.assert_allclose(r.batch_var, var, rtol=1e-14)
        np.testing.assert_allclose(r.moving_var, 0.9 + 0.1 * var * 4 / 3, rtol=1e-14)
    y3, _, mean3, var3 = plain_batch_norm(xs[3], dys[3], np.ones(3), np.zeros(3), 1e-5)   # rank 3 alone
    np.testing.assert_allclose(res[3].y, y3, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(res[3].moving_mean, 0.1 * mean3, rtol=1e-14)
    assert [r.dgamma.dtype for r in res] == [np.float64] * 4


def test_reference_forward_only_eval_and_per_rank_moving_statistics():
    xs, _ = shards(6, [2, 3], (2,), np.float32)
    fwd = reference(xs)                           # layer defaults: float32 parameters
    assert fwd[0].dx is None and fwd[0].y.dtype == np.float32 and fwd[0].moving_var.dtype == np.float32
    mm = [np.array([1.0, 2.0]), np.array([3.0, 4.0])]
    # Per-rank moving statistics: ranks in separate groups (the ranks of one group hold the same).
    ev = reference(xs, xs, training=False, moving_mean=mm, moving_var=np.array([4.0, 4.0]),
                   process_groups=[[0], [1]])
    assert ev[0].batch_mean is None and np.array_equal(ev[1].moving_mean, np.float32([3, 4]))
    np.testing.assert_allclose(ev[1].y, (xs[1] - np.float32([3, 4])) / np.sqrt(4 + 1e-5), rtol=1e-6)


def test_reference_errors_name_the_argument():
    with pytest.raises(ValueError, match="xs must hold one array per simulated rank"):
        reference([])
    with pytest.raises(ValueError, match=r"dys must hold one array per rank like xs \(2\), got 1"):
        reference([np.ones((2, 3))] * 2, [np.ones((2, 3))])
    with pytest.raises(ValueError, match="rank id 5"):
        reference([np.ones((2, 3))] * 2, process_groups=[[0, 5]])
    # The layer's own agreed error, raised (once) and not hung: 1 value per channel.
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        reference([np.ones((1, 3)), np.ones((0, 3))])
    # No channel: the layer cannot be built (num_features=0), in any mode.
    for training in (True, False):
        with pytest.raises(ValueError, match="num_features must be at least 1, got 0"):
            reference([np.ones((2, 0))] * 2, training=training)


# -- assert_matches ---------------------------------------------------------------------------

def test_assert_matches_passes_within_verify_tolerance_and_fails_with_a_table():
    xs, dys = shards(8, [3, 2, 4], (3, 2, 2), np.float32)
    ref = reference(xs, dys)
    assert_matches(ref, ref)
    near = [dict(vars(r)) for r in ref]
    near[1]["y"] = np.nextafter(near[1]["y"], np.float32(np.inf))           # 1 ulp: within 32 eps
    assert_matches(near, ref)
    with pytest.raises(AssertionError):
        assert_matches(near, ref, max_ulps=0)
    bad = [dict(vars(r)) for r in ref]
    bad[2]["dx"] = bad[2]["dx"] * np.float32(1.001)
    with pytest.raises(AssertionError) as info:
        assert_matches(bad, ref)
    msg = str(info.value)
    lines = msg.splitlines()
    assert lines[1].split() == ["quantity", "rank", "max", "abs", "max", "rel", "max", "ulps"]
    rows = {tuple(l.split()[:2]): l.split() for l in lines[3:7]}
    assert lines[7].startswith("dx: max abs") and "> tolerance" in lines[7]          # why, in words
    assert set(rows) == {("dx", "0"), ("dx", "1"), ("dx", "2"), ("dx", "all")}
    assert float(rows[("dx", "0")][2]) == 0.0 and float(rows[("dx", "2")][2]) > 0
    rel = float(rows[("dx", "all")][3])
    assert 1e-4 < rel <= 1.001e-3 and int(rows[("dx", "2")][4]) > 1000
    assert_matches(bad, ref, rtol=1e-2)                      # a loose rtol accepts it


def test_assert_matches_and_verify_share_one_comparison(tmp_path):
    # The same numbers give the same verdict and measures through verify's file path.
    from mpibn import golden as G
    from mpibn.verify import compare_quantity, verify
    out = str(tmp_path / "g")
    G.write(out, MPI.COMM_SELF, ["uneven"])
    res = str(tmp_path / "r")
    os.makedirs(os.path.join(res, "uneven"))
    with np.load(os.path.join(out, "uneven", "rank0.npz")) as f:
        data = {k: f[k] for k in f.files}
    data["y"] = data["y"] * np.float32(1 + 1e-5)
    np.savez(os.path.join(res, "uneven", "rank0.npz"), **data)
    rows, ok = verify(out, res)
    row = next(r for r in rows if r[1] == "y")
    q = compare_quantity([(np.load(os.path.join(out, "uneven", "rank0.npz"))["y"], data["y"])], "float32")
    assert not ok and row[6] == "FAIL" and not q.passed
    assert (row[3], row[4], row[5]) == (q.max_abs, q.max_rel, q.max_ulps)


def test_assert_matches_rejects_mismatched_inputs():
    ref = reference([np.ones((2, 2)) * [[1, 2], [3, 4]]], dtype=np.float64)
    with pytest.raises(AssertionError, match="results for 2 ranks, expected 1"):
        assert_matches(ref * 2, ref)
    with pytest.raises(AssertionError, match=r"y of rank 0: shape \(1, 2\), expected \(2, 2\)"):
        assert_matches([{"y": ref[0].y[:1]}], ref)
    with pytest.raises(AssertionError, match="y: missing on rank 0"):       # never skipped
        assert_matches([{"y": None}], ref)
    with pytest.raises(AssertionError, match="no quantity to compare"):
        assert_matches([{"y": ref[0].y}], [{"y": None, "dtype": np.float64}])
    with pytest.raises(ValueError, match=r"quantities: unknown \['grad_x'\]"):
        assert_matches([{"y": ref[0].y}], ref, quantities=["grad_x"])
    with pytest.raises(TypeError, match="pass dtype="):                   # no reference: say the dtype
        assert_matches([{"y": ref[0].y}], [{"y": ref[0].y}])
    assert_matches([{"y": ref[0].y}], [{"y": ref[0].y}], dtype=np.float64)


# -- no MPI needed ----------------------------------------------------------------------------

def test_importing_mpibn_testing_does_not_import_mpi4py():
    code = ("import sys, numpy as np, mpibn.testing as t; "
            "r = t.reference([np.arange(6.).reshape(3, 2), np.ones((1, 2))], [np.ones((3, 2))] * 1 + [np.ones((1, 2))]); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; print(r[1].y.dtype)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_"))}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=env)
    assert run.returncode == 0 and run.stdout.strip() == "float64", run.stdout + run.stderr


@pytest.mark.system
@pytest.mark.skipif(WORLD.Get_size() > 1, reason="serial session only")
def test_reference_runs_in_a_venv_without_mpi4py(tmp_path):
    # A fresh venv whose only package is numpy (linked from this one) and mpibn (the checkout):
    # mpi4py cannot even be imported there.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    here = sysconfig.get_paths()["purelib"]
    import numpy
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    numpy_dir = os.path.dirname(numpy.__file__)
    for name in os.listdir(os.path.dirname(numpy_dir)):
        if name == "numpy" or name.startswith("numpy.libs") or name.startswith("numpy-"):
            os.symlink(os.path.join(os.path.dirname(numpy_dir), name), pkgs / name)
    os.symlink(os.path.join(ROOT, "mpibn"), pkgs / "mpibn")
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(str(pkgs) + "\n")
    code = ("import importlib.util, numpy as np\n"
            "assert importlib.util.find_spec('mpi4py') is None, 'mpi4py is importable'\n"
            "from mpibn.testing import reference, assert_matches\n"
            "xs = [np.arange(8, dtype=np.float32).reshape(4, 2), np.zeros((0, 2), np.float32), np.ones((3, 2), np.float32)]\n"
            "for exact in (False, True):\n"
            "    r = reference(xs, xs, process_groups=[[0, 1]], exact=exact)\n"
            "    assert_matches(r, r)\n"
            "print('ok', r[0].y[0].tolist())\n")
    run = subprocess.run([str(py), "-I", "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok"), run.stdout
    assert here != site


def test_example_backend_test_file_runs_and_passes(monkeypatch):
    # scripts/example_reference_test.py, its tests called here on the NumPy per-rank backend
    # (JAX is not a test dependency; in a JAX venv, pytest on the file uses pmap).
    import importlib.util
    monkeypatch.setenv("MPIBN_EXAMPLE_BACKEND", "numpy")
    spec = importlib.util.spec_from_file_location("example_reference_test",
                                                  os.path.join(ROOT, "scripts", "example_reference_test.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.BACKEND == "numpy"
    for sizes in ([3, 3, 3, 3], [1, 0, 5, 2]):
        example.test_sync_batch_norm_matches_mpibn(sizes)
    example.test_a_wrong_backend_is_caught()
    # The backend really is compared: a wrong eps in it fails assert_matches.
    xs = [np.ones((2, 3, 2, 2), np.float32) * np.arange(2, dtype=np.float32)[:, None, None, None]] * 2
    g, b, mm, mv = np.ones(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32), np.ones(3, np.float32)
    wrong = example.numpy_sync_bn(xs, xs, g, b, mm, mv, eps=1e-3, momentum=0.9)
    with pytest.raises(AssertionError, match="differ from the reference"):
        assert_matches(wrong, reference(xs, xs, gamma=g, beta=b, moving_mean=mm, moving_var=mv))
