"""The package's layout, read from its source (AST, nothing imported): no import
cycles, nothing in the reference imports the command line, no long functions.

The import graph has one node per module of ``mpibn/`` and one edge per
import of another mpibn module, wherever it is written: at the top, inside a
function (a deferred import is still a dependency), or under
``if TYPE_CHECKING``. The package's ``__init__`` is left out as a source of
edges: it is the facade that re-exports names on first use, and every
submodule already loads it before itself.
"""
import ast
import os


PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mpibn")

#: Edges that close a cycle on purpose, each with its reason. Remove one with its reason.
ALLOWED_EDGES = {
    ("mpibn.functional", "mpibn.sync"):
        "the one-release shim functional.__getattr__ (mpibn.functional.sync_batch_norm); goes with it",
}


MAX_FUNCTION_LINES = 80
#: The modules outside mpibn/cli that may import it: ``python -m mpibn`` runs the command line,
#: and the one-release shims at the old paths re-export what moved (docs/layout.md, "Deprecated paths").
CLI_ENTRY = "mpibn.__main__"
CLI_SHIMS = ("mpibn.bench", "mpibn.bench_grid", "mpibn.demo", "mpibn.explain", "mpibn.launch")


def modules():
    """{dotted module name: path} for every .py file under mpibn/."""
    found = {}
    root = os.path.dirname(PACKAGE)
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def import_edges(name, path, known):
    """The mpibn modules that module ``name`` imports, anywhere in its source."""
    is_package = os.path.basename(path) == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                while parts and ".".join(parts) not in known:
                    parts.pop()
                if parts:
                    targets.add(".".join(parts))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                base = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                base = node.module or ""
            if base not in known:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in known else base)
    targets.discard(name)
    return targets


def import_graph():
    known = modules()
    return {name: import_edges(name, path, known) for name, path in known.items()}


def cycles(graph):
    """Every strongly connected component of more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def without(graph, edges):
    return {a: {b for b in targets if (a, b) not in edges} for a, targets in graph.items()}


def reference_graph():
    """The graph the cycle rule applies to: no facade edges, no allowed or known ones."""
    graph = import_graph()
    graph["mpibn"] = set()
    return without(graph, set(ALLOWED_EDGES))


def test_the_graph_sees_deferred_imports():
    # Negative control: checkpoint imports parameter at the top, functional imports
    # sync only inside its shim; both must show up, and a planted cycle must be found.
    graph = import_graph()
    assert "mpibn.parameter" in graph["mpibn.checkpoint"]
    assert "mpibn.sync" in graph["mpibn.functional"]      # the shim's deferred import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(reference_graph())
    assert not found, f"import cycles among mpibn's modules: {found}"


def test_nothing_outside_the_cli_imports_it():
    offenders = sorted((a, b) for a, targets in import_graph().items() for b in targets
                       if (b == "mpibn.cli" or b.startswith("mpibn.cli."))
                       and not (a == "mpibn.cli" or a.startswith("mpibn.cli."))
                       and a != CLI_ENTRY and a not in CLI_SHIMS)
    assert not offenders, f"the reference imports the command line: {offenders}"


def long_functions():
    """{module.qualname: lines} of every function (methods and nested ones too) over the limit."""
    found = {}
    for name, path in modules().items():
        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualname = f"{prefix}.{child.name}"
                    lines = child.end_lineno - child.lineno + 1
                    if not isinstance(child, ast.ClassDef) and lines > MAX_FUNCTION_LINES:
                        found[qualname] = lines
                    visit(child, qualname)
                else:
                    visit(child, prefix)
        visit(parse(path), name)
    return found


def test_no_function_over_80_lines():
    found = long_functions()
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines (split them): {found}"
