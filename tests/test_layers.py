"""The package's layers point one way: no import cycle among regionclip's modules, and the importer
of RegionCLIP's released files (``regionclip.zoo``) is a leaf the core never imports.

Imports are read from the source with ``ast``, those inside functions included (a lazy import is
still a dependency), so the test sees what ``import`` at run time might hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

import regionclip

ROOT = Path(regionclip.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ["regionclip", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from .pkg import sub` imports the submodule `pkg.sub` when there is one.
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_regionclip_modules():
    graph = _graph()
    # The root package names its public objects (TYPE_CHECKING imports, a lazy table); it is
    # the top, importing everything, so it takes no part in a cycle check of the layers below.
    graph.pop("regionclip", None)
    for edges in graph.values():
        edges.discard("regionclip")
    assert _cycles(graph) == [], "import cycles (each a group of modules importing each other)"


def test_the_importer_is_a_leaf():
    graph = _graph()
    users = sorted(m for m, edges in graph.items()
                   if not m.startswith("regionclip.zoo") and any(e.startswith("regionclip.zoo") for e in edges))
    assert users == [], f"core modules importing regionclip.zoo (the importer): {users}"


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
