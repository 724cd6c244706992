"""The fct package's import graph: no cycles, and no module reaching for another's private names.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` statement anywhere in a module (module level, inside functions, under
``if TYPE_CHECKING``), relative imports resolved, and the implied import of parent packages:
importing ``fct.a.b`` runs ``fct/a/__init__.py`` first, so a module outside ``fct.a`` that
imports ``fct.a.b`` also depends on ``fct.a``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from helpers import REPO

PACKAGE = REPO / "fct"
# Modules that drive whole runs and may use fct.evaluate (besides eval.py and the tests).
EVALUATE_USERS = ("fct.experiments",)


@dataclass(frozen=True)
class Import:
    target: str  # the fct module (or package) imported
    names: tuple[str, ...]  # for ``from target import a, b``; empty for ``import target``
    line: int


def module_files() -> dict[str, Path]:
    """Dotted name -> source file of every module of the fct package (packages by __init__.py)."""
    out: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom, files: dict[str, Path]) -> str:
    """The absolute name a (possibly relative) ``from`` import refers to."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, files):
        base = base[:-1]  # a plain module's relative imports start from its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, files: dict[str, Path]) -> Iterator[Import]:
    """Every import of an fct module in ``module``'s source, wherever it stands."""
    tree = ast.parse(files[module].read_text(), filename=str(files[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in files:
                    yield Import(alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, files)
            if source not in files:
                continue
            plain = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in files:  # ``from fct.retrieval import native``: the submodule itself
                    yield Import(sub, (), node.lineno)
                else:
                    plain.append(alias.name)
            if plain or not node.names:
                yield Import(source, tuple(plain), node.lineno)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(files: Optional[dict[str, Path]] = None) -> dict[str, dict[str, int]]:
    """module -> {module it depends on: line of the import}, implied parent packages included."""
    files = files or module_files()
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    for module in files:
        # Packages already being imported when ``module`` runs: its own and those above it.
        running = set(_ancestors(module)) | ({module} if _is_package(module, files) else set())
        for imp in imports_of(module, files):
            for dep in [*_ancestors(imp.target), imp.target]:
                if dep in files and dep != module and (dep == imp.target or dep not in running):
                    graph[module].setdefault(dep, imp.line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, first repeated last) per strongly connected component
    of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, dict[str, int]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, by breadth-first search."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in comp and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_graph_sees_relative_and_parent_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "fct"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from .x import f\n")
    (pkg / "a" / "x.py").write_text("def f():\n    from fct.b import g\n")
    (pkg / "b.py").write_text("from fct.a.x import f\n")
    files = {"fct": pkg / "__init__.py", "fct.a": pkg / "a" / "__init__.py", "fct.a.x": pkg / "a" / "x.py",
             "fct.b": pkg / "b.py"}
    graph = import_graph(files)
    assert graph["fct.a"] == {"fct.a.x": 1}
    assert graph["fct.a.x"] == {"fct.b": 2}  # inside a function; its own packages are not edges
    assert graph["fct.b"] == {"fct.a": 1, "fct.a.x": 1}  # fct.a's __init__ runs first
    assert cycles(graph) == [["fct.a", "fct.a.x", "fct.b", "fct.a"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(graph, c) for c in found)


def test_no_private_names_imported() -> None:
    files = module_files()
    bad = []
    for module in files:
        for imp in imports_of(module, files):
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if imp.target.rsplit(".", 1)[-1].startswith("_") and not imp.target.endswith("__"):
                private.append(imp.target)
            bad += [f"{module} line {imp.line}: {imp.target} {name}" for name in private]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_evaluate_is_imported_only_by_drivers() -> None:
    """fct.evaluate is a top of the graph: library modules take what they need from below it."""
    files = module_files()
    users = sorted(m for m in files for imp in imports_of(m, files)
                   if imp.target == "fct.evaluate" and not m.startswith(EVALUATE_USERS))
    assert not users, f"library modules importing fct.evaluate: {', '.join(users)}"


if __name__ == "__main__":
    g = import_graph()
    for c in cycles(g):
        print(_describe(g, c))
