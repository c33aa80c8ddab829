"""Shared by the peer adapters' tests: a clean environment for child jobs,
a small golden set written by mpibn under its own mpiexec, and reading an
adapter's results back (verdicts, one rank's arrays)."""
import os
import subprocess
import sys

import numpy as np

from mpibn.verify import verify


def clean_env(**extra):
    """This environment without the launcher's rank variables: a child
    ``mpiexec`` or MPI program must not think it is a rank of this job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_", "HYDRA_"))}
    env.update(extra)
    return env


def write_golden(tmp_path_factory, ranks, scenarios):
    """``python -m mpibn golden`` for ``scenarios`` on ``ranks`` ranks; returns its folder."""
    out = str(tmp_path_factory.mktemp("golden"))
    run = subprocess.run([sys.executable, "-m", "mpibn", "golden", "--out", out, "--np", str(ranks),
                          "--scenarios", ",".join(scenarios)],
                         capture_output=True, text=True, timeout=300, env=clean_env())
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def run_without(module, command, tmp_path):
    """Run ``command`` (a list) with ``import module`` failing, as on a
    machine without that framework: a module of that name on PYTHONPATH
    raises ImportError."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / f"{module}.py").write_text("raise ImportError('hidden for the test')\n")
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env=clean_env(PYTHONPATH=str(hide)))


def verdicts(golden, results):
    """{(scenario, quantity): 'pass' / 'FAIL' / ...}: ``mpibn verify``'s verdict column."""
    rows, _ = verify(golden, results, skip_missing=True)
    return {(r[0], r[1]): r[6] for r in rows}


def load_rank(out, name, rank):
    """One rank's arrays of scenario ``name`` in a results folder."""
    with np.load(os.path.join(out, name, f"rank{rank}.npz")) as npz:
        return {k: npz[k] for k in npz.files}
