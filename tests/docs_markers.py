"""Quoted outputs in README.md and docs/: the markers that tie each one to a command.

Every number the docs quote from a program is preceded by an HTML comment
(invisible when rendered) that names the command producing it and what
the quote must satisfy. tests/test_docs_numbers.py runs the commands and
checks; ``python tests/docs_markers.py [FILE...]`` does the same by hand
and prints every check, passing or not; ``python tests/docs_markers.py
--update FILE...`` rewrites every ``block exact`` quote in the files with
its command's output now (after a new benchmark run, say), and leaves the
other checks for the run without ``--update`` to judge.

Grammar (one comment; parts separated by new lines or by `` | ``)::

    <!-- output: COMMAND
         CHECK
         ...
    -->

A fenced or indented code block right after the marker is the quote
(indented blocks are dedented); otherwise the paragraph is.

COMMAND is what a reader would type, run from the repository root:
``python``/``python3`` run this interpreter, ``mpibn`` is
``python -m mpibn``, ``mpiexec`` the one mpibn's own commands start. The *quote* is what follows the comment: the next
fenced code block, or else the paragraph (up to a blank line that is not
followed by indented text; a table or a list item counts as one). Consecutive markers share the next quote.

Checks:

``block exact`` | ``block abs T`` | ``block rel T``
    The fenced block is the output. A block line ``...`` stands for any
    number of output lines; a line ending in ``...`` matches an output line
    that starts like it. Text must match exactly; numbers exactly, or within
    the tolerance (``abs 1e-14``, ``rel 1e-3``, or both: either suffices).

``part exact`` | ``part abs T`` | ``part rel T``
    The quote (a fenced block, or a paragraph such as a table) is a run of
    consecutive output lines, compared as ``block`` compares.

``[max|min] `REGEX` = VALUE [abs T] [rel T]``
    Every number the regex finds in the output (in its first group, else in
    the whole match; at least one) equals VALUE: to the digits VALUE is
    written with (half a unit of its last digit) unless a tolerance is
    given. ``max``/``min`` compare only the largest/smallest match.

``[max|min] `REGEX` <= X`` (also ``<``, ``>=``, ``>``)
    A claim ("below X"): every match (or the max/min) satisfies it.

``[max|min] `REGEX` in A..B``
    A claim ("between A and B"), for numbers that depend on the machine or
    its load: every match (or the max/min) lies in [A, B].

Every VALUE, X, A and B must also appear, written the same way, in the
quote: the marker cannot hold a number the text does not say.

A number may be written as a percentage (``-49%`` is -0.49); ``first`` and
``last`` pick one match by position, like ``max`` and ``min`` by size.

Options: ``stage: system`` (slow: runs in the system stage),
``requires: numpy>=2`` (the quote is that major version's output) or
``requires: sklearn`` (the command needs that module),
``timeout: SECONDS`` (default 300), ``recorded: PATH`` (the output is
the file PATH, written by an earlier run of COMMAND, for measurements that
need hardware or hours; the command is how to redo it), ``measured-by:
COMMAND2`` (COMMAND renders a file of measurements that COMMAND2 wrote; for
timings, which a test cannot repeat), ``env: NAME=VALUE``.
"""
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"<!--\s*output:(.*?)-->", re.S)
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
CLAIM = re.compile(r"^(?:(max|min|first|last)\s+)?`(.+)`\s*(<=|>=|<|>|=|in)\s*(.+)$")


@dataclass
class Check:
    kind: str                     # 'block', 'value' or 'claim'
    text: str                     # as written in the marker
    regex: str = ""
    aggregate: str = ""           # '', 'max' or 'min'
    op: str = ""
    values: tuple = ()            # the numbers as written (strings)
    abs_tol: float = None
    rel_tol: float = None


@dataclass
class Marker:
    path: str                     # relative to ROOT
    line: int
    command: str
    checks: list
    quote: str
    fenced: bool
    options: dict = field(default_factory=dict)

    @property
    def id(self):
        return f"{self.path}:{self.line}"

    @property
    def stage(self):
        return self.options.get("stage", "serial")


def _split(body):
    """Split a marker body on new lines and ' | ', never inside backticks."""
    parts, current, ticks, i = [], [], False, 0
    while i < len(body):
        ch = body[i]
        if ch == "`":
            ticks = not ticks
        if not ticks and (ch == "\n" or body.startswith(" | ", i)):
            parts.append("".join(current))
            current = []
            i += 1 if ch == "\n" else 3
            continue
        current.append(ch)
        i += 1
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _tolerances(words, where):
    abs_tol = rel_tol = None
    if len(words) % 2:
        raise ValueError(f"{where}: tolerance must be 'abs T' and/or 'rel T', got {' '.join(words)!r}")
    for name, value in zip(words[::2], words[1::2]):
        if name == "abs":
            abs_tol = float(value)
        elif name == "rel":
            rel_tol = float(value)
        else:
            raise ValueError(f"{where}: unknown tolerance {name!r}")
    return abs_tol, rel_tol


def parse_check(text, where):
    kind = text.split()[0] if text.split() else ""
    if kind in ("block", "part"):
        words = text.split()[1:]
        if words == ["exact"]:
            return Check(kind, text)
        abs_tol, rel_tol = _tolerances(words, where)
        if abs_tol is None and rel_tol is None:
            raise ValueError(f"{where}: '{kind}' needs 'exact' or a tolerance")
        return Check(kind, text, abs_tol=abs_tol, rel_tol=rel_tol)
    m = CLAIM.match(text)
    if not m:
        raise ValueError(f"{where}: cannot read check {text!r}")
    aggregate, regex, op, rest = m.groups()
    re.compile(regex)
    words = rest.split()
    if op == "in":
        lo, sep, hi = words[0].partition("..")
        if not sep or len(words) != 1:
            raise ValueError(f"{where}: 'in' needs A..B, got {rest!r}")
        number(lo), number(hi)
        return Check("claim", text, regex, aggregate or "", op, (lo, hi))
    number(words[0])
    if op == "=":
        abs_tol, rel_tol = _tolerances(words[1:], where)
        return Check("value", text, regex, aggregate or "", op, (words[0],), abs_tol, rel_tol)
    if len(words) != 1:
        raise ValueError(f"{where}: {op!r} takes one number, got {rest!r}")
    return Check("claim", text, regex, aggregate or "", op, (words[0],))


def _quote(text, start):
    """The fenced block or paragraph after position start (skipping blank lines
    and further markers): (quote, fenced)."""
    quote, fenced, _ = _quote_span(text, start)
    return quote, fenced


def _quote_span(text, start):
    """As _quote, and where the quote's lines lie in text: (quote, fenced, span).

    span is (first, end, prefix): the quote's lines are text[first:end], each
    written with prefix before it (the fence's indentation, or four spaces
    for an indented block); None for a paragraph."""
    pos = start
    while True:
        skipped = len(text[pos:]) - len(text[pos:].lstrip())
        if text.startswith("<!--", pos + skipped):
            pos = text.index("-->", pos + skipped) + 3
            continue
        break
    while pos < len(text) and text[pos] == "\n":
        pos += 1
    # pos: the start of the quote's first line (after the marker's own line end)
    lines = text[pos:].split("\n")
    offsets, at = [], pos
    for line in lines:
        offsets.append(at)
        at += len(line) + 1
    if lines and lines[0].lstrip().startswith("```"):
        indent = lines[0][:len(lines[0]) - len(lines[0].lstrip())]
        body = []
        for k, line in enumerate(lines[1:], 1):
            if line.strip().startswith("```"):
                first, end = offsets[1], offsets[k]
                return "\n".join(body), True, (first, end, indent)
            body.append(line[len(indent):] if line.startswith(indent) else line)
        raise ValueError("unterminated code block")
    if lines and lines[0].startswith("    "):
        # An indented code block: its lines (blank ones inside it too), dedented.
        body = []
        for k, line in enumerate(lines):
            if line.strip() and not line.startswith("    "):
                break
            if not line.strip() and not any(m.startswith("    ") for m in lines[k + 1:k + 2]):
                break
            body.append(line[4:])
        quote = "\n".join(body).rstrip("\n")
        count = len(quote.split("\n"))
        return quote, True, (offsets[0], offsets[count] if count < len(offsets) else len(text), "    ")
    para = []
    for k, line in enumerate(lines):
        if not line.strip():
            # A list item goes on past a blank line while the text stays indented.
            nxt = next((m for m in lines[k + 1:] if m.strip()), "")
            if not (para and nxt[:1].isspace()):
                break
        para.append(line)
    return "\n".join(para), False, None


def _in_code(text, pos):
    """Is pos inside a fenced code block, or on an indented (code) line?"""
    start = text.rfind("\n", 0, pos) + 1
    if text[start:pos].startswith("    "):
        return True
    fences = sum(1 for line in text[:start].split("\n") if line.lstrip().startswith("```"))
    return fences % 2 == 1


def markers_in(path):
    rel = os.path.relpath(path, ROOT)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = []
    for m in MARKER.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if _in_code(text, m.start()):
            continue                        # an example of a marker, shown as code
        where = f"{rel}:{line}"
        parts = _split(m.group(1))
        if not parts:
            raise ValueError(f"{where}: marker without a command")
        command, checks, options = parts[0], [], {}
        for part in parts[1:]:
            key, sep, value = part.partition(":")
            if sep and key.strip() in ("stage", "timeout", "recorded", "measured-by", "env", "requires") \
                    and "`" not in key:
                options.setdefault(key.strip(), value.strip()) if key.strip() != "env" else \
                    options.setdefault("env", []).append(value.strip())
                continue
            checks.append(parse_check(part, where))
        if not checks:
            raise ValueError(f"{where}: marker without a check")
        if options.get("stage", "serial") not in ("serial", "system"):
            raise ValueError(f"{where}: stage must be serial or system")
        quote, fenced = _quote(text, m.end())
        if any(c.kind == "block" for c in checks) and not fenced:
            raise ValueError(f"{where}: a 'block' check needs a code block after the marker")
        found.append(Marker(rel, line, command, checks, quote, fenced, options))
    return found


def doc_files():
    docs = os.path.join(ROOT, "docs")
    names = sorted(os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md"))
    return [os.path.join(ROOT, "README.md")] + names


def all_markers(files=None):
    return [m for path in (files or doc_files()) for m in markers_in(path)]


# -- running ------------------------------------------------------------------------------

_CACHE = {}


def argv(command):
    """The command as this interpreter runs it: ``python`` is sys.executable,
    ``mpibn`` is ``python -m mpibn``, ``mpiexec`` the one mpibn would use."""
    words = [sys.executable if w in ("python", "python3") else w for w in shlex.split(command)]
    if words[0] == "mpibn":
        return [sys.executable, "-m", "mpibn"] + words[1:]
    if words[0] == "mpiexec":
        from mpibn.cli.launch import find_mpiexec
        return [find_mpiexec()] + words[1:]
    return words


def output(marker):
    """The command's stdout (cached per command and environment), or the recorded file."""
    if "recorded" in marker.options:
        with open(os.path.join(ROOT, marker.options["recorded"]), encoding="utf-8") as f:
            return f.read()
    env_items = tuple(marker.options.get("env", ()))
    key = (marker.command, env_items)
    if key not in _CACHE:
        env = dict(os.environ)
        for item in env_items:
            name, _, value = item.partition("=")
            env[name] = value
        run = subprocess.run(argv(marker.command), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=float(marker.options.get("timeout", 300)))
        if run.returncode != 0:
            raise AssertionError(f"{marker.id}: `{marker.command}` exited {run.returncode}:\n"
                                 f"{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        _CACHE[key] = run.stdout
    return _CACHE[key]


# -- checking -----------------------------------------------------------------------------

def _close(quoted, actual, abs_tol, rel_tol):
    if abs_tol is None and rel_tol is None:
        return quoted == actual
    a, b = number(quoted), number(actual)
    if abs_tol is not None and abs(a - b) <= abs_tol:
        return True
    return rel_tol is not None and abs(a - b) <= rel_tol * max(abs(a), abs(b))


def line_matches(quoted, actual, abs_tol=None, rel_tol=None, prefix=False):
    """Text equal (trailing blanks aside), numbers equal within the tolerance;
    with prefix, actual may go on."""
    quoted, actual = quoted.rstrip(), actual.rstrip()
    q_nums, a_nums = NUMBER.findall(quoted), NUMBER.findall(actual)
    q_text, a_text = NUMBER.split(quoted), NUMBER.split(actual)
    if prefix:
        if len(q_nums) > len(a_nums):
            return False
        a_nums, a_text = a_nums[:len(q_nums)], a_text[:len(q_nums) + 1]
        if not a_text[-1].startswith(q_text[-1]):
            return False
        q_text, a_text = q_text[:-1], a_text[:-1]
    if q_text != a_text or len(q_nums) != len(a_nums):
        return False
    return all(_close(q, a, abs_tol, rel_tol) for q, a in zip(q_nums, a_nums))


def block_problems(block, out, abs_tol=None, rel_tol=None):
    """None when the quoted block is the output (with '...' elisions), else a message."""
    quoted = block.rstrip("\n").split("\n")
    actual = out.rstrip("\n").split("\n")
    memo = {}

    def match(i, j):
        if (i, j) in memo:
            return memo[i, j]
        if i == len(quoted):
            ok = j == len(actual)
        elif quoted[i].strip() == "...":
            ok = any(match(i + 1, k) for k in range(j, len(actual) + 1))
        elif j == len(actual):
            ok = False
        elif quoted[i].rstrip().endswith("..."):
            ok = (line_matches(quoted[i].rstrip()[:-3].rstrip(), actual[j], abs_tol, rel_tol, True)
                  and match(i + 1, j + 1))
        else:
            ok = line_matches(quoted[i], actual[j], abs_tol, rel_tol) and match(i + 1, j + 1)
        memo[i, j] = ok
        return ok

    if match(0, 0):
        return None
    return "the quoted block is not the output.\n--- quoted\n" + block + "\n--- output\n" + out


def _numbers(check, out):
    found = re.findall(check.regex, out, re.M)
    values = []
    for item in found:
        item = item[0] if isinstance(item, tuple) else item
        numbers = NUMBER.findall(item)
        if not numbers:
            raise AssertionError(f"`{check.regex}` matched {item!r}, which holds no number")
        values += [float(v) for v in numbers]
    if not values:
        raise AssertionError(f"`{check.regex}` matches nothing in the output")
    pick = {"max": max, "min": min, "first": lambda v: v[0], "last": lambda v: v[-1]}
    return [pick[check.aggregate](values)] if check.aggregate else values


def number(written):
    """A number as the docs write it: '0.540', '1.2e-6', '-49%' (= -0.49)."""
    return float(written[:-1]) / 100 if written.endswith("%") else float(written)


def _half_unit(written):
    """Half a unit in the last digit of a number as written ('0.540' -> 5e-4, '11%' -> 5e-3)."""
    scale = 0.01 if written.endswith("%") else 1.0
    mantissa, _, exponent = written.rstrip("%").lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return scale * 0.5 * 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def in_quote(value, quote):
    return re.search(r"(?<![\d.])" + re.escape(value) + r"(?!\d)", quote) is not None


def check_problems(marker, check, out):
    """None when the check holds against the output, else a message."""
    if check.kind == "block":
        return block_problems(marker.quote, out, check.abs_tol, check.rel_tol)
    if check.kind == "part":
        return block_problems("...\n" + marker.quote + "\n...", out, check.abs_tol, check.rel_tol)
    try:
        got = _numbers(check, out)
    except AssertionError as exc:
        return f"{check.text}: {exc}"
    if check.kind == "value":
        want = number(check.values[0])
        if check.abs_tol is None and check.rel_tol is None:
            bad = [g for g in got if abs(g - want) > _half_unit(check.values[0]) * (1 + 1e-9)]
        else:
            bad = [g for g in got if not _close(check.values[0], repr(g), check.abs_tol, check.rel_tol)]
    elif check.op == "in":
        lo, hi = map(number, check.values)
        bad = [g for g in got if not lo <= g <= hi]
    else:
        x = number(check.values[0])
        ok = {"<": lambda g: g < x, "<=": lambda g: g <= x, ">": lambda g: g > x, ">=": lambda g: g >= x}
        bad = [g for g in got if not ok[check.op](g)]
    if bad:
        return f"{check.text}: the output gives {', '.join(f'{g:.6g}' for g in got)}"
    return None


def text_problems(marker):
    """Numbers in the marker that the quote does not say."""
    missing = [v for c in marker.checks for v in c.values if not in_quote(v, marker.quote)]
    if missing:
        return f"{marker.id}: the marker holds {missing}, which the quote below it does not say"
    return None


def unmet_requirement(marker):
    """None, or why this machine cannot produce the quoted output ('requires: numpy>=2')."""
    need = marker.options.get("requires")
    if not need:
        return None
    module, _, major = need.partition(">=")
    if not major:                       # 'requires: sklearn': the module must be importable
        import importlib.util
        found = importlib.util.find_spec(module.strip()) is not None
        return None if found else f"{marker.id} needs {module.strip()}, which is not installed"
    version = __import__(module.strip()).__version__
    if int(version.split(".")[0]) < int(major):
        return f"{marker.id} quotes {need}; this is {module.strip()} {version}"
    return None


def _elided(quote):
    return any(line.strip() == "..." or line.rstrip().endswith("...") for line in quote.split("\n"))


def update(paths):
    """Rewrite each ``block exact`` quote in the files with its command's output now.

    For quotes of measurements saved in a file (``mpibn bench --grid
    --report docs/performance-grid.json``): after a new run, one command
    brings the text up to date. Quotes with ``...`` elisions, other checks
    (claims, values, tolerances) and markers whose requirement this machine
    lacks are left as they are and listed; run ``python
    tests/docs_markers.py`` after to see that every check still holds."""
    failed = 0
    for path in [os.path.abspath(p) for p in paths]:
        rel = os.path.relpath(path, ROOT)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        edits = []
        for marker, m in zip(markers_in(path), (m for m in MARKER.finditer(text)
                                                 if not _in_code(text, m.start()))):
            if not any(c.kind == "block" and c.text.split()[1:] == ["exact"] for c in marker.checks):
                continue
            if _elided(marker.quote):
                print(f"kept {marker.id}  (its block elides lines with '...')")
                continue
            if unmet_requirement(marker):
                print(f"kept {marker.id}  ({unmet_requirement(marker)})")
                continue
            try:
                out = output(marker).rstrip("\n")
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                print(f"FAIL {marker.id}  {exc}")
                failed += 1
                continue
            first, end, prefix = _quote_span(text, m.end())[2]
            new = "".join((prefix + line if line else "") + "\n" for line in out.split("\n"))
            if new != text[first:end]:
                edits.append((first, end, new))
                print(f"new  {marker.id}  {marker.command}")
            else:
                print(f"same {marker.id}  {marker.command}")
        for first, end, new in sorted(edits, reverse=True):
            text = text[:first] + new + text[end:]
        if edits:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {rel}")
    return 1 if failed else 0


def main(paths):
    if paths[:1] == ["--update"]:
        if not paths[1:]:
            print("usage: python tests/docs_markers.py --update FILE...", file=sys.stderr)
            return 2
        return update(paths[1:])
    failed = 0
    for marker in all_markers([os.path.abspath(p) for p in paths] or None):
        problems = [p for p in [text_problems(marker)] if p]
        if unmet_requirement(marker):
            print(f"skip {marker.id}  {unmet_requirement(marker)}")
            continue
        try:
            out = output(marker)
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            problems.append(str(exc))
        else:
            problems += [p for c in marker.checks for p in [check_problems(marker, c, out)] if p]
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {marker.id}  {marker.command}")
        for p in problems:
            print("     " + p.replace("\n", "\n     "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
