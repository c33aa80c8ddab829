"""Every number README.md and docs/ quote from a program is that program's output.

Each quote is marked by an HTML comment naming its command and what it must
satisfy (grammar: tests/docs_markers.py; how to use it: docs/layout.md,
"Docs that stay true"). Here:

* every marker parses, and holds no number the text below it does not say;
* every command runs and its output satisfies every check (quick commands
  in the serial stage, those marked ``stage: system`` in the system stage);
* the checker itself goes red on a wrong block, a wrong number, a broken
  claim and a stale marker (tests that cannot fail are defects);
* in the pages a newcomer reads (README, api, derivation, examples,
  layout), a number that looks measured but has no marker fails, unless it
  is listed below as a definition, a default or an identifier;
* on every page, a timing outside a marker's quote fails, unless it is a
  parameter of the run it describes (``TIMING_PARAMETERS``);
* ``python tests/docs_markers.py --update FILE`` rewrites exactly the
  ``block exact`` quotes with their commands' output;
* the README's ten-line example runs on 4 ranks and does what it says.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from mpibn.cli.launch import find_mpiexec, under_mpiexec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import docs_markers as D  # noqa: E402

ROOT = D.ROOT
MARKERS = D.all_markers()
not_under_mpiexec = pytest.mark.skipif(under_mpiexec(), reason="runs programs; once is enough (serial run)")


def _ids(markers):
    return [m.id for m in markers]


def _check(marker):
    reason = D.unmet_requirement(marker)
    if reason:
        pytest.skip(reason)
    if any(item.startswith("OPENBLAS_CORETYPE=") for item in marker.options.get("env", ())):
        import platform
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("OpenBLAS core types of x86-64")
    out = D.output(marker)
    problems = [p for c in marker.checks for p in [D.check_problems(marker, c, out)] if p]
    assert not problems, f"{marker.id} (`{marker.command}`):\n" + "\n".join(problems)


def test_the_markers_parse_and_the_teaching_pages_have_them():
    counts = {}
    for m in MARKERS:
        counts[m.path] = counts.get(m.path, 0) + 1
    for path, least in (("README.md", 1), ("docs/derivation.md", 6), ("docs/examples.md", 4),
                        ("docs/ground-truth.md", 6), ("docs/api.md", 1)):
        assert counts.get(path, 0) >= least, (path, counts.get(path, 0))


@pytest.mark.parametrize("marker", MARKERS, ids=_ids(MARKERS))
def test_every_number_a_marker_holds_is_in_the_text_below_it(marker):
    assert D.text_problems(marker) is None, D.text_problems(marker)


SERIAL = [m for m in MARKERS if m.stage == "serial"]
SYSTEM = [m for m in MARKERS if m.stage == "system"]


@not_under_mpiexec
@pytest.mark.timeout(600)
@pytest.mark.parametrize("marker", SERIAL, ids=_ids(SERIAL))
def test_quoted_output(marker):
    _check(marker)


@pytest.mark.system
@not_under_mpiexec
@pytest.mark.timeout(900)
@pytest.mark.parametrize("marker", SYSTEM, ids=_ids(SYSTEM))
def test_quoted_output_of_slow_programs(marker):
    _check(marker)


def test_the_conformance_page_is_the_rendering_of_its_measurements():
    # docs/conformance.md quotes some thousand numbers; each column file in
    # docs/conformance/ is the recorded output of one framework's run
    # (scripts/conformance/column.py), and the page must be their rendering.
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "conformance_report", os.path.join(ROOT, "scripts", "conformance", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    with open(os.path.join(ROOT, "docs", "conformance.md"), encoding="utf-8") as f:
        page = f.read()
    assert page == report.render(os.path.join(ROOT, "docs", "conformance")), \
        "docs/conformance.md is not what python scripts/conformance/report.py renders"


@pytest.mark.system
@not_under_mpiexec
@pytest.mark.timeout(300)
def test_the_recorded_peer_table_has_todays_mpibn_column(tmp_path):
    # docs/golden-peers.txt (ground-truth.md's PyTorch and Flax table) is a
    # recorded run: the torch and Flax columns need those frameworks, but the
    # mpibn-default column is this code's, and must go red when a kernel
    # change moves its last bits. Re-record: the commands in ground-truth.md,
    # "PyTorch and Flax against the golden set", then the compare.py command
    # of the marker above the table, into docs/golden-peers.txt.
    for out, extra in (("golden", []), ("mpibn-default", ["--no-exact"])):
        run = subprocess.run([sys.executable, "-m", "mpibn", "golden", "--out", str(tmp_path / out), *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-2000:]
    with open(os.path.join(ROOT, "docs", "golden-peers.txt"), encoding="utf-8") as f:
        recorded = [line.split(" | ")[:3] for line in f.read().splitlines()[2:]]
    scenarios = ",".join(dict.fromkeys(row[0].lstrip("| ") for row in recorded))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "adapters", "compare.py"),
                          str(tmp_path / "golden"), f"mpibn-default={tmp_path / 'mpibn-default'}",
                          "--scenarios", scenarios], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    live = [line.rstrip(" |").split(" | ")[:3] for line in run.stdout.splitlines()[2:]]
    assert live == recorded, "docs/golden-peers.txt's mpibn-default column is not today's"


# -- the checker fails when it should ------------------------------------------------------

def _marker(tmp_path, text):
    path = tmp_path / "page.md"
    path.write_text(textwrap.dedent(text))
    (marker,) = D.markers_in(str(path))
    return marker


OUT = ("header line\n"
       "rank 0: mean 4.935489284073 err 1.4e-15\n"
       "rank 1: mean 4.935489284073 err 1.6e-15\n"
       "final loss 0.539870275272, accuracies 0.927 0.930 0.903 0.940\n")


def _problems(marker, out=OUT):
    return [p for c in marker.checks for p in [D.check_problems(marker, c, out)] if p]


def test_a_block_must_be_the_output(tmp_path):
    good = _marker(tmp_path, """\
        <!-- output: x | block abs 1e-12 -->
        ```
        header line
        rank 0: mean 4.935489284073 err 1.8e-15
        ...
        final loss 0.539870275272, accuracies ...
        ```
        """)
    assert _problems(good) == []
    for wrong in ("rank 0: mean 4.935489284075 err 1.8e-15",      # a digit off, beyond 1e-12
                  "rank 0: mean 4.935489284073 error 1.8e-15",    # other text
                  "rank 0: mean 4.935489284073 err 1.8e-15 extra"):
        bad = _marker(tmp_path, f"""\
            <!-- output: x | block abs 1e-12 -->
            ```
            header line
            {wrong}
            ...
            ```
            """)
        assert _problems(bad), wrong
    missing = _marker(tmp_path, """\
        <!-- output: x | block exact -->
        ```
        header line
        rank 0: mean 4.935489284073 err 1.4e-15
        ```
        """)
    assert _problems(missing)                                       # lines left out need '...'


def test_a_part_is_consecutive_output_lines_and_indented_code_is_a_quote(tmp_path):
    table = _marker(tmp_path, """\
        <!-- output: x | part abs 1e-12 -->
        rank 0: mean 4.935489284073 err 1.4e-15
        rank 1: mean 4.935489284073 err 1.6e-15
        """)
    assert _problems(table) == []
    gap = _marker(tmp_path, """\
        <!-- output: x | part exact -->
        header line
        rank 1: mean 4.935489284073 err 1.6e-15
        """)
    assert _problems(gap)                                           # not consecutive
    indented = _marker(tmp_path, """\
        <!-- output: x | block exact -->

            header line
            rank 0: mean 4.935489284073 err 1.4e-15

            rank 1: mean 4.935489284073 err 1.6e-15
            final loss 0.539870275272, accuracies 0.927 0.930 0.903 0.940

        After the block.
        """)
    assert indented.fenced and "After" not in indented.quote
    assert _problems(indented)                                      # the blank line is not output
    indented.quote = indented.quote.replace("\n\n", "\n")
    assert _problems(indented) == []


def test_a_quoted_number_must_be_what_the_program_prints(tmp_path):
    ok = _marker(tmp_path, """\
        <!-- output: x | `final loss (\\S+),` = 0.540 | min `accuracies (.*)$` = 0.903 -->
        The loss is 0.540 and the accuracies go down to 0.903.
        """)
    assert _problems(ok) == []
    for quoted in ("0.425", "0.54"):     # the review's stale number; fewer digits, still right
        marker = _marker(tmp_path, f"""\
            <!-- output: x | `final loss (\\S+),` = {quoted} -->
            The loss is {quoted}.
            """)
        assert bool(_problems(marker)) == (quoted == "0.425"), quoted
    tolerant = _marker(tmp_path, """\
        <!-- output: x | `final loss (\\S+),` = 0.5 rel 0.1 -->
        About 0.5.
        """)
    assert _problems(tolerant) == []
    nothing = _marker(tmp_path, """\
        <!-- output: x | `no such line (\\S+)` = 1 -->
        1
        """)
    assert _problems(nothing)


def test_a_claim_must_hold(tmp_path):
    holds = _marker(tmp_path, """\
        <!-- output: x | max `err (\\S+)` < 1e-14 | `err (\\S+)` in 1e-16..1e-14 -->
        Errors below 1e-14, between 1e-16 and 1e-14.
        """)
    assert _problems(holds) == []
    broken = _marker(tmp_path, """\
        <!-- output: x | max `err (\\S+)` < 1.5e-15 -->
        Errors below 1.5e-15.
        """)
    assert _problems(broken)
    percent = _marker(tmp_path, """\
        <!-- output: x | first `accuracies (\\S+)` = 93% -->
        93% of them.
        """)
    assert _problems(percent) == []


def test_a_marker_cannot_hold_a_number_the_text_does_not_say(tmp_path):
    stale = _marker(tmp_path, """\
        <!-- output: x | `final loss (\\S+),` = 0.540 -->
        The loss is 0.425.
        """)
    assert D.text_problems(stale)
    assert not D.in_quote("0.54", "a loss of 0.540")                # whole numbers only
    assert D.in_quote("0.540", "a loss of 0.540.")


def test_markers_shown_as_code_are_examples_not_checks(tmp_path):
    path = tmp_path / "page.md"
    path.write_text("An example:\n\n    <!-- output: x | `y` = 1 -->\n\n```\n<!-- output: x | `y` = 1 -->\n```\n")
    assert D.markers_in(str(path)) == []


def test_update_rewrites_exact_blocks_with_fresh_output_and_nothing_else(tmp_path, capsys):
    # python tests/docs_markers.py --update FILE: after a new benchmark run,
    # one command brings every `block exact` quote up to date.
    cmd = "python -c \"print('grid 1.98'); print(); print('bars 2')\""
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent(f"""\
        Intro 0.5.

        <!-- output: {cmd} | block exact | measured-by: the bench -->
        ```
        grid 2.55
        bars 1
        ```

        Between.

          <!-- output: {cmd}
               block exact -->

            grid 9

        <!-- output: {cmd} | block exact -->
        ```
        grid 1.98
        ...
        ```

        <!-- output: {cmd} | block abs 1 -->
        ```
        grid 2.5

        bars 2
        ```
        The end.
        """))
    before = page.read_text()
    assert D.main(["--update", str(page)]) == 0
    after = page.read_text()
    fenced, indented, elided, tolerant = D.markers_in(str(page))
    assert fenced.quote == "grid 1.98\n\nbars 2"
    assert indented.quote == "grid 1.98\n\nbars 2" and "\n    grid 1.98\n\n    bars 2\n" in after
    assert elided.quote == "grid 1.98\n..." and tolerant.quote == "grid 2.5\n\nbars 2"   # kept
    for m in (fenced, indented, elided, tolerant):
        assert _problems(m, D.output(m)) == [], m.id
    # Only the two quotes changed: the text around them is as it was.
    assert after.replace("grid 1.98\n\nbars 2", "Q").replace("grid 1.98\n\n    bars 2", "Q") == \
        before.replace("grid 2.55\nbars 1", "Q").replace("grid 9", "Q")
    assert D.main(["--update", str(page)]) == 0 and page.read_text() == after       # idempotent
    assert "same" in capsys.readouterr().out


def test_update_fails_on_a_command_that_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- output: python -c \"raise SystemExit(3)\" | block exact -->\n```\nold\n```\n")
    assert D.main(["--update", str(page)]) == 1
    assert "old" in page.read_text()


def test_the_grid_report_applies_todays_bars_to_a_saved_run(tmp_path):
    # What README.md and performance.md quote: the verdicts come from the
    # code's bars, not from the JSON, so a changed bar changes the quote.
    import json
    from mpibn.cli.bench import grid

    def c(shape, dtype, ratio, us=100.0):
        return {"shape": list(shape), "dtype": dtype, "ratio": ratio, "mpibn_s": us * 1e-6,
                "torch_s": us * 1e-6 / ratio if ratio else None, "floor_s": None, "plan": "whole"}
    cells = [c((2, 4, 3, 3), "float32", 0.9), c((2, 4, 3, 3), "float64", 1.2), c((16, 8), "float32", 4.0),
             c((16, 8), "float16", None)]
    path = tmp_path / "performance-grid.json"
    path.write_text(json.dumps({"command": "mpibn bench --grid", "numpy": "2", "torch": "2", "threads": 1,
                                "rounds_best_of": 3, "clock": "cpu", "cpus": 2, "loadavg_before": [1.0],
                                "loadavg_after": [2.0], "blas": [], "cells": cells, "bars": []}))
    bars = grid.saved_report(str(path), verdicts_only=True)
    assert bars[0].startswith("bars") and len(bars) == 1 + len(grid.verdicts(cells))
    assert "(at most 1.0 x: holds)" in bars[-1]                         # the tiny layer at 0.9
    assert "worst cell (16, 8) float32" in bars[3] and "MISSED by 14 %" in bars[3]   # 4.0 against 3.5
    assert "cells above 3.5x" in bars[4] and bars[4].endswith("MISSED by 1 cell)")
    full = grid.saved_report(str(path))
    assert "BLAS kernel not recorded" in full[0] and full[-len(bars):] == bars
    assert any("n/a (100 us)" in line for line in full)                 # a cell torch could not run
    assert grid.bar_verdict(2.0, 1.0, "x") == "MISSED by 100 %" and grid.bar_verdict(3, 0, "cells") == \
        "MISSED by 3 cells" and grid.bar_verdict(0.5, 1.0, "x") == "holds"


# -- unmarked numbers in the pages a newcomer reads --------------------------------------

# Numbers that look measured but are not outputs of a program: definitions,
# defaults, versions and identifiers. Anything else in these pages that looks
# like a measurement must be under a marker.
NOT_OUTPUTS = {
    "README.md": {"1e8": "the largest |mean|/std of tests/test_accuracy.py (a parameter)"},
    "docs/derivation.md": {
        "1.1e-16": "u in float64, 2^-53 (a definition)",
        "6e-8": "u in float32, 2^-24 (a definition)",
        "1e-5": "eps's default", "1e-3": "Keras's eps default", "0.99": "Flax's and Keras's momentum",
        "6e-3": "2 sqrt(eps) for eps = 1e-5 (arithmetic in the text)",
        "2105.07576": "an arXiv identifier"},
    "docs/api.md": {"2.10": "MindSpore's version"},
    "docs/examples.md": {},
    "docs/layout.md": {},
}
LOOKS_MEASURED = re.compile(r"(?<![\w.^])\d(?:\.\d+)?e[-+]?\d+\b|(?<![\w.])\d+\.\d{2,}\b")


@pytest.mark.parametrize("path", sorted(NOT_OUTPUTS))
def test_no_unmarked_measurement_in_the_teaching_pages(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    for marker in D.markers_in(os.path.join(ROOT, path)):
        text = text.replace(marker.quote, "")
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)          # code, commands
    found = set(LOOKS_MEASURED.findall(text))
    unmarked = found - set(NOT_OUTPUTS[path])
    assert not unmarked, f"{path}: numbers with no marker: {sorted(unmarked)}"
    assert not set(NOT_OUTPUTS[path]) - found, "stale entries in NOT_OUTPUTS"


# Timings in any page: a time (ms, us, ns, or seconds with a decimal) outside
# a marker's quote is a measurement nobody re-checks, unless it is a
# parameter of the run it describes (listed here).
TIMING = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?\s?(?:ms|us|µs|ns)\b"
                    r"|(?<![\w.])\d+\.\d+(?:-\d+(?:\.\d+)?)? s\b")
TIMING_PARAMETERS = {
    "docs/performance.md": {"2 ms": "a batch of calls per timed sample (SAMPLE_S)"},
    "docs/reliability.md": {
        "2.5 s": "how late the test makes a rank", "20 ms": "the dead-rank test's polling interval",
        "0.2 s": "when the test cuts the link", "0.5 s": "how late the test makes host1"},
}


def _prose(path):
    """The page without marker quotes, comments, code blocks and indented code."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for marker in D.markers_in(path):
        text = text.replace(marker.quote, "")
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return "\n".join(line for line in text.split("\n") if not line.startswith("    "))


@pytest.mark.parametrize("path", [os.path.relpath(p, ROOT) for p in D.doc_files()])
def test_no_unmarked_timing_in_any_page(path):
    found = set(TIMING.findall(_prose(os.path.join(ROOT, path))))
    allowed = TIMING_PARAMETERS.get(path, {})
    assert not found - set(allowed), f"{path}: timings with no marker: {sorted(found - set(allowed))}"
    assert not set(allowed) - found, f"stale entries in TIMING_PARAMETERS[{path!r}]"


def test_the_timing_rule_sees_timings():
    assert TIMING.findall("took 3.2 s, then 0.74 ms and 61 us; 2-3 ms; a 3 s deadline") == \
        ["3.2 s", "0.74 ms", "61 us", "2-3 ms"]


# -- the README's ten lines ------------------------------------------------------------------

@not_under_mpiexec
@pytest.mark.timeout(120)
def test_the_readme_layer_example_runs_on_four_ranks(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## The layer in ten lines"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 11
    script = tmp_path / "ten_lines.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # whole lines per rank
    run = subprocess.run([find_mpiexec(), "-n", "4", sys.executable, "-m", "mpi4py", str(script)],
                         capture_output=True, text=True, timeout=100, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    means = {}
    for line in run.stdout.splitlines():
        rank, rest = line.split(" ", 1)
        means[int(rank)] = rest[:rest.index("]") + 1]          # bn.batch_mean, as printed
    assert sorted(means) == [0, 1, 2, 3]
    assert means[0] == means[1] and means[2] == means[3]        # one group's statistics
    assert means[0] != means[2]                                 # two groups, two batches
