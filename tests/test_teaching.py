"""The teaching material says what the code does.

Serial, no MPI: the numbers docs/derivation.md quotes from
scripts/variance_demo.py are what the script prints; the threshold the doc
names is the one the code uses; merge_stats's masking claim holds; and no
document relies on files outside the repository or repeats the false
"eval mode communicates nothing".
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
    doc = " ".join(_read(DERIVATION).split())
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
