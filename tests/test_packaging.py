"""The wheel and the sdist are products too (marker ``system``; CI runs it last).

Builds the sdist and the wheel from a copy of the checkout, installs the
wheel with its ``mpich`` extra into a fresh venv, and from a directory
outside the checkout runs every CLI sub-command's ``--help`` (read from the
CLI's own argparse, so that a new one is not forgotten), ``mpibn demo`` and
``mpibn bench --smoke``. The unpacked sdist must hold the whole test tree,
and pytest must collect the same tests there as in the checkout.
Run alone: ``pytest -m system tests/test_packaging.py`` (about a minute;
pip takes numpy, mpi4py and mpich from its cache or the index).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from mpi4py import MPI

from mpibn.cli.main import _parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.system, pytest.mark.timeout(900),
              pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="builds and launches alone")]
JUNK = ("__pycache__", ".pytest_cache", ".hypothesis", ".venv", ".git", "build", "dist")


def sh(cmd, cwd, timeout, env=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=env or clean_env())
    assert out.returncode == 0, f"{cmd} exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def clean_env():
    # Nothing of this checkout may leak into the installed copy's imports.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("PMI", "OMPI_", "PMIX_", "MPI_LOCALNRANKS"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def files_under(top):
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in JUNK and not d.endswith(".egg-info")]
        found |= {os.path.relpath(os.path.join(dirpath, f), top) for f in filenames
                  if not f.endswith((".pyc", ".pyo"))}
    return found


def copy_checkout(dest):
    """The files git would commit (tracked and untracked, not ignored), else a filtered copy."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                               capture_output=True, text=True, check=True, timeout=60).stdout
        names = [n for n in names.split("\0") if n and os.path.isfile(os.path.join(ROOT, n))]
    except (OSError, subprocess.CalledProcessError):
        names = sorted(files_under(ROOT))                 # an unpacked sdist has no .git
    for name in names:
        os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("packaging")
    src, dist = base / "src", base / "dist"
    copy_checkout(src)
    # --no-isolation: the build backend comes from this venv (the test extra), not a download.
    sh([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
       cwd=base, timeout=300)
    (sdist,) = dist.glob("mpibn-*.tar.gz")
    (wheel,) = dist.glob("mpibn-*.whl")
    return {"base": base, "src": src, "sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def venv(built):
    env_dir = built["base"] / "venv"
    sh([sys.executable, "-m", "venv", str(env_dir)], cwd=built["base"], timeout=120)
    bindir = env_dir / "bin"
    sh([str(bindir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        f"{built['wheel']}[mpich]"], cwd=built["base"], timeout=600)
    outside = built["base"] / "elsewhere"
    outside.mkdir()
    return {"bin": bindir, "python": str(bindir / "python"), "mpibn": str(bindir / "mpibn"),
            "cwd": outside}


def subcommands():
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


def test_the_wheel_is_what_runs(venv):
    out = sh([venv["python"], "-c", "import mpibn, mpibn.cli.bench.run; print(mpibn.__file__)"],
             cwd=venv["cwd"], timeout=60)
    assert out.stdout.strip().startswith(str(venv["bin"].parent)), out.stdout


def test_every_subcommand_help_from_the_wheel(venv):
    names = subcommands()
    assert {"demo", "explain", "golden", "verify", "bench"} <= set(names)
    top = sh([venv["mpibn"], "--help"], cwd=venv["cwd"], timeout=60)
    assert top.stdout.startswith("usage: mpibn "), top.stdout      # the console script's own name
    for name in names:
        assert name in top.stdout
        out = sh([venv["mpibn"], name, "--help"], cwd=venv["cwd"], timeout=60)
        assert out.stdout.startswith(f"usage: mpibn {name}"), (name, out.stdout)
        assert "-h, --help" in out.stdout, (name, out.stdout)
    module = sh([venv["python"], "-m", "mpibn", "--help"], cwd=venv["cwd"], timeout=60)
    assert module.stdout.startswith("usage: python -m mpibn "), module.stdout


def test_demo_from_the_wheel(venv):
    out = sh([venv["mpibn"], "demo"], cwd=venv["cwd"], timeout=180)
    assert "equal the concatenated batch's" in out.stdout, out.stdout
    assert out.stdout.count("Allreduce calls 2") == 4


def test_bench_smoke_from_the_wheel(venv):
    out = sh([venv["mpibn"], "bench", "--smoke"], cwd=venv["cwd"], timeout=180)
    wrote = out.stdout.rsplit("wrote ", 1)[1].split()[0]
    assert os.path.isfile(wrote) and not os.listdir(venv["cwd"])
    shutil.rmtree(os.path.dirname(wrote))


def test_sdist_ships_the_whole_test_tree_and_pytest_collects_there(built):
    unpacked = built["base"] / "unpacked"
    with tarfile.open(built["sdist"]) as tar:
        tar.extractall(unpacked)
    (top,) = unpacked.iterdir()
    for name in ("LICENSE", "README.md", "setup.cfg", "pyproject.toml"):
        assert (top / name).is_file(), name
    assert "Apache License" in (top / "LICENSE").read_text()
    assert files_under(top / "tests") == files_under(built["src"] / "tests")
    assert files_under(top / "scripts") == files_under(built["src"] / "scripts")

    def collected(where):
        out = sh([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                 cwd=where, timeout=300)
        return sorted(line for line in out.stdout.splitlines() if "::" in line)

    ids = collected(top)
    assert len(ids) > 100 and ids == collected(built["src"])
