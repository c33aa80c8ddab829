"""The Keras adapter (Keras 3 and tf_keras) on a small 3-rank golden set (skipped without TensorFlow).

Serial session only: the golden set comes from ``python -m mpibn golden --np
3`` (its own mpiexec) and the adapter runs TensorFlow in subprocesses, which
must not inherit an MPI job. TensorFlow, keras and tf_keras come with the
``keras`` extra (never in CI's default path); docs/conformance/keras3.md.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from peers_support import clean_env, load_rank, run_without, verdicts, write_golden
from mpi4py import MPI

from mpibn import golden as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTER = os.path.join(ROOT, "scripts", "adapters", "keras_adapter.py")
COLUMN = os.path.join(ROOT, "scripts", "conformance", "column.py")
pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="serial session only")


def have(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    """uneven: shards [1, 3, 5]; empty_rank: [3, 0, 3]; both float32, 4-D, two training steps."""
    return write_golden(tmp_path_factory, 3, ['uneven', 'empty_rank'])


def run_adapter(golden, out, version, *extra):
    return subprocess.run([sys.executable, ADAPTER, golden, out, "--keras", version, *extra],
                          capture_output=True, text=True, timeout=600, env=clean_env())


def biased_moving_var(golden, name, rank, momentum=0.9):
    # Keras' convention, written out independently of the adapter: the BIASED batch variance.
    g = load_rank(golden, name, rank)
    mv, steps = g["moving_var0"], []
    for t in range(2):
        mv = momentum * mv + (1 - momentum) * g["batch_var"][t]
        steps.append(mv)
    return np.stack(steps)


@pytest.mark.skipif(not have("tensorflow", "keras"), reason="tensorflow/keras not installed")
def test_keras3_synchronises_uneven_and_empty_shards(golden_dir, tmp_path):
    out, report = str(tmp_path / "k3"), str(tmp_path / "keras3.json")
    run = run_adapter(golden_dir, out, "3")
    assert run.returncode == 0, run.stdout + run.stderr
    v = verdicts(golden_dir, out)
    # Real synchronisation: every rank's y and dx follow the statistics of the whole
    # uneven batch (shards of 1, 3 and 5 samples; an empty one), at 32 float32 eps.
    for name in ("uneven", "empty_rank"):
        for q in ("y", "dx", "dgamma", "dbeta", "batch_mean", "batch_var", "moving_mean"):
            assert v[(name, q)] == "pass", (name, q)
        # The moving variance is Keras' biased one: off under MindSpore's convention...
        assert v[(name, "moving_var")] == "FAIL", name
        for r in range(3):         # ...and within 32 float32 eps under Keras' own.
            got = load_rank(out, name, r)["moving_var"]
            ref = biased_moving_var(golden_dir, name, r)
            assert np.abs(got - ref).max() <= 32 * np.finfo(np.float32).eps * np.abs(ref).max(), (name, r)
    # Scored as docs/conformance/keras3.json is: a convention difference, not a defect.
    score = subprocess.run([sys.executable, COLUMN, golden_dir, out, "--column", "keras3", "--out", report,
                            "--peer-moving-var", "biased", "--peer-stats-dtype", "float32", "--framework", "k",
                            "--convention", "c", "--command", "c"],
                           capture_output=True, text=True, timeout=300, env=clean_env())
    assert score.returncode == 0, score.stdout + score.stderr
    with open(report) as f:
        doc = json.load(f)
    for name in ("uneven", "empty_rank"):
        e = doc["scenarios"][name]
        assert e["verdict"] == "convention", e
        assert e["errors"]["moving_var"] > 1e-4 > 1e-6 > e["errors_peer_convention"]["moving_var"], e
        assert e["errors"]["y"] < 1e-6 and e["errors"]["dx"] < 1e-6, e


@pytest.mark.skipif(not have("tensorflow", "tf_keras"), reason="tensorflow/tf_keras not installed")
def test_tf_keras_empty_replica_keeps_its_moving_statistics(golden_dir, tmp_path):
    out = str(tmp_path / "tfk")
    run = run_adapter(golden_dir, out, "2", "--scenarios", "empty_rank")
    assert run.returncode == 0, run.stdout + run.stderr
    v = verdicts(golden_dir, out)
    for q in ("y", "dx", "dgamma", "dbeta"):
        assert v[("empty_rank", q)] == "pass", q
    # The defect written up in docs/conformance/tf-keras.md: the replica with no
    # sample replaces the group's statistics by 0 and skips the moving-average
    # update, so its copy stays at the initial value while the other replicas move.
    # If tf_keras fixes it, this fails: update the doc.
    g = load_rank(golden_dir, "empty_rank", 1)
    r0, r1 = load_rank(out, "empty_rank", 0), load_rank(out, "empty_rank", 1)
    assert np.abs(r0["batch_mean"] - g["batch_mean"]).max() <= 1e-6 * np.abs(g["batch_mean"]).max()
    assert not r1["batch_mean"].any() and not r1["batch_var"].any()
    np.testing.assert_array_equal(r1["moving_mean"][1], g["moving_mean0"].astype(np.float32))
    assert np.abs(r0["moving_mean"][1] - g["moving_mean"][1]).max() <= 1e-5 * np.abs(g["moving_mean"][1]).max()
    # and the cross-replica read (what a checkpoint stores) is the mean of the copies
    with open(os.path.join(out, "empty_rank", "keras_diag_0.json")) as f:
        diag = json.load(f)
    assert max(diag["aggregated_minus_local_moving_mean"][1]) > 0.01


def test_keras_adapter_says_what_to_install_without_tensorflow(tmp_path):
    # A one-rank golden set written in-process (no mpiexec): the adapter must stop at the import.
    golden = str(tmp_path / "golden")
    G.write(golden, MPI.COMM_SELF, ["uneven"])
    run = run_without("tensorflow", [sys.executable, ADAPTER, golden, str(tmp_path / "o"), "--keras", "3"],
                      tmp_path)
    assert run.returncode != 0 and "pip install 'mpibn[keras]'" in run.stderr, run.stdout + run.stderr
    assert not os.path.exists(tmp_path / "o" / "uneven" / "rank0.npz")


@pytest.mark.timeout(1800)
@pytest.mark.skipif(not have("tensorflow", "keras", "tf_keras"), reason="tensorflow/keras/tf_keras not installed")
def test_a_mask_that_masks_nothing_turns_keras3_synchronisation_off(golden_dir, tmp_path):
    # docs/conformance/reports/keras3-mask-disables-sync.md, found by the adapter's mask path:
    # an all-True mask= must not change anything. tf_keras keeps synchronising; Keras 3.15.1
    # normalises each replica with its own statistics. If Keras fixes it, this fails: update the report.
    for version, synchronised in (("2", True), ("3", False)):
        out = str(tmp_path / f"k{version}")
        run = run_adapter(golden_dir, out, version, "--path", "mask", "--scenarios", "uneven")
        assert run.returncode == 0, run.stdout + run.stderr
        v = verdicts(golden_dir, out)
        for q in ("y", "dx", "batch_mean"):
            assert (v[("uneven", q)] == "pass") == synchronised, (version, q)
        if not synchronised:        # replica 2 (5 samples) normalised by its own mean
            g, got = load_rank(golden_dir, "uneven", 2), load_rank(out, "uneven", 2)
            own = g["x"][0].astype(np.float64).mean(axis=(0, 2, 3))
            np.testing.assert_allclose(got["batch_mean"][0], own, rtol=1e-5)
            assert np.abs(got["batch_mean"][0] - g["batch_mean"][0]).max() > 0.05
