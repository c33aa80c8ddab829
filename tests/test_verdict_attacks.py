"""The verdict attacked: ``verify`` and ``assert_matches`` must never pass a wrong result (issue 18).

Every way a backend can be wrong is applied to correct results, and each must
fail, through ``mpibn.verify.verify`` / ``python -m mpibn verify`` on golden
files and through ``mpibn.testing.assert_matches`` on ``reference``'s results:
one element of one quantity of one rank off by more than the tolerance, NaN,
inf, a lower precision than the one asked for, a missing key, a missing rank,
a wrong shape, a transposed array, values of another scenario or step.
Correct results written in a higher precision must pass.

The tests ``test_item<k>_...`` reproduce the eight ways the verdict passed
wrong results (or failed right ones) before issue 18; each failed on the code
before the fix.

Only stable entry points are used (``mpibn.testing.reference``,
``assert_matches``, ``mpibn.verify.verify``, ``mpibn.verify.VerifyError``,
``mpibn.SyncBatchNorm`` and the command line), so that the module survives
moves inside the package. Serial only: the golden set is written by
``python -m mpibn golden --np 2`` (its own mpiexec).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn.testing import assert_matches, reference
from mpibn.verify import VerifyError, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = 2
SCENARIOS = "even,uneven,momentum,float16,eval,float32_offset"
OUTPUTS = ("y", "dx", "dgamma", "dbeta", "batch_mean", "batch_var", "moving_mean", "moving_var")
EPS = {"float16": float(np.finfo(np.float16).eps), "float32": float(np.finfo(np.float32).eps),
       "float64": float(np.finfo(np.float64).eps)}

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="serial: launches its own mpiexec")


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_", "HYDRA"))}


def cli(*args, timeout=120):
    """``python -m mpibn ARGS``: (exit status, stdout, stderr)."""
    run = subprocess.run([sys.executable, "-m", "mpibn", *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env=clean_env())
    return run.returncode, run.stdout, run.stderr


# -- golden files and results ----------------------------------------------------------------

@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("attack") / "golden")
    rc, stdout, stderr = cli("golden", "--out", out, "--np", RANKS, "--scenarios", SCENARIOS, timeout=300)
    assert rc == 0, stdout + stderr
    return out


def manifest_of(golden):
    with open(os.path.join(golden, "manifest.json")) as f:
        return json.load(f)


def copy_results(golden, dest):
    """Results identical to mpibn's: the golden layout without the manifest."""
    dest = str(dest)
    shutil.copytree(golden, dest)
    os.remove(os.path.join(dest, "manifest.json"))
    return dest


def read(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def write(path, data):
    np.savez(path, **data)


def edit(results, scenario, rank, **changes):
    """Rewrite one results file: key=array replaces, key=None removes."""
    path = os.path.join(results, scenario, f"rank{rank}.npz")
    data = read(path)
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    write(path, data)


def outcome(golden, results, **kw):
    """'pass', 'fail' (exit 1) or 'error' (exit 2) of verify on these files."""
    try:
        _, ok = verify(golden, results, **kw)
    except VerifyError:
        return "error"
    return "pass" if ok else "fail"


def golden_value(golden, scenario, rank, key):
    return read(os.path.join(golden, scenario, f"rank{rank}.npz"))[key]


def tolerance(golden, scenario, key):
    """The default absolute tolerance of one quantity: 32 eps of the scenario's dtype times max |e|."""
    dtype = manifest_of(golden)["scenarios"][scenario]["dtype"]
    scale = max(float(np.abs(golden_value(golden, scenario, r, key).astype(np.float64)).max(initial=0))
                for r in range(RANKS))
    return 32 * EPS[dtype] * scale


# -- the mutations: every way a backend can be wrong ----------------------------------------

def one_element_off(golden, results, scenario, key, rank):
    """One element of one quantity of one rank off by twice the tolerance (in the stored dtype)."""
    value = golden_value(golden, scenario, rank, key).astype(np.float64)
    flat = value.reshape(-1)
    i = int(np.argmax(np.abs(flat)))
    flat[i] += 2 * tolerance(golden, scenario, key) + 4 * np.spacing(abs(flat[i]) + 1e-300, dtype=np.float32)
    stored = golden_value(golden, scenario, rank, key).dtype
    wrong = value.astype(stored)
    assert np.abs(wrong.astype(np.float64) - golden_value(golden, scenario, rank, key)).max() > \
        tolerance(golden, scenario, key)
    edit(results, scenario, rank, **{key: wrong})


def one_element_nonfinite(golden, results, scenario, key, rank, value):
    wrong = golden_value(golden, scenario, rank, key).copy()
    wrong.reshape(-1)[0] = value
    edit(results, scenario, rank, **{key: wrong})


MUTATIONS = ["off_by_more_than_tolerance", "nan", "inf", "-inf", "lower_precision", "missing_key",
             "missing_rank", "wrong_shape", "transposed", "other_scenario", "other_step"]


def mutate(golden, results, mutation, key, rank=1):
    """Apply ``mutation`` to quantity ``key`` of rank ``rank`` in scenario 'uneven' (or 'float16')."""
    scenario = "uneven"
    if mutation == "off_by_more_than_tolerance":
        one_element_off(golden, results, scenario, key, rank)
    elif mutation in ("nan", "inf", "-inf"):
        one_element_nonfinite(golden, results, scenario, key, rank, float(mutation))
    elif mutation == "lower_precision":
        # float32 scenario, this quantity of this rank stored as float16 (the values rounded to it)
        edit(results, scenario, rank, **{key: golden_value(golden, scenario, rank, key).astype(np.float16)})
    elif mutation == "missing_key":
        edit(results, scenario, rank, **{key: None})
    elif mutation == "missing_rank":
        os.remove(os.path.join(results, scenario, f"rank{rank}.npz"))
    elif mutation == "wrong_shape":
        edit(results, scenario, rank, **{key: golden_value(golden, scenario, rank, key)[..., :-1]})
    elif mutation == "transposed":
        v = golden_value(golden, scenario, rank, key)
        edit(results, scenario, rank, **{key: np.swapaxes(v, -1, -2) if v.ndim > 2 else v.T})
    elif mutation == "other_scenario":
        # 'momentum' has the shapes of 'uneven' (same shards), other data and momentum
        edit(results, scenario, rank, **{key: golden_value(golden, "momentum", rank, key)})
    elif mutation == "other_step":
        edit(results, scenario, rank, **{key: golden_value(golden, scenario, rank, key)[::-1]})
    return scenario


@pytest.mark.parametrize("key", OUTPUTS)
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_verify_fails_every_mutation(golden, tmp_path, mutation, key):
    results = copy_results(golden, tmp_path / "r")
    assert outcome(golden, results) == "pass"
    mutate(golden, results, mutation, key)
    assert outcome(golden, results) != "pass", (mutation, key)
    # --skip-missing reports what is absent instead of stopping, but never passes.
    assert outcome(golden, results, skip_missing=True) != "pass", (mutation, key)


@pytest.mark.parametrize("mutation", ["off_by_more_than_tolerance", "nan", "lower_precision", "missing_key",
                                      "missing_rank", "transposed", "other_scenario", "other_step"])
def test_cli_verify_fails_every_mutation(golden, tmp_path, mutation):
    results = copy_results(golden, tmp_path / "r")
    mutate(golden, results, mutation, "y")
    rc, out, err = cli("verify", golden, results)
    assert rc in (1, 2) and "Traceback" not in err, out + err
    assert rc == 2 or "FAIL" in out or "missing" in out, out
    rc, out, err = cli("verify", golden, results, "--skip-missing")
    assert rc in (1, 2) and "Traceback" not in err, out + err


def test_float16_scenario_mutations_fail(golden, tmp_path):
    # The float16 scenario: 32 eps of float16 is 3 %, but NaN, inf and a missing rank never pass.
    for value in (np.nan, np.inf):
        results = copy_results(golden, tmp_path / f"r{value}")
        one_element_nonfinite(golden, results, "float16", "dx", 0, value)
        assert outcome(golden, results) == "fail"
        assert outcome(golden, results, rtol=float("inf")) == "fail"     # whatever the tolerance


def test_correct_results_in_higher_precision_pass(golden, tmp_path):
    results = copy_results(golden, tmp_path / "r")
    names = manifest_of(golden)["scenarios"]
    for name in names:
        for r in range(RANKS):
            data = read(os.path.join(results, name, f"rank{r}.npz"))
            edit(results, name, r, **{k: data[k].astype(np.float64) for k in OUTPUTS if k in data})
    rows, ok = verify(golden, results)
    assert ok and all(row[6] == "pass" for row in rows), rows
    rc, out, err = cli("verify", golden, results)
    assert rc == 0, out + err


# -- the eight ways the verdict passed wrong results before -----------------------------------

def test_item1_half_percent_wrong_fails_whatever_the_stored_dtype(golden, tmp_path):
    # Before: 0.5 % wrong failed as float32, but "passed" when written as float16, even for
    # the float64 statistics. The tolerance is the scenario's (float32), never the file's.
    for stored in (np.float32, np.float16):
        results = copy_results(golden, tmp_path / np.dtype(stored).name)
        for r in range(RANKS):
            data = read(os.path.join(golden, "even", f"rank{r}.npz"))
            edit(results, "even", r, **{k: (data[k].astype(np.float64) * 1.005).astype(stored)
                                        for k in OUTPUTS})
        rows, ok = verify(golden, results, scenarios=["even"])
        assert not ok
        assert [row[1] for row in rows if row[6] == "pass"] == [], rows
        rc, out, err = cli("verify", golden, results, "--scenarios", "even")
        assert rc == 1 and "quantities pass" in out and "0 of 8" in out, out + err
        if stored is np.float16:
            assert "float16" in out and "less precis" in out, out            # the message says why


def test_item1_float16_scenario_computed_more_exactly_passes(golden, tmp_path):
    # Before: y of the float16 scenario computed in float64 and written as float32 failed
    # (tolerance 32 eps of float32 against float16 golden values).
    results = copy_results(golden, tmp_path / "r")
    m = manifest_of(golden)["scenarios"]["float16"]
    for r in range(RANKS):
        g = read(os.path.join(golden, "float16", f"rank{r}.npz"))
        shape = (1, -1) + (1,) * (g["x"].ndim - 3)
        exact = [(g["gamma"].reshape(shape) * (g["x"][s].astype(np.float64) - g["batch_mean"][s].reshape(shape))
                  / np.sqrt(g["batch_var"][s].reshape(shape) + m["eps"]) + g["beta"].reshape(shape))
                 for s in range(2)]
        y = np.stack(exact).astype(np.float32)
        assert not np.array_equal(y.astype(np.float16), g["y"]) or not np.array_equal(y, g["y"])
        edit(results, "float16", r, y=y)
    assert outcome(golden, results, scenarios=["float16"]) == "pass"


def test_item1_assert_matches_tolerance_follows_the_reference_dtype():
    xs, dys = shards([3, 1, 4], np.float32, seed=1)
    ref = reference(xs, dys)
    wrong = [{k: (np.asarray(getattr(r, k), np.float64) * 1.005).astype(np.float16) for k in OUTPUTS}
             for r in ref]
    with pytest.raises(AssertionError):
        assert_matches(wrong, ref)
    # float16 inputs: y computed in float64 and written as float32 is right
    xs16, dys16 = shards([3, 1, 4], np.float16, seed=2)
    ref16 = reference(xs16, dys16)
    better = [as_dict(r) for r in ref16]
    for b, r, x in zip(better, ref16, xs16):
        b["y"] = exact_y(x, r, np.ones(3), np.zeros(3), 1e-5).astype(np.float32)
    assert any(not np.array_equal(b["y"], r.y.astype(np.float32)) for b, r in zip(better, ref16))
    assert_matches(better, ref16)


def test_item2_tolerance_never_overflows(golden, tmp_path):
    # Before: float16 results and |expected| above ~2.1e6 made the tolerance inf in float16,
    # and NaN or inf results passed. Tolerances and errors are float64 now.
    # float16 inputs of std ~1700: batch_var ~3e6 (float64), beyond float16's 65504 as any
    # float16 backend must find; momentum 0.99 keeps the moving variance inside float16.
    xs = [np.float16([[1732, -1732], [-1732, 1000], [1732, -1000]]), np.float16([[-1732, 1000]])]
    ref = reference(xs, momentum=0.99)
    assert max(float(np.max(r.batch_var)) for r in ref) > 2.2e6
    assert all(np.isfinite(r.moving_var).all() for r in ref)
    for bad in (np.nan, np.inf):
        wrong = [as_dict(r) for r in ref]
        wrong[1]["batch_var"] = np.full(np.shape(ref[1].batch_var), bad, np.float16)
        with pytest.raises(AssertionError):
            assert_matches(wrong, ref)
    # The same through verify: golden statistics of 1e7, float16 results of NaN.
    gold = str(tmp_path / "g")
    shutil.copytree(golden, gold)
    results = copy_results(golden, tmp_path / "r")
    for r in range(RANKS):
        g = read(os.path.join(gold, "float16", f"rank{r}.npz"))
        g["batch_var"] = g["batch_var"] * 1e7
        write(os.path.join(gold, "float16", f"rank{r}.npz"), g)
        edit(results, "float16", r, batch_var=np.full(g["batch_var"].shape, np.nan, np.float16))
    assert outcome(gold, results, scenarios=["float16"]) == "fail"


def test_item3_missing_quantities_fail_assert_matches():
    xs, dys = shards([3, 2, 4], np.float32, seed=3)
    ref = reference(xs, dys)
    # the key misspelled: dx absent, grad_x unknown
    typo = [as_dict(r) for r in ref]
    for t in typo:
        t["grad_x"] = t.pop("dx")
    with pytest.raises(AssertionError) as info:
        assert_matches(typo, ref)
    assert "grad_x" in str(info.value) and "dx" in str(info.value)
    # one rank's dx None: dx was skipped on every rank
    one = [as_dict(r) for r in ref]
    one[1]["dx"] = None
    one[0]["dx"] = one[0]["dx"] * np.float32(1.01)      # a wrong dx elsewhere
    with pytest.raises(AssertionError, match="dx"):
        assert_matches(one, ref)
    # only y returned
    with pytest.raises(AssertionError, match="missing"):
        assert_matches([{"y": r.y} for r in ref], ref)
    # leaving quantities out takes naming what to compare
    assert_matches([{"y": r.y} for r in ref], ref, quantities=["y"])
    assert_matches([{"y": r.y, "dx": r.dx} for r in ref], ref, quantities=("y", "dx"))


def test_unknown_keys_are_listed(golden, tmp_path):
    results = copy_results(golden, tmp_path / "r")
    data = read(os.path.join(results, "even", "rank0.npz"))
    edit(results, "even", 0, grad_x=data["dx"], dx=None)          # a misspelling
    rc, out, err = cli("verify", golden, results, "--scenarios", "even")
    assert rc == 2 and "'dx'" in out and "grad_x" in out, out + err
    edit(results, "even", 0, dx=data["dx"])                        # dx back, grad_x still there
    rc, out, err = cli("verify", golden, results, "--scenarios", "even")
    assert rc == 0 and "grad_x" in out and "unknown" in out, out + err
    rows, ok = verify(golden, results, scenarios=["even"])
    assert ok and any("grad_x" in str(row) for row in rows)


def test_item4_skip_missing_never_shows_a_partly_missing_quantity_as_pass(golden, tmp_path, capsys):
    results = copy_results(golden, tmp_path / "r")
    edit(results, "even", 1, dgamma=None)
    rows, ok = verify(golden, results, scenarios=["even"], skip_missing=True)
    assert not ok
    row = next(r for r in rows if r[1] == "dgamma")
    assert row[6] != "pass" and "missing" in row[6] and "1" in row[6], row
    rc, out, err = cli("verify", golden, results, "--skip-missing", "--scenarios", "even")
    assert rc == 1, out + err
    line = next(l for l in out.splitlines() if l.startswith("even") and "dgamma" in l)
    assert "missing" in line and "rank 1" in line and "pass" not in line, line


def test_item5_scenario_names_are_not_paths(golden, tmp_path):
    empty = str(tmp_path / "empty")
    os.mkdir(empty)
    for name in (os.path.join(os.path.abspath(golden), "even"), "../even", "even/../even", "..", "a/b", ""):
        gold = str(tmp_path / f"g{abs(hash(name))}")
        shutil.copytree(golden, gold)
        m = manifest_of(gold)
        m["scenarios"] = {name: m["scenarios"]["even"]}
        with open(os.path.join(gold, "manifest.json"), "w") as f:
            json.dump(m, f)
        rc, out, err = cli("verify", gold, empty)
        assert rc == 2 and "Traceback" not in err, (name, out, err)
        assert "manifest.json" in out and "scenario" in out and "pass" not in out, (name, out)


MALFORMED = {
    "ranks_a_string": lambda m: m.update(ranks="4"),
    "ranks_zero": lambda m: m.update(ranks=0),
    "ranks_bool": lambda m: m.update(ranks=True),
    "scenarios_a_list": lambda m: m.update(scenarios=list(m["scenarios"])),
    "scenarios_empty": lambda m: m.update(scenarios={}),
    "no_outputs": lambda m: m["scenarios"]["even"].pop("outputs"),
    "outputs_a_string": lambda m: m["scenarios"]["even"].update(outputs="y"),
    "unknown_output": lambda m: m["scenarios"]["even"].update(outputs=["y", "grad_x"]),
    "scenario_a_list": lambda m: m["scenarios"].update(even=[1, 2]),
    "dtype_unknown": lambda m: m["scenarios"]["even"].update(dtype="float8"),
    "shards_too_short": lambda m: m["scenarios"]["even"].update(shards=[3]),
    "shards_negative": lambda m: m["scenarios"]["even"].update(shards=[3, -3]),
    "tail_a_number": lambda m: m["scenarios"]["even"].update(tail=3),
    "files_elsewhere": lambda m: m["scenarios"]["even"].update(files=["../x.npz", "even/rank1.npz"]),
    "version_a_string": lambda m: m.update(format_version="1"),
    "version_unknown": lambda m: m.update(format_version=2),
    "no_steps": lambda m: m.pop("steps"),
    "eps_a_string": lambda m: m["scenarios"]["even"].update(eps="1e-5"),
    "top_level_a_list": None,
}


@pytest.mark.parametrize("damage", list(MALFORMED))
def test_item6_malformed_manifest_exits_2_with_one_line(golden, tmp_path, damage):
    gold = str(tmp_path / "g")
    shutil.copytree(golden, gold)
    m = manifest_of(gold)
    if MALFORMED[damage] is None:
        m = [m]
    else:
        MALFORMED[damage](m)
    with open(os.path.join(gold, "manifest.json"), "w") as f:
        json.dump(m, f)
    results = copy_results(golden, tmp_path / "r")
    rc, out, err = cli("verify", gold, results)
    assert rc == 2 and "Traceback" not in err and err.strip() == "", (damage, out, err)
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) == 1 and "manifest.json" in lines[0], (damage, out)


@pytest.mark.parametrize("damage", ["golden_dtype", "golden_shape", "result_dtype_int", "result_shape"])
def test_files_checked_against_the_manifest(golden, tmp_path, damage):
    gold = str(tmp_path / "g")
    shutil.copytree(golden, gold)
    results = copy_results(golden, tmp_path / "r")
    y = golden_value(golden, "even", 1, "y")
    if damage == "golden_dtype":        # the golden y of a float32 scenario stored as float64
        edit(gold, "even", 1, y=y.astype(np.float64))
    elif damage == "golden_shape":
        edit(gold, "even", 1, y=y[:, :-1])
        edit(results, "even", 1, y=y[:, :-1])
    elif damage == "result_dtype_int":
        edit(results, "even", 1, y=np.round(y).astype(np.int64))
    elif damage == "result_shape":
        edit(results, "even", 1, dgamma=golden_value(golden, "even", 1, "dgamma")[:1])
    rc, out, err = cli("verify", gold, results)
    assert rc == 2 and "Traceback" not in err, (damage, out, err)
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) == 1 and "rank1.npz" in lines[0], (damage, out)


BAD_ARGUMENTS = [dict(momentum=2), dict(momentum=-0.5), dict(eps=-1.0), dict(eps=-1), dict(eps=0.0),
                 dict(eps=float("nan")), dict(momentum="0.9"), dict(exact=1), dict(dtype=np.int32),
                 dict(use_batch_statistics=1)]


@pytest.mark.parametrize("bad", BAD_ARGUMENTS, ids=lambda d: f"{list(d)[0]}={list(d.values())[0]!r}")
def test_item7_reference_refuses_what_the_layer_refuses(bad):
    with pytest.raises((TypeError, ValueError)) as layer:
        SyncBatchNorm(2, comm=MPI.COMM_SELF, **bad)
    xs = [np.arange(6, dtype=np.float32).reshape(3, 2), np.ones((2, 2), np.float32)]
    with pytest.raises(type(layer.value)) as ours:
        reference(xs, **bad)
    assert str(ours.value) in str(layer.value), (str(ours.value), str(layer.value))


def test_item7_reference_refuses_gamma_that_differs_per_rank():
    xs = [np.arange(6, dtype=np.float32).reshape(3, 2), np.ones((2, 2), np.float32)]
    with pytest.raises(ValueError, match="gamma"):
        reference(xs, gamma=[np.float32([1, 2]), np.float32([1, 3])])
    with pytest.raises(ValueError, match="beta"):
        reference(xs, beta=[np.float32([0, 0]), np.float32([0, 1])])
    with pytest.raises(ValueError, match="moving_var"):
        reference(xs, moving_var=np.float32([1, -1]))
    # The same gamma given once per rank is fine.
    same = reference(xs, gamma=[np.float32([1, 2])] * 2)
    assert_matches(same, reference(xs, gamma=np.float32([1, 2])))


def test_item8_float64_inputs_give_a_float64_reference():
    xs, dys = shards([3, 1, 4], np.float64, seed=5)
    rng = np.random.default_rng(6)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.uniform(-0.5, 0.5, 3)
    ref = reference(xs, dys, gamma=gamma, beta=beta)
    assert all(r.moving_var.dtype == np.float64 and r.dgamma.dtype == np.float64 for r in ref)
    # A correct float64 backend (the concatenated batch, plain float64 NumPy) passes.
    assert_matches(textbook(xs, dys, gamma, beta, eps=1e-5, momentum=0.9), ref)


def test_item8_a_parameter_dtype_mismatch_suggests_dtype():
    xs, dys = shards([3, 1, 4], np.float64, seed=7)
    gamma = np.random.default_rng(8).uniform(0.5, 1.5, 3)           # not exact in float32
    ours = textbook(xs, dys, gamma.astype(np.float32).astype(np.float64), np.zeros(3), eps=1e-5, momentum=0.9)
    for r in ours:                               # a backend keeping its parameters in float32
        for k in ("dgamma", "dbeta", "moving_mean", "moving_var"):
            r[k] = r[k].astype(np.float32)
    with pytest.raises(AssertionError) as info:
        assert_matches(ours, reference(xs, dys, gamma=gamma))
    assert "dtype=" in str(info.value) and "float32" in str(info.value), str(info.value)
    assert_matches(ours, reference(xs, dys, gamma=gamma, dtype=np.float32))


# -- assert_matches: the same mutations -------------------------------------------------------

def shards(sizes, dtype, seed, channels=3, spatial=(4, 4)):
    rng = np.random.default_rng(seed)
    xs = [(2 + 3 * rng.standard_normal((n, channels) + spatial)).astype(dtype) for n in sizes]
    dys = [rng.standard_normal((n, channels) + spatial).astype(dtype) for n in sizes]
    return xs, dys


def as_dict(result):
    return {k: getattr(result, k) for k in OUTPUTS}


def exact_y(x, r, gamma, beta, eps):
    bc = (1, -1) + (1,) * (x.ndim - 2)
    return (gamma.reshape(bc) * (x.astype(np.float64) - r.batch_mean.reshape(bc))
            / np.sqrt(r.batch_var.reshape(bc) + eps) + beta.reshape(bc))


def textbook(xs, dys, gamma, beta, eps, momentum):
    """Batch norm of the concatenated batch in float64: an independent backend (no mpibn code)."""
    x, dy = np.concatenate(xs).astype(np.float64), np.concatenate(dys).astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    bc = (1, -1) + (1,) * (x.ndim - 2)
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(bc)) ** 2).mean(axis=axes)
    inv = 1 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(bc)) * inv.reshape(bc)
    y = gamma.reshape(bc) * xhat + beta.reshape(bc)
    dx = gamma.reshape(bc) * inv.reshape(bc) * (dy - dy.mean(axis=axes).reshape(bc)
                                               - xhat * (dy * xhat).mean(axis=axes).reshape(bc))
    out, start = [], 0
    for xr in xs:
        sl = slice(start, start + len(xr))
        start += len(xr)
        out.append({"y": y[sl], "dx": dx[sl], "dgamma": (dy[sl] * xhat[sl]).sum(axis=axes),
                    "dbeta": dy[sl].sum(axis=axes), "batch_mean": mean, "batch_var": var,
                    "moving_mean": (1 - momentum) * mean,
                    "moving_var": momentum + (1 - momentum) * var * n / (n - 1)})
    return out


def mutate_results(ref, mutation, key, rank=2, other=None):
    """Per-rank dicts of ``ref`` with ``mutation`` applied to ``key`` of ``rank``."""
    res = [as_dict(r) for r in ref]
    value = np.array(res[rank][key])
    if mutation == "off_by_more_than_tolerance":
        scale = max(float(np.abs(np.asarray(r[key], np.float64)).max(initial=0)) for r in res)
        wrong = value.astype(np.float64)
        wrong.reshape(-1)[0] += 2 * 32 * EPS["float32"] * scale + 4 * np.spacing(np.float32(scale))
        res[rank][key] = wrong.astype(value.dtype)
    elif mutation in ("nan", "inf", "-inf"):
        value.reshape(-1)[0] = float(mutation)
        res[rank][key] = value
    elif mutation == "lower_precision":
        res[rank][key] = value.astype(np.float16)
    elif mutation == "missing_key":
        del res[rank][key]
    elif mutation == "missing_rank":
        res = res[:rank] + res[rank + 1:]
    elif mutation == "wrong_shape":
        res[rank][key] = value[..., :-1]
    elif mutation == "transposed":
        res[rank][key] = np.swapaxes(value, -1, -2) if value.ndim > 2 else value[::-1]
    elif mutation in ("other_scenario", "other_step"):
        res[rank][key] = getattr(other[rank], key)
    return res


@pytest.fixture(scope="module")
def two_steps():
    xs, dys = shards([3, 2, 4], np.float32, seed=11)
    xs2, dys2 = shards([3, 2, 4], np.float32, seed=12)
    mm, mv = np.float32([1, 2, 3]), np.float32([1, 2, 0.5])
    first = reference(xs, dys, moving_mean=mm, moving_var=mv)
    second = reference(xs2, dys2, moving_mean=[r.moving_mean for r in first],
                       moving_var=[r.moving_var for r in first])
    xs3, dys3 = shards([3, 2, 4], np.float32, seed=13)
    other = reference(xs3, dys3, moving_mean=mm, moving_var=mv, momentum=0.7, eps=1e-3)
    return first, second, other


@pytest.mark.parametrize("key", OUTPUTS)
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_assert_matches_fails_every_mutation(two_steps, mutation, key):
    first, second, other = two_steps
    assert_matches([as_dict(r) for r in first], first)
    wrong = mutate_results(first, mutation, key, other=second if mutation == "other_step" else other)
    with pytest.raises(AssertionError):
        assert_matches(wrong, first)


def test_assert_matches_correct_results_in_higher_precision_pass(two_steps):
    first, _, _ = two_steps
    assert_matches([{k: np.asarray(v, np.float64) for k, v in as_dict(r).items()} for r in first], first)
    assert_matches([{k: np.asarray(v, np.longdouble) for k, v in as_dict(r).items()} for r in first], first)
