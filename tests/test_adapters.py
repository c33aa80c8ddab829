"""The PyTorch and JAX/Flax adapters on a small golden set (skipped without the framework).

Serial session only (they write one golden set on COMM_SELF and run the
framework in a subprocess, which must not inherit an MPI job).
"""
import importlib.util
import os
import subprocess
import sys

import pytest
from mpi4py import MPI

from mpibn import golden as G
from peers_support import verdicts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTERS = os.path.join(ROOT, "scripts", "adapters")
pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="serial session only")


def have(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("golden"))
    G.write(out, MPI.COMM_SELF, ["even", "two_d", "float32_offset", "eval", "momentum"])
    return out


def run_adapter(script, golden, out, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_"))}
    return subprocess.run([sys.executable, os.path.join(ADAPTERS, script), golden, out, *extra],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.skipif(not have("torch"), reason="torch not installed (pip install 'mpibn[torch]')")
def test_torch_adapter_matches_on_ordinary_data(golden_dir, tmp_path):
    run = run_adapter("torch_adapter.py", golden_dir, str(tmp_path / "torch"))
    assert run.returncode == 0, run.stdout + run.stderr
    v = verdicts(golden_dir, str(tmp_path / "torch"))
    for name in ("even", "eval", "momentum"):     # float32 accuracy, MindSpore conventions
        for q in ("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_var"):
            assert v[(name, q)] == "pass", (name, q)
    assert v[("float32_offset", "batch_mean")] == "pass"


@pytest.mark.skipif(not have("jax", "flax"), reason="jax/flax not installed (pip install 'mpibn[jax]')")
def test_jax_adapter_runs_and_shows_flax_conventions(golden_dir, tmp_path):
    run = run_adapter("jax_adapter.py", golden_dir, str(tmp_path / "flax"), "--exact-variance")
    assert run.returncode == 0, run.stdout + run.stderr
    v = verdicts(golden_dir, str(tmp_path / "flax"))
    # One rank: no uneven-shard problem, so y, dx and the moving mean agree...
    for q in ("y", "dx", "dgamma", "dbeta", "moving_mean"):
        assert v[("even", q)] == "pass", q
    # ...but Flax's moving variance is the biased one (MindSpore's is unbiased).
    assert v[("even", "moving_var")] == "FAIL"


def test_adapters_exit_cleanly_without_their_framework(golden_dir, tmp_path):
    # With the framework hidden, an adapter says what to install instead of a traceback.
    hide = tmp_path / "hide"
    hide.mkdir()
    for name in ("torch", "jax", "flax"):
        (hide / f"{name}.py").write_text("raise ImportError('hidden for the test')\n")
    env = dict(os.environ, PYTHONPATH=str(hide))
    env = {k: v for k, v in env.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_"))}
    for script in ("torch_adapter.py", "jax_adapter.py"):
        run = subprocess.run([sys.executable, os.path.join(ADAPTERS, script), golden_dir, str(tmp_path / "o")],
                             capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode != 0 and "pip install 'mpibn[" in run.stderr, run.stderr
