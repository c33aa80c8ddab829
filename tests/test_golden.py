"""golden and verify: contents against an independent reference, the table, the errors.

In-process tests use COMM_SELF (one rank) or, marked, COMM_WORLD; the CLI
test launches its own mpiexec, so it runs only in the serial session.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

from mpibn import golden as G
from mpibn.cli.main import main
from mpibn.cli.launch import find_mpiexec
from oracle import exact_batch_norm, plain_batch_norm, ulp_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = MPI.COMM_WORLD


def write_golden(out, comm=MPI.COMM_SELF, scenarios=None, dtype="float32"):
    G.write(str(out), comm, scenarios.split(",") if scenarios else None, dtype)
    return str(out)


def check_scenario_against_reference(s, files):
    """files[r]: dict of rank r's arrays. Rebuild every group's batch and check mpibn's outputs."""
    size = len(files)
    for members in {tuple(g) for g in s.groups_of_rank}:
        for step in range(G.STEPS):
            x = np.concatenate([files[r]["x"][step] for r in members])
            dy = np.concatenate([files[r]["dy"][step] for r in members])
            f0 = files[members[0]]
            gamma, beta = f0["gamma"], f0["beta"]
            if s.uses_batch_statistics():
                y_ref, dx_ref, mean, var = plain_batch_norm(x, dy, gamma, beta, s.eps)
                count = x.size // x.shape[1]
                mm, mv = f0["moving_mean0"], f0["moving_var0"]
                for k in range(step + 1):        # MindSpore momentum, unbiased moving variance
                    xk = np.concatenate([files[r]["x"][k] for r in members]).astype(np.float64)
                    axes = (0,) + tuple(range(2, xk.ndim))
                    mm = s.momentum * mm + (1 - s.momentum) * xk.mean(axis=axes)
                    mv = s.momentum * mv + (1 - s.momentum) * xk.var(axis=axes) * count / (count - 1)
            else:
                mm, mv = f0["moving_mean0"], f0["moving_var0"]
                shape = (1, -1) + (1,) * (x.ndim - 2)
                inv = 1 / np.sqrt(mv + s.eps)
                y_ref = (gamma.reshape(shape) * (x.astype(np.float64) - mm.reshape(shape))
                         * inv.reshape(shape) + beta.reshape(shape))
                dx_ref = gamma.reshape(shape) * inv.reshape(shape) * dy.astype(np.float64)
            ends = np.cumsum([0] + [files[r]["x"].shape[1] for r in members])
            for i, r in enumerate(members):
                f, sl = files[r], slice(ends[i], ends[i + 1])
                assert f["y"].dtype == np.dtype(s.dtype)
                assert ulp_distance(f["y"][step], y_ref[sl].astype(s.dtype)).max(initial=0) <= 1
                assert ulp_distance(f["dx"][step], dx_ref[sl].astype(s.dtype)).max(initial=0) <= 1
                if s.uses_batch_statistics():
                    np.testing.assert_allclose(f["batch_mean"][step], mean, rtol=1e-14, atol=1e-14)
                    np.testing.assert_allclose(f["batch_var"][step], var, rtol=1e-12)
                np.testing.assert_allclose(f["moving_mean"][step], mm, rtol=1e-13, atol=1e-13)
                np.testing.assert_allclose(f["moving_var"][step], mv, rtol=1e-12)
            # Parameter gradients: each rank's share sums to the concatenated batch's.
            xhat = (y_ref - beta.reshape((1, -1) + (1,) * (x.ndim - 2))) / \
                gamma.reshape((1, -1) + (1,) * (x.ndim - 2))
            axes = (0,) + tuple(range(2, x.ndim))
            dgamma = sum(files[r]["dgamma"][step] for r in members)
            np.testing.assert_allclose(dgamma, (dy.astype(np.float64) * xhat).sum(axis=axes), rtol=1e-9,
                                       atol=1e-9)
            np.testing.assert_allclose(sum(files[r]["dbeta"][step] for r in members),
                                       dy.astype(np.float64).sum(axis=axes), rtol=1e-12, atol=1e-12)
    assert size == len(s.shards)


def gather_scenario(comm, s):
    data = G.run_scenario(comm, s)
    return comm.allgather(data)


@pytest.mark.parametrize("name", list(G.scenarios(1)))
def test_golden_outputs_match_reference_one_rank(name):
    s = G.scenarios(1)[name]
    files = gather_scenario(MPI.COMM_SELF, s)
    check_scenario_against_reference(s, files)


@pytest.mark.mpi(min_size=2)
def test_golden_outputs_match_reference_all_ranks():
    table = G.scenarios(WORLD.Get_size())
    gathered = {name: gather_scenario(WORLD, s) for name, s in table.items()}
    for name, s in table.items():
        check_scenario_against_reference(s, gathered[name])


def test_catalogue_has_the_shapes_where_peers_break():
    # issue 12: the scenarios exist for 4 ranks with the shapes asked for
    t = G.scenarios(4)
    totals = lambda s, g: sum(s.shards[r] for r in g) * int(np.prod(s.tail[1:]))   # noqa: E731
    assert totals(t["group_total_2"], t["group_total_2"].groups_of_rank[0]) == 2
    assert t["one_per_rank"].shards == [1, 1, 1, 1] and t["one_per_rank"].tail == (4,)
    assert t["wide_c2048"].tail == (2048,) and t["wide_c2048"].shards == [2] * 4
    assert t["float16_offset"].dtype == "float16" and t["float16_offset"].offset == 500.0
    assert sorted(map(len, t["groups_unequal"].process_groups)) == [1, 3]
    assert (t["momentum_0"].momentum, t["momentum_1"].momentum) == (0.0, 1.0)
    x = G.inputs(t["constant_channel"], 2)["x"]
    assert np.all(x[:, :, 1] == 3.0) and np.ptp(x[:, :, 0]) > 0
    # G.scenarios(5) puts two ranks in the first group: still unequal.
    assert G.scenarios(5)["groups_unequal"].process_groups == [[0, 1], [2, 3, 4]]


@pytest.mark.parametrize("name", ["group_total_2", "one_per_rank", "constant_channel"])
def test_new_small_scenarios_against_exact_arithmetic(name):
    # The smallest new shapes, checked against fractions + mpmath (tests/oracle.py).
    s = G.scenarios(1)[name]
    f = gather_scenario(MPI.COMM_SELF, s)[0]
    for step in range(G.STEPS):
        y, dx, means, variances = exact_batch_norm(f["x"][step], f["dy"][step], f["gamma"], f["beta"], s.eps)
        assert ulp_distance(f["y"][step], y.astype(s.dtype)).max() <= 1
        assert ulp_distance(f["dx"][step], dx.astype(s.dtype)).max() <= 1
        assert f["batch_mean"][step].tolist() == [float(m) for m in means]      # correctly rounded
        assert f["batch_var"][step].tolist() == [float(v) for v in variances]
    if name == "constant_channel":
        assert np.all(f["batch_var"][:, 1] == 0) and np.all(f["y"][:, :, 1] == f["beta"][1].astype(s.dtype))


def test_momentum_0_and_1_moving_statistics():
    for name, expect_first in (("momentum_0", False), ("momentum_1", True)):
        s = G.scenarios(1)[name]
        f = gather_scenario(MPI.COMM_SELF, s)[0]
        n = f["x"].shape[1] * int(np.prod(s.tail[1:]))
        if expect_first:       # momentum 1: the moving statistics never change
            assert np.all(f["moving_mean"] == f["moving_mean0"]) and np.all(f["moving_var"] == f["moving_var0"])
        else:                  # momentum 0: the last batch's mean and unbiased variance
            np.testing.assert_array_equal(f["moving_mean"], f["batch_mean"])
            np.testing.assert_allclose(f["moving_var"], f["batch_var"] * n / (n - 1), rtol=1e-15)


def test_manifest_spells_out_conventions(tmp_path):
    out = write_golden(tmp_path / "g", scenarios="even,eval")
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == "mpibn-golden" and manifest["format_version"] == 1
    assert set(manifest["scenarios"]) == {"even", "eval"}
    assert "batch_mean" not in manifest["scenarios"]["eval"]["outputs"]
    conv = manifest["conventions"]
    assert "1 - momentum" in conv["momentum_in_other_frameworks"]["pytorch"]
    assert "UNBIASED" in conv["moving_statistics"] and "BIASED" in conv["statistics"]
    with np.load(os.path.join(out, "even", "rank0.npz")) as f:
        assert set(G.INPUT_KEYS) | set(G.OUTPUT_KEYS) <= set(f.files)


# -- verify: the table, tampering, and clear errors -----------------------------------------

def verify(capsys, *args):
    rc = main(["verify", *map(str, args)])
    return rc, capsys.readouterr().out


@pytest.fixture
def golden_dir(tmp_path):
    return write_golden(tmp_path / "golden", scenarios="even,float16,eval")


def copy_results(golden_dir, tmp_path):
    res = str(tmp_path / "results")
    shutil.copytree(golden_dir, res)
    os.remove(os.path.join(res, "manifest.json"))          # results need no manifest
    return res


def rewrite(path, **changes):
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    data.update(changes)
    for k, v in list(data.items()):
        if v is None:
            del data[k]
    np.savez(path, **data)


def test_verify_passes_on_identical_results_and_prints_table(golden_dir, tmp_path, capsys):
    res = copy_results(golden_dir, tmp_path)
    rc, out = verify(capsys, golden_dir, res)
    assert rc == 0, out
    assert "max ulps" in out and "float16" in out and "FAIL" not in out
    assert "22 of 22 quantities pass" in out                 # 8 + 8 + 6 (eval has no batch stats)


def test_verify_fails_on_tampered_results(golden_dir, tmp_path, capsys):
    res = copy_results(golden_dir, tmp_path)
    path = os.path.join(res, "even", "rank0.npz")
    with np.load(path) as f:
        y, mv = f["y"].copy(), f["moving_var"].copy()
    y.flat[5] = np.nextafter(y.flat[5], np.float32(np.inf), dtype=np.float32) * np.float32(1 + 1e-4)
    rewrite(path, y=y, moving_var=mv * (1 + 1e-5))     # float32 scenario: 32 eps is 3.8e-6
    rc, out = verify(capsys, golden_dir, res)
    assert rc == 1
    rows = {tuple(line.split()[:2]): line for line in out.splitlines() if line.startswith("even")}
    assert rows[("even", "y")].endswith("FAIL") and rows[("even", "moving_var")].endswith("FAIL")
    assert rows[("even", "dx")].endswith("pass")
    # A loose enough tolerance accepts the same results.
    rc, out = verify(capsys, golden_dir, res, "--rtol", "1e-3")
    assert rc == 0, out


def test_verify_reports_ulps_in_the_result_dtype(golden_dir, tmp_path, capsys):
    res = copy_results(golden_dir, tmp_path)
    path = os.path.join(res, "float16", "rank0.npz")
    with np.load(path) as f:
        dx = f["dx"].copy()
    dx.flat[3] = np.nextafter(np.nextafter(dx.flat[3], np.float16(9)), np.float16(9))   # +2 ulps
    rewrite(path, dx=dx)
    rc, out = verify(capsys, golden_dir, res, "--quantities", "dx", "--scenarios", "float16")
    line = next(l for l in out.splitlines() if l.startswith("float16"))
    assert line.split()[5] == "2"
    rc, out = verify(capsys, golden_dir, res, "--quantities", "dx", "--scenarios", "float16",
                     "--max-ulps", "1")
    assert rc == 1


@pytest.mark.parametrize("damage, message", [
    ("missing_file", "even/rank0.npz: no such file"),
    ("missing_key", "even/rank0.npz: missing key 'dgamma'"),
    ("malformed", "even/rank0.npz: not a readable .npz file"),
    ("bad_shape", "even/rank0.npz: key 'dx' has shape"),
    ("bad_manifest", "manifest.json: field 'format_version' is 99"),
    ("no_manifest", "manifest.json: no such file"),
    ("unknown_scenario", "no scenario(s) ['nope']"),
])
def test_verify_names_file_and_key_of_bad_input(golden_dir, tmp_path, capsys, damage, message):
    res = copy_results(golden_dir, tmp_path)
    path = os.path.join(res, "even", "rank0.npz")
    extra = []
    if damage == "missing_file":
        os.remove(path)
    elif damage == "missing_key":
        rewrite(path, dgamma=None)
    elif damage == "malformed":
        with open(path, "wb") as f:
            f.write(b"not a zip file")
    elif damage == "bad_shape":
        with np.load(path) as f:
            rewrite(path, dx=f["dx"][:, :1])
    elif damage == "bad_manifest":
        manifest = os.path.join(golden_dir, "manifest.json")
        with open(manifest) as f:
            m = json.load(f)
        m["format_version"] = 99
        with open(manifest, "w") as f:
            json.dump(m, f)
    elif damage == "no_manifest":
        golden_dir = res                                   # results have no manifest
    elif damage == "unknown_scenario":
        extra = ["--scenarios", "even,nope"]
    rc, out = verify(capsys, golden_dir, res, *extra)
    assert rc == 2 and message in out, out


def test_verify_skip_missing_lists_what_a_backend_did_not_produce(golden_dir, tmp_path, capsys):
    res = copy_results(golden_dir, tmp_path)
    shutil.rmtree(os.path.join(res, "eval"))
    for r in range(1):
        rewrite(os.path.join(res, "even", f"rank{r}.npz"), dgamma=None)
    rc, out = verify(capsys, golden_dir, res, "--skip-missing")
    assert rc == 1                                        # reported, and never a pass (issue 18)
    missing = [l for l in out.splitlines() if "missing: rank 0" in l]
    assert len(missing) == 6 + 1, out
    assert "15 of 22 quantities pass; 7 missing" in out, out


@pytest.mark.skipif(WORLD.Get_size() > 1, reason="launches its own mpiexec")
def test_cli_golden_relaunches_under_mpiexec(tmp_path):
    out = str(tmp_path / "g")
    run = subprocess.run([sys.executable, "-m", "mpibn", "golden", "--out", out, "--np", "4",
                          "--scenarios", "groups_rank_outside,empty_rank"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(os.listdir(os.path.join(out, "empty_rank"))) == [f"rank{r}.npz" for r in range(4)]
    with np.load(os.path.join(out, "empty_rank", "rank1.npz")) as f:
        assert f["x"].shape[1] == 0 and f["y"].shape[1] == 0
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert m["ranks"] == 4 and m["scenarios"]["groups_rank_outside"]["groups_of_rank"][3] == [3]
    check = subprocess.run([sys.executable, "-m", "mpibn", "verify", out, out], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout
    assert find_mpiexec()
