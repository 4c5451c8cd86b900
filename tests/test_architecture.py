"""The package's shape: no import cycles, and the layers above the front-ends never import them.

Imports are read with ``ast`` from every module, including imports inside functions, so a
cycle hidden behind a lazy import counts too.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jadapters"

# Written once against the view and the runtime: they must not know which front-end they serve.
FRONT_END_FREE = (
    "jadapters.runtime",
    "jadapters.view",
    "jadapters.partition",
    "jadapters.optim",
    "jadapters.training",
    "jadapters.compiled",
    "jadapters.merge",
    "jadapters.checkpoint",
    "jadapters.interop",
    "jadapters.adapters",
    "jadapters.strategies",
    "jadapters.registry",
)
FRONT_ENDS = ("jadapters.linen", "jadapters.nnx")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
    """The ``jadapters`` modules ``path`` imports: ``from x import y`` counts ``x.y`` when
    that is a module, else ``x``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m == "jadapters" or m.startswith("jadapters.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        imported = _imports(path, name, set(files))
        graph[name] = {m for m in imported if m in files and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_the_package():
    assert _cycles(_graph()) == []


def test_no_module_imports_its_own_package():
    """``from jadapters import x`` inside the package runs ``jadapters/__init__`` first: a
    cycle in waiting. Modules import the submodule that defines a name."""
    graph = _graph()
    # The demo, the API reference and the command line are users of the public API.
    users = ("jadapters.demo", "jadapters.apidoc", "jadapters.__main__")
    offenders = [
        m
        for m, deps in graph.items()
        if m != "jadapters" and not m.startswith(users) and "jadapters" in deps
    ]
    assert offenders == []


@pytest.mark.parametrize("layer", FRONT_END_FREE)
def test_layers_above_the_front_ends_do_not_import_them(layer):
    graph = _graph()
    modules = [m for m in graph if m == layer or m.startswith(layer + ".")]
    assert modules, layer
    bad = {
        m: sorted(d for d in graph[m] if d.startswith(FRONT_ENDS))
        for m in modules
        if any(d.startswith(FRONT_ENDS) for d in graph[m])
    }
    assert bad == {}
