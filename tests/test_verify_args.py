"""mpibn verify's arguments: unknown names exit 2 naming them; comparing nothing never passes."""
import os
import shutil

import pytest
from mpi4py import MPI

from mpibn import golden as G
from mpibn.cli.main import main


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify_args")
    golden = str(base / "golden")
    G.write(golden, MPI.COMM_SELF, ["even", "eval"])
    results = str(base / "results")
    shutil.copytree(golden, results)
    os.remove(os.path.join(results, "manifest.json"))
    return golden, results


def verify(capsys, *args):
    rc = main(["verify", *args])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("names, unknown", [
    ("ydx", ["ydx"]),                 # a typo for "y,dx": it compared nothing and exited 0
    ("y,ydx", ["ydx"]),               # the unknown one was dropped silently
    ("y,,dx", [""]),
    ("", [""]),                       # "--quantities ''" used to mean all of them
    ("Y,dx,nope", ["Y", "nope"]),
])
def test_unknown_quantities_exit_2_naming_them(dirs, capsys, names, unknown):
    rc, out = verify(capsys, *dirs, "--quantities", names)
    assert rc == 2, out
    assert f"--quantities: no quantity(ies) {unknown}" in out
    assert "'dx'" in out and "'y'" in out                 # and it lists the known ones
    assert "quantities pass" not in out


def test_known_quantities_still_compare(dirs, capsys):
    rc, out = verify(capsys, *dirs, "--quantities", "y,dx")
    assert rc == 0, out
    assert "4 of 4 quantities pass" in out                 # y and dx of even and eval


def test_a_run_comparing_nothing_never_passes(dirs, capsys):
    # eval has no batch statistics: a known quantity that the selected scenario lacks
    rc, out = verify(capsys, *dirs, "--quantities", "batch_mean", "--scenarios", "eval")
    assert rc == 1, out
    assert "nothing was compared" in out and "quantities pass" not in out


def test_all_results_missing_is_not_a_pass(dirs, capsys, tmp_path):
    empty = str(tmp_path / "empty")
    os.mkdir(empty)
    rc, out = verify(capsys, dirs[0], empty, "--skip-missing")
    assert rc == 1, out
    assert "missing" in out and "nothing was compared" in out


def test_empty_scenario_name_is_unknown(dirs, capsys):
    rc, out = verify(capsys, *dirs, "--scenarios", "")
    assert rc == 2 and "no scenario(s) ['']" in out, out
