"""The conformance tooling: scoring a results directory (column.py) and rendering the report (report.py).

Serial session only (small golden sets on COMM_SELF, scripts in subprocesses).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "scripts", "conformance")
pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="serial session only")
sys.path.insert(0, CONF)
import column  # noqa: E402
import peer_convention  # noqa: E402
import report  # noqa: E402


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("golden"))
    G.write(out, MPI.COMM_SELF, ["even", "eval", "constant_channel"])
    return out


def load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def score(golden, results, tmp_path, *extra):
    out = str(tmp_path / "col.json")
    assert column.main([golden, results, "--column", "fake", "--out", out, "--framework", "a fake backend",
                        "--convention", "c", "--command", "cmd", *extra]) == 0
    with open(out) as f:
        return json.load(f)


def test_peer_convention_with_mpibn_conventions_reproduces_the_golden_values(golden_dir):
    with open(os.path.join(golden_dir, "manifest.json")) as f:
        m = json.load(f)
    for name in ("even", "eval", "constant_channel"):
        s = m["scenarios"][name]
        files = [load(os.path.join(golden_dir, p)) for p in s["files"]]
        ours = peer_convention.recompute(s, files)
        for k in s["outputs"]:
            np.testing.assert_allclose(ours[0][k], files[0][k], rtol=2e-6, atol=2e-6, err_msg=f"{name} {k}")


def test_column_verdicts_pass_convention_defect_unsupported(golden_dir, tmp_path):
    res = str(tmp_path / "res")
    shutil.copytree(golden_dir, res)
    os.remove(os.path.join(res, "manifest.json"))
    # even: a backend whose moving variance is the biased one (a convention)...
    path = os.path.join(res, "even", "rank0.npz")
    d = load(path)
    s = G.scenarios(1)["even"]
    n = d["x"].shape[1] * 16
    mv = d["moving_var0"].copy()
    biased = []
    for step in range(2):
        mv = 0.9 * mv + 0.1 * d["batch_var"][step]
        biased.append(mv.copy())
    d["moving_var"] = np.stack(biased)
    np.savez(path, **d)
    # ...constant_channel: a wrong y (a defect under any convention); eval: not produced at all.
    path = os.path.join(res, "constant_channel", "rank0.npz")
    d = load(path)
    d["y"] = d["y"] * np.float32(1.01)
    np.savez(path, **d)
    shutil.rmtree(os.path.join(res, "eval"))
    doc = score(golden_dir, res, tmp_path, "--peer-moving-var", "biased", "--versions", "fake=1.0")
    sc = doc["scenarios"]
    assert sc["even"]["verdict"] == "convention", sc["even"]
    assert sc["even"]["errors"]["moving_var"] > 1e-3 and sc["even"]["errors_peer_convention"]["moving_var"] < 1e-7
    assert sc["constant_channel"]["verdict"] == "defect" and "y" in sc["constant_channel"]["note"]
    assert abs(sc["constant_channel"]["errors"]["y"] - 0.01) < 1e-3
    assert sc["eval"]["verdict"] == "unsupported"
    assert doc["versions"] == {"fake": "1.0"} and doc["runnable"] is True and n > 1
    # Under mpibn's own convention the biased moving variance is a defect.
    assert score(golden_dir, res, tmp_path)["scenarios"]["even"]["verdict"] == "defect"
    # Identical results pass with zero errors.
    same = score(golden_dir, golden_dir, tmp_path)["scenarios"]["even"]
    assert same["verdict"] == "pass" and set(same["errors"].values()) == {0.0}
    assert s.momentum == 0.9


FIXTURE = {
    "column": "flax-fast", "framework": "Flax fast", "runnable": True, "versions": {"jax": "0.1"},
    "command": "python run_flax.py", "golden": "mpibn-golden 1", "convention": "biased moving var",
    "scenarios": {
        "even": {"verdict": "convention", "errors": {"y": 1.2e-7, "dx": 3e-7, "batch_var": 0.0, "moving_var": 0.11},
                 "errors_peer_convention": {"moving_var": 2e-8}, "note": "biased moving variance"},
        "empty_rank": {"verdict": "defect", "errors": {"y": "nan", "dx": "nan", "batch_var": "nan",
                                                       "moving_var": "nan"}, "note": "NaN from an empty device"},
        "groups_unequal": {"verdict": "unsupported", "errors": {"y": None}, "note": "no groups"},
    }}


def test_report_renders_matrix_links_missing_and_gpu_only_columns(tmp_path):
    d = tmp_path / "conformance"
    d.mkdir()
    (d / "flax-fast.json").write_text(json.dumps(FIXTURE))
    (d / "flax-fast.md").write_text("# bugs\n")
    mp = dict(FIXTURE, column="mpibn-default", framework="mpibn", convention="MindSpore",
              scenarios={"even": {"verdict": "pass", "errors": {"y": 0.0, "dx": 0.0, "batch_var": 1e-16,
                                                                   "moving_var": 0.0}}})
    (d / "mpibn-default.json").write_text(json.dumps(mp))
    (d / "horovod.json").write_text(json.dumps({"column": "horovod", "runnable": False,
                                                "framework": "Horovod", "note": "GPU kernels only."}))
    out = tmp_path / "conformance.md"
    run = subprocess.run([sys.executable, os.path.join(CONF, "report.py"), "--dir", str(d), "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    header = next(l for l in text.splitlines() if l.startswith("| scenario |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:3] == ["scenario", "mpibn (default)", "mpibn (exact)"]
    assert "Flax (fast var)" in cols and "Keras 3" in cols and "Horovod hvd.SyncBatchNorm (GPU only)" in cols
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip("|").split("|")[1:]]
            for l in text.splitlines() if l.startswith("| even") or l.startswith("| empty_rank")}
    even = dict(zip(cols[1:], rows["even"]))
    assert even["mpibn (default)"].startswith("pass") and "bv 1e-16" in even["mpibn (default)"]
    assert even["Flax (fast var)"] == "CONV<br>y 1e-07 dx 3e-07 bv 0 mv 1e-01"
    assert even["mpibn (exact)"] == "not run yet" and even["Keras 3"] == "not run yet"
    assert even["Horovod hvd.SyncBatchNorm (GPU only)"] == "GPU only: not run"
    empty = dict(zip(cols[1:], rows["empty_rank"]))
    assert empty["Flax (fast var)"].startswith("**DEFECT**") and "y nan" in empty["Flax (fast var)"]
    assert empty["mpibn (default)"] == "not in run"
    assert "[flax-fast.md](conformance/flax-fast.md)" in text
    assert "- Convention, `even`: biased moving variance (moving_var 1e-01 -> 2e-08)" in text
    assert "**Horovod hvd.SyncBatchNorm**: GPU-only kernels. GPU kernels only." in text
    assert "Not run yet (no `docs/conformance/<column>.json`): mpibn (exact), torch CPU" in text
    assert "python run_flax.py" in text and "jax 0.1" in text


def test_report_tolerates_partial_column_files(tmp_path):
    # A peer's file may be written by hand or by an older script: missing keys must not crash.
    d = tmp_path / "c"
    d.mkdir()
    (d / "keras3.json").write_text(json.dumps({"column": "keras3", "scenarios": {
        "even": {"verdict": "error", "note": "MirroredStrategy hung"}, "uneven": {"errors": {"y": 0.5}}}}))
    text = report.render(str(d))
    assert "**ERROR**" in text and "- Error, `even`: MirroredStrategy hung" in text and "? <br>y 5e-01" not in text
    assert "?<br>y 5e-01" in text


def test_report_with_no_column_files_at_all(tmp_path):
    text = report.render(str(tmp_path / "nothing"))
    assert "Not run yet" in text and "GPU only: not run" not in text and "| scenario |" in text


def test_mpibn_testing_adapter_reproduces_the_golden_files_bitwise(golden_dir, tmp_path):
    # The "mpibn exact" column's adapter: mpibn.testing.reference in one process, on a golden set.
    sys.path.insert(0, os.path.join(ROOT, "scripts", "adapters"))
    import mpibn_testing_adapter
    out = str(tmp_path / "exact")
    assert mpibn_testing_adapter.main([golden_dir, out]) == 0
    for name in ("even", "eval", "constant_channel"):
        g, r = load(os.path.join(golden_dir, name, "rank0.npz")), load(os.path.join(out, name, "rank0.npz"))
        assert set(r) <= set(g) and "y" in r
        for k in r:
            assert r[k].dtype == g[k].dtype and r[k].tobytes() == g[k].tobytes(), (name, k)


def test_rubric_accuracy_limit_against_one_ulp_of_input_change(tmp_path):
    # float32_offset (mean 1e5, std 1): one float32 ulp of x moves y by ~0.01, far above
    # verify's tolerance (~1e-5): a y off by 1e-3 is an accuracy limit, off by 1 a defect.
    golden = str(tmp_path / "g")
    G.write(golden, MPI.COMM_SELF, ["float32_offset"])
    for shift, verdict in ((1e-3, "accuracy"), (1.0, "defect")):
        res = tmp_path / f"r{shift}"
        shutil.copytree(golden, res)
        path = os.path.join(res, "float32_offset", "rank0.npz")
        d = load(path)
        d["y"] = d["y"] + np.float32(shift)
        np.savez(path, **d)
        e = score(golden, str(res), tmp_path)["scenarios"]["float32_offset"]
        assert e["verdict"] == verdict, e
        assert list(e["input_ulps"]) == ["y"]
        ulps = e["input_ulps"]["y"]
        assert (ulps < 1 if verdict == "accuracy" else ulps > column.ACCURACY_ULPS), e
        assert ("accuracy limit" if verdict == "accuracy" else "defect") in e["note"]
    text = report.render(str(tmp_path / "none"))
    assert "accuracy limit" in report.VERDICT.values() and text


def test_rubric_bound_is_the_first_order_change_of_one_ulp():
    # input_ulps against a finite-difference check: moving every x by one ulp (relative u) in the
    # worst direction changes y by at most u * bound_y (first order), and about that much.
    G_s = G.scenarios(1)["even"]
    s = dict(vars(G_s), outputs=G_s.outputs(), tail=list(G_s.tail))
    data = G.inputs(G_s, 0)
    u = 2.0 ** -24
    ref = peer_convention.recompute(s, [data])[0]
    bumped = dict(data, x=data["x"].astype(np.float64) * (1 + u * np.sign(data["x"])))
    moved = peer_convention.recompute(s, [bumped])[0]
    change = np.abs(moved["y"] - ref["y"])
    assert np.all(change <= u * ref["bound_y"] * (1 + 1e-6))
    assert change.max() > 0.01 * u * ref["bound_y"].max()
    assert column.input_ulps([(ref["y"], moved["y"])], [ref["bound_y"]], u) <= 1.0


def test_peer_reference_uses_the_same_accuracy_constant():
    sys.path.insert(0, os.path.join(ROOT, "scripts", "adapters"))
    import peer_reference
    assert peer_reference.ACCURACY_ULPS == column.ACCURACY_ULPS


def committed_columns():
    d = os.path.join(ROOT, "docs", "conformance")
    return {c: doc for c, doc in report.load_columns(d).items() if doc.get("runnable", True)}


# Where the factor of the accuracy limit decides a cell (docs/conformance/rubric.md says so).
CLOSE_CALLS = {("chainermn", "float16_offset", "y"), ("chainermn", "float16_offset", "dx")}


def test_committed_grades_follow_the_rubric():
    # docs/conformance/rubric.md: every accuracy limit is within ACCURACY_ULPS input ulps, at most
    # 4.1 outside CLOSE_CALLS; every quantity beyond the limit is at least 100 (or non-finite) outside them.
    near, far = [], []
    for col, doc in committed_columns().items():
        for name, e in (doc.get("scenarios") or {}).items():
            for q, v in (e.get("input_ulps") or {}).items():
                v = float(v)
                if v <= column.ACCURACY_ULPS:
                    if (col, name, q) not in CLOSE_CALLS:
                        near.append(v)
                else:
                    if (col, name, q) not in CLOSE_CALLS:
                        far.append(v)
                    # a defect, unless the framework documents the behaviour (the notes' verdict)
                    assert "defect" in (e["verdict"], e.get("measured_verdict")), (col, name, q, v)
            if e.get("verdict") == "accuracy":
                assert all(float(v) <= column.ACCURACY_ULPS for v in e["input_ulps"].values()), (col, name)
    assert near and far and max(near) <= 4.1 and min(far) >= 100, (max(near), min(far))


def test_committed_report_has_every_column_and_the_rubric():
    cols = committed_columns()
    for c in ("haiku", "equinox", "nnx", "keras3", "tf-keras", "torch-cpu", "chainermn", "mindspore-cpu"):
        assert c in cols, c
    with open(os.path.join(ROOT, "docs", "conformance.md")) as f:
        text = f.read()
    assert text == report.render(os.path.join(ROOT, "docs", "conformance")), "docs/conformance.md is stale"
    for part in ("## Rubric", "## Summary: what each framework gets wrong", "## Input paths", "regrade.md",
                 "| Haiku |", "Flax NNX"):
        assert part in text, part
