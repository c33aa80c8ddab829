"""The ChainerMN adapter and the peer-convention reference it is judged with.

The reference tests need only NumPy and mpibn. The adapter test needs an
environment with chainer 7.8.1 + mpi4py + numpy < 1.24, which cannot share
mpibn's numpy 2 environment: point ``MPIBN_CHAINERMN_PYTHON`` at its Python
(docs/conformance/chainermn.md has the install commands), or run pytest in
it; without either the test is skipped. Serial session only (the adapter
and ``mpibn golden --np 2`` launch their own mpiexec jobs).
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from peers_support import clean_env, run_without, write_golden
from mpi4py import MPI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTERS = os.path.join(ROOT, "scripts", "adapters")
sys.path.insert(0, ADAPTERS)
from common import load  # noqa: E402
from peer_reference import describe, judge, normwise, reference  # noqa: E402

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="serial session only")


def framework_python(module, variable):
    """The Python that has ``module``: $variable, else this one if it has it, else None."""
    given = os.environ.get(variable)
    if given:
        return given
    return sys.executable if importlib.util.find_spec(module) is not None else None


CHAINER_PY = framework_python("chainer", "MPIBN_CHAINERMN_PYTHON")


@pytest.fixture(scope="module")
def golden2(tmp_path_factory):
    """A 2-rank golden set (equal, unequal and empty shards), written by mpibn under mpiexec."""
    return write_golden(tmp_path_factory, 2, ['even', 'uneven', 'empty_rank', 'float32_offset', 'eval'])


def test_reference_with_mpibn_conventions_reproduces_the_golden_files(golden2):
    # The peer reference is only a fair judge if, with mpibn's knobs, it IS mpibn.
    manifest, data = load(golden2)
    for name, s in manifest["scenarios"].items():
        ref = reference(s, data[name])
        for q in s["outputs"]:
            err = normwise([r[q] for r in ref], [g[q] for g in data[name]])
            bound = 1e-6 if q in ("y", "dx") else 1e-14     # y, dx are stored in float32
            assert err <= bound, (name, q, err)


def test_rank_weights_change_nothing_for_equal_shards_and_everything_for_unequal(golden2):
    manifest, data = load(golden2)
    for name, differs in (("even", False), ("uneven", True)):
        s = manifest["scenarios"][name]
        a = reference(s, data[name])
        b = reference(s, data[name], weights="rank")
        err = normwise([r["batch_mean"] for r in b], [r["batch_mean"] for r in a])
        assert (err > 1e-3) if differs else (err < 1e-15), (name, err)


def test_rank_weighted_dx_is_the_exact_gradient_of_the_rank_weighted_forward():
    # Why ChainerMN's weighting is a convention and not a defect: its backward
    # (inv_m = 1 / local count with the group's sums averaged over ranks) is the
    # gradient of its own forward. Checked here by central differences on the
    # reference's float64 formulas, shards [1, 3].
    rng = np.random.default_rng(7)
    shards, C = [1, 3], 2
    s = {"outputs": ["y", "dx", "dgamma", "dbeta", "batch_mean", "batch_var", "moving_mean", "moving_var"],
         "groups_of_rank": [[0, 1], [0, 1]], "eps": 1e-3, "momentum": 0.9, "training": True,
         "use_batch_statistics": None}
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.uniform(-0.5, 0.5, C)
    ranks = [{"x": rng.standard_normal((2, n, C)) * 2 + 1, "dy": rng.standard_normal((2, n, C)),
              "gamma": gamma, "beta": beta, "moving_mean0": np.zeros(C), "moving_var0": np.ones(C)}
             for n in shards]

    def loss():
        ref = reference(s, ranks, weights="rank")
        return sum(float((r["y"][0] * d["dy"][0]).sum()) for r, d in zip(ref, ranks))

    dx = reference(s, ranks, weights="rank")
    h = 1e-6
    for r, d in enumerate(ranks):
        for i in np.ndindex(d["x"][0].shape):
            keep = d["x"][0][i]
            d["x"][0][i] = keep + h
            up = loss()
            d["x"][0][i] = keep - h
            down = loss()
            d["x"][0][i] = keep
            assert abs((up - down) / (2 * h) - dx[r]["dx"][0][i]) < 1e-7, (r, i)


def test_judge_tells_conventions_from_defects_on_synthetic_peers(golden2):
    # A "peer" that IS the reference under ChainerMN's conventions (equal rank
    # weights, group-mean gradient share) is a convention; one that also uses
    # the local count for the moving variance is a defect, explained by that rung.
    manifest, data = load(golden2)

    def peer(s, ranks, **knobs):               # a float32 framework returns y and dx in float32
        return [dict(r, y=r["y"].astype(np.float32), dx=r["dx"].astype(np.float32))
                for r in reference(s, ranks, **knobs)]

    s = manifest["scenarios"]["uneven"]
    ladder = [("share", "convention", {"grad_share": "group_mean"}),
              ("rank_weights", "convention", {"weights": "rank"}),
              ("local_count", "defect", {"moving_var_count": "local"})]
    as_designed = peer(s, data["uneven"], weights="rank", grad_share="group_mean")
    j = judge(s, data["uneven"], as_designed, ladder)
    assert j["verdict"] == "convention", j
    assert j["explained"]["batch_mean"] == "rank_weights"
    even = manifest["scenarios"]["even"]
    j_even = judge(even, data["even"], peer(even, data["even"], grad_share="group_mean"), ladder)
    assert j_even["verdict"] == "convention" and j_even["explained"] == {"dgamma": "share", "dbeta": "share"}
    as_coded = peer(s, data["uneven"], weights="rank", grad_share="group_mean", moving_var_count="local")
    j = judge(s, data["uneven"], as_coded, ladder)
    assert j["verdict"] == "defect" and j["explained"]["moving_var"] == "local_count", j
    assert j["errors_as_implemented"]["moving_var"] < 1e-15
    assert "moving_var: off" not in describe(j["explained"], {"local_count": "local count"})
    # And mpibn itself passes.
    assert judge(s, data["uneven"], data["uneven"], ladder)["verdict"] == "pass"


@pytest.mark.skipif(CHAINER_PY is None, reason="chainer not installed here and MPIBN_CHAINERMN_PYTHON not set "
                                               "(see docs/conformance/chainermn.md)")
def test_chainermn_adapter_on_a_small_golden_set(golden2, tmp_path):
    out = tmp_path / "cmn"
    doc = tmp_path / "chainermn.json"
    run = subprocess.run([CHAINER_PY, os.path.join(ADAPTERS, "chainermn_adapter.py"), golden2, str(out),
                          "--json", str(doc), "--timeout", "120"],
                         capture_output=True, text=True, timeout=900, env=clean_env())
    assert run.returncode == 0, run.stdout + run.stderr
    cells = json.loads(doc.read_text())["scenarios"]
    # Equal shards: y and dx are the concatenated batch's; the gradient share is
    # ChainerMN's; the moving variance uses the local count (48, not 96).
    even = cells["even"]
    assert even["errors"]["y"] < 1e-6 and even["errors"]["dx"] < 1e-6
    assert even["verdict"] == "defect" and "defect D1" in even["note"]
    assert even["errors_as_implemented"]["moving_var"] < 1e-6 < even["errors"]["moving_var"]
    # Unequal shards: statistics weighted per rank, a convention that explains y.
    assert cells["uneven"]["errors"]["y"] > 1e-3 and cells["uneven"]["errors_peer_convention"]["y"] < 1e-6
    # An empty rank: the job fails (ZeroDivisionError in backward) rather than hangs.
    assert cells["empty_rank"]["verdict"] == "error" and "ZeroDivisionError" in cells["empty_rank"]["note"]
    # float32 with |mean|/std = 1e5: E[x^2] - E[x]^2 in float32 destroys the variance.
    assert cells["float32_offset"]["verdict"] == "defect"
    assert cells["eval"]["verdict"] == "pass"


def test_chainermn_adapter_exits_cleanly_without_chainer(golden2, tmp_path):
    run = run_without("chainer", [sys.executable, os.path.join(ADAPTERS, "chainermn_adapter.py"), golden2,
                                  str(tmp_path / "o")], tmp_path)
    assert run.returncode != 0 and "docs/conformance/chainermn.md" in run.stderr, run.stderr
