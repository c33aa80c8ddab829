"""The teaching material says what the code does.

Serial, no MPI: the numbers docs/derivation.md quotes from
scripts/variance_demo.py are what the script prints (every other quoted
number: tests/test_docs_numbers.py); the threshold the doc names is the one
the code uses; merge_stats's masking claim holds; no document relies on
files outside the repository or repeats the false "eval mode communicates
nothing"; every relative link and anchor resolves; the figure is what
scripts/make_figure.py draws.
"""
import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mpibn import functional as F
from mpibn.cli.launch import under_mpiexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DERIVATION = os.path.join(ROOT, "docs", "derivation.md")
GROUND_TRUTH = os.path.join(ROOT, "docs", "ground-truth.md")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.mark.skipif(under_mpiexec(), reason="runs a script; once is enough (serial run)")
@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2,
                    reason="derivation.md quotes NumPy 2's output; NumPy 1.x rounds the float32 sums differently")
def test_derivation_quotes_what_variance_demo_prints():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "variance_demo.py")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    doc = _read(DERIVATION)
    block = re.search(r"```\n(float64 data, mean 1e8.*?)```", doc, re.S).group(1)
    assert block == out


@pytest.mark.skipif(under_mpiexec(), reason="runs a script; once is enough (serial run)")
def test_variance_demo_sums_the_same_float32_data_both_ways():
    # derivation.md compares float32 and float64 sums "of the same float32
    # data": the two cases must draw nothing new (same exact statistics).
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "variance_demo.py")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    heads = [line for line in out.splitlines() if "exact variance" in line]
    assert len(heads) == 3
    assert "sum of squares in float32" in heads[1] and "the same float32 data" in heads[2]
    assert heads[1].split(": exact")[1] == heads[2].split(": exact")[1]
    assert "the same float32 data" in " ".join(_read(DERIVATION).split())


def test_small_shard_threshold_in_the_doc_is_the_codes():
    # The one-shard analysis moved from derivation.md to ground-truth.md.
    doc = " ".join(_read(GROUND_TRUTH).split())
    assert F.SMALL_SHARD == 65536
    assert "at most 65536 numbers (`x.size`, all channels together" in doc


def test_small_shard_threshold_counts_every_channel():
    # x.size counts all channels: 2 channels of 40,000 values each are over
    # the threshold although each channel alone is under it. Both paths must
    # give the same moments to rounding, which pins the head's behaviour.
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 1.0, (4000, 2, 10))
    assert x.shape[0] * x.shape[2] < F.SMALL_SHARD < x.size
    n, mean, m2 = F.batch_norm_stats(x)
    assert n == 40000
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-14)
    np.testing.assert_allclose(m2, ((x - x.mean(axis=(0, 2))[:, None]) ** 2).sum(axis=(0, 2)),
                               rtol=1e-12)


def test_docs_do_not_point_outside_the_repository():
    files = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    for path in files:
        text = _read(path)
        assert "semantics.md" not in text, path
        assert "spec/" not in text, path
        assert "`peers.md` and" not in text, path


def test_no_document_says_eval_mode_communicates_nothing():
    files = ([os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
             + glob.glob(os.path.join(ROOT, "scripts", "*.py")))
    for path in files:
        flat = " ".join(_read(path).split()).lower()
        for phrase in ("eval mode communicates nothing", "nothing is communicated in eval mode",
                       "none in eval mode", "eval mode none"):
            assert phrase not in flat, (path, phrase)


def test_derivation_opens_with_the_one_round_argument():
    doc = _read(DERIVATION)
    first = doc.index("## 1.")
    assert doc[first:].startswith("## 1. Why synchronise, and why one round is enough")
    section = " ".join(doc[first:doc.index("## 2.")].split())
    for idea in ("two rounds", "Chan's merge", "allgather", "MPI_Allgather", "half the bytes"):
        assert idea in section, idea
    assert section.index("two rounds") < section.index("dataflow.png")


def _anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (but '_', a
    connector, stays: `assert_matches` gives assert_matches), spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path):
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_and_anchor_resolves():
    files = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    broken = []
    for path in files:
        text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue                                        # http:, https:, mailto:
            name, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), name)) if name else path
            if not os.path.exists(dest):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_anchor_rule():
    assert _anchor("## 1. Why synchronise, and why one round is enough".lstrip("# ")) == \
        "1-why-synchronise-and-why-one-round-is-enough"
    assert _anchor("One shard's moments") == "one-shards-moments"
    assert _anchor("One step, rank by rank: `mpibn explain`") == "one-step-rank-by-rank-mpibn-explain"
    assert _anchor("In one process: `mpibn.testing`") == "in-one-process-mpibntesting"


# Pages exempt from the no-history rule below: none ("bars of issue 13" and
# "the machine" belong to the issue tracker, not to a user's page).
HISTORY_LEFT = set()


def test_readme_is_a_front_door():
    # About 150 lines; no development history in user-facing text.
    readme = _read(os.path.join(ROOT, "README.md"))
    assert len(readme.splitlines()) <= 150
    pages = [os.path.join(ROOT, "README.md")] + [
        p for p in glob.glob(os.path.join(ROOT, "docs", "*.md")) if os.path.basename(p) not in HISTORY_LEFT]
    for path in pages:
        flat = " ".join(_read(path).split()).lower()
        assert not re.search(r"(?<!#)\bissue \d|the issue's|bars of issue", flat), path
        # ... nor the storytelling that goes with it ("before: a hang", "the old code").
        assert not re.search(r"\bbefore: |\(was: |before this change|the old code|during this work"
                             r"|measured before\b", flat), path


def _figure_module():
    pytest.importorskip("matplotlib")
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_figure", os.path.join(ROOT, "scripts", "make_figure.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_figure_draws_an_empty_ranks_payload_as_zeros():
    # Review 2026-12, error 20: rank 3 (empty) had its payload cells filled
    # like data. It writes only its header; its moments are zeros.
    mf = _figure_module()
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    mf.buffer(ax, 0, 0, {2, 3}, (2, 3))
    cells = [p for p in ax.patches]
    plt.close(fig)
    white = [tuple(p.get_facecolor()[:3]) == (1.0, 1.0, 1.0) for p in cells]
    # Two rows of 6 cells, rank 2 on top: rank 2 all coloured, rank 3's header coloured, payload white.
    assert white == [False] * 6 + [False, False, True, True, True, True]
    zeros = [t.get_text() for t in ax.texts]
    assert zeros.count("0") == 4


@pytest.mark.skipif(under_mpiexec(), reason="runs a script; once is enough (serial run)")
def test_the_figure_is_what_make_figure_draws(tmp_path):
    _figure_module()
    out = tmp_path / "dataflow.png"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_figure.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    import matplotlib.image as mpimg
    drawn, committed = mpimg.imread(str(out)), mpimg.imread(os.path.join(ROOT, "docs", "dataflow.png"))
    assert drawn.shape == committed.shape and np.abs(drawn - committed).max() < 0.1
