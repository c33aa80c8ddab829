"""bfloat16 input (ml_dtypes, optional): the layer, golden/verify and mpibn.testing.

Statistics accumulate in float64 as for every dtype; y and dx come back in
bfloat16, rounded once from float64, so they are the correctly rounded
bfloat16 values of the float64 results (within half an ulp; the bar is
1 ulp, as for float16). Skipped without ml_dtypes; without it nothing
changes (tests/test_errors.py keeps the dtype errors).
"""
import json
import os

import numpy as np
import pytest
from mpi4py import MPI

from mpibn import SyncBatchNorm
from mpibn import golden as G
from mpibn.errors import is_float
from mpibn.testing import assert_matches, reference
from mpibn.verify import compare_quantity, verify
from oracle import exact_batch_norm, ulp_distance

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed (pip install ml_dtypes)")
BF16 = np.dtype(ml_dtypes.bfloat16)


def data(shape, offset=8.0, seed=0):
    rng = np.random.default_rng(seed)
    return ((offset + 2 * rng.standard_normal(shape)).astype(BF16),
            rng.standard_normal(shape).astype(BF16))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("shape", [(6, 3), (5, 2, 3, 3)])
def test_layer_bfloat16_is_the_exact_result_rounded_once(exact, shape):
    x, dy = data(shape)
    gamma, beta = np.array([0.5, 1.25, 1.0][:shape[1]]), np.array([0.25, -0.5, 0.0][:shape[1]])
    with SyncBatchNorm(shape[1], gamma_init=gamma, beta_init=beta, comm=MPI.COMM_SELF, exact=exact,
                       dtype=np.float32) as bn:
        bn.set_train(True)
        y = bn(x)
        dx = bn.backward(dy)
        assert y.dtype == BF16 and dx.dtype == BF16 and y.shape == x.shape
        # fractions + mpmath (tests/oracle.py): the exact values, then rounded to bfloat16
        y_e, dx_e, means, variances = exact_batch_norm(x.astype(np.float64), dy.astype(np.float64),
                                                      gamma, beta, 1e-5)
        assert ulp_distance(y, y_e.astype(BF16)).max() <= 1
        assert ulp_distance(dx, dx_e.astype(BF16)).max() <= 1
        # statistics in float64, of the bfloat16 values
        np.testing.assert_allclose(bn.batch_mean, [float(m) for m in means], rtol=1e-15)
        np.testing.assert_allclose(bn.batch_var, [float(v) for v in variances], rtol=1e-13)


def test_bfloat16_rounding_is_once_not_through_float32():
    # A y just above a bfloat16 midpoint that float32 would round onto the midpoint
    # (then ties-to-even goes down): rounded once from float64, it goes up.
    x = np.array([[0.0], [2.0]], BF16)
    target = 1.0 + 2.0 ** -8 + 2.0 ** -40          # between 1 and 1 + 2^-7, just above the middle
    # eval: y = gamma (x - 1) / sqrt(1 + 1e-300) + 0 = gamma (x - 1), exact in float64
    with SyncBatchNorm(1, gamma_init=np.array([target]), beta_init=np.array([0.0]), comm=MPI.COMM_SELF,
                       eps=1e-300, moving_mean_init=np.array([1.0]), moving_var_init=np.array([1.0]),
                       dtype=np.float64) as bn:
        y = bn(x)
    assert float(y[1, 0]) == 1.0 + 2.0 ** -7
    assert float(np.float32(target).astype(BF16)) == 1.0    # what double rounding would give


def test_bfloat16_errors_and_checks_are_as_for_other_dtypes():
    assert is_float(BF16) and not is_float(np.dtype(np.int16))
    with SyncBatchNorm(2, comm=MPI.COMM_SELF) as bn:
        bn.set_train(True)
        x = np.array([[1.0, np.nan], [2.0, 3.0]], BF16)
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            bn(x)
        x, dy = data((4, 2))
        bn(x)
        x[0, 0] = x[0, 0] + np.float32(1)            # changed in place before backward
        with pytest.raises(RuntimeError, match="modified in place"):
            bn.backward(dy)


def test_reference_and_assert_matches_judge_bfloat16_at_its_precision():
    xs = [data((n, 3), seed=n)[0] for n in (3, 0, 5)]
    dys = [data((n, 3), seed=10 + n)[1] for n in (3, 0, 5)]
    res = reference(xs, dys, dtype=np.float32)
    assert res[0].y.dtype == BF16 and res[2].dx.dtype == BF16
    # a backend that returns float32 y one bfloat16 ulp off passes; half of max|y| off fails
    near = [dict(y=r.y.astype(np.float32) * np.float32(1 + 2.0 ** -8)) for r in res]
    assert_matches(near, res, quantities=["y"])
    far = [dict(y=r.y.astype(np.float32) * np.float32(1.5)) for r in res]     # 32 eps of bfloat16 is 0.25
    with pytest.raises(AssertionError, match=r"bfloat16"):
        assert_matches(far, res, quantities=["y"])
    # at float32's tolerance the near one would fail: the precision is the input's
    assert not compare_quantity([(r.y, n["y"]) for r, n in zip(res, near)], dtype=np.float32).passed


def test_golden_bfloat16_scenarios_stored_as_float32_and_verified_at_bfloat16(tmp_path):
    names = ["bfloat16", "bfloat16_params32", "float16_params32"]
    G.write(str(tmp_path / "g"), MPI.COMM_SELF, names)
    with open(tmp_path / "g" / "manifest.json") as f:
        m = json.load(f)
    assert m["scenarios"]["bfloat16"]["dtype"] == "bfloat16"
    assert m["scenarios"]["bfloat16_params32"]["param_dtype"] == "float32"
    with np.load(tmp_path / "g" / "bfloat16" / "rank0.npz") as f:
        x, y, mm = f["x"], f["y"], f["moving_mean"]
    assert x.dtype == np.float32 and np.array_equal(x.astype(BF16).astype(np.float32), x)
    assert np.array_equal(y.astype(BF16).astype(np.float32), y)
    with np.load(tmp_path / "g" / "bfloat16_params32" / "rank0.npz") as f:
        assert np.array_equal(f["moving_mean"].astype(np.float32).astype(np.float64), f["moving_mean"])
    assert not np.array_equal(mm.astype(np.float32).astype(np.float64), mm)      # float64 parameters
    # the golden set passes against itself, and a float32 result 1 bfloat16 ulp off passes too
    rows, ok = verify(str(tmp_path / "g"), str(tmp_path / "g"))
    assert ok
    res = tmp_path / "r" / "bfloat16"
    res.mkdir(parents=True)
    with np.load(tmp_path / "g" / "bfloat16" / "rank0.npz") as f:
        d = {k: f[k] for k in f.files}
    d["y"] = d["y"] * np.float32(1 + 2.0 ** -8)
    np.savez(res / "rank0.npz", **d)
    rows, ok = verify(str(tmp_path / "g"), str(tmp_path / "r"), scenarios=["bfloat16"])
    row = {r[1]: r for r in rows}["y"]
    assert ok and row[2] == "bfloat16" and row[6] == "pass"
    d["y"] = d["y"] * np.float32(1.25)
    np.savez(res / "rank0.npz", **d)
    rows, ok = verify(str(tmp_path / "g"), str(tmp_path / "r"), scenarios=["bfloat16"])
    assert not ok and {r[1]: r for r in rows}["y"][6] == "FAIL"


def test_golden_table_has_bfloat16_only_with_ml_dtypes(monkeypatch):
    assert {"bfloat16", "bfloat16_params32", "float16_params32"} <= set(G.scenarios(4))
    monkeypatch.setattr(G, "have_bfloat16", lambda: False)
    table = G.scenarios(4)
    assert "bfloat16" not in table and "float16_params32" in table
    assert table["momentum_1"].seed == G.scenarios(4)["momentum_1"].seed
    with pytest.raises(ValueError, match="pip install ml_dtypes"):
        G.select(4, ["even", "bfloat16"])
    assert os.environ.get("MPIBN_NO_SUCH") is None
