"""Every upstream-ready report in docs/conformance/reports/ prints what it says it prints.

Each report has one ```python block (the reproduction) and, under "## Actual",
one ```text block. A report runs here when every module on its "- Requires:"
line imports in this interpreter (the frameworks are never in CI's default
path, so there these tests skip) and it has no "- Environment:" line (those
were checked by hand). "Run: `mpiexec -n 2 ...`" reproductions run under the
mpiexec next to this Python. Output lines are compared in any order (ranks
print concurrently).
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from mpi4py import MPI
from peers_support import clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORTS = os.path.join(ROOT, "docs", "conformance", "reports")
NAMES = sorted(n for n in os.listdir(REPORTS) if n.endswith(".md") and n != "README.md")
pytestmark = [pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="serial session only"),
              pytest.mark.timeout(600)]


def parse(name):
    with open(os.path.join(REPORTS, name)) as f:
        text = f.read()
    meta = dict(re.findall(r"^- ([A-Z][A-Za-z ]*?): (.*)$", text, re.M))
    code = re.findall(r"```python\n(.*?)```", text, re.S)
    actual = re.findall(r"## Actual\n\n```text\n(.*?)```", text, re.S)
    run = re.search(r"^Run: `([^`]*)`", text, re.M)
    return text, meta, code, actual, run.group(1) if run else ""


@pytest.mark.parametrize("name", NAMES)
def test_report_has_every_part(name):
    text, meta, code, actual, run = parse(name)
    assert text.startswith("# ") and len(code) == 1 and len(actual) == 1 and run, name
    for key in ("Upstream", "Versions", "Requires", "Found by"):
        assert key in meta, (name, key)
    for heading in ("## Reproduction", "## Expected", "## Actual", "## Where in the source",
                    "## Existing upstream reports", "## Suggested fix"):
        assert heading in text, (name, heading)
    upstream = text.split("## Existing upstream reports")[1].split("##")[0]
    assert "None found" in upstream or "https://github.com/" in upstream, name


def test_every_report_is_listed_in_the_index():
    with open(os.path.join(REPORTS, "README.md")) as f:
        index = f.read()
    assert all(f"({n})" in index for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_reproduction_prints_the_actual_block(name, tmp_path):
    _, meta, code, actual, run = parse(name)
    if "Environment" in meta:
        pytest.skip(f"{name}: checked by hand ({meta['Environment']})")
    missing = [m for m in meta["Requires"].split() if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{name}: needs {missing}")
    script = tmp_path / "repro.py"
    script.write_text(code[0])
    cmd = [sys.executable, str(script)]
    if run.startswith("mpiexec"):
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", str(script)]
    env = clean_env(TF_CPP_MIN_LOG_LEVEL="3", GLOG_v="3")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.strip().splitlines()) == sorted(actual[0].strip().splitlines()), r.stdout
