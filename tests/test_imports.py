"""The package's import graph, built from the source: no cycles (deferred imports inside
functions count too), and the layering of docs/index.md ("where things live")."""

from __future__ import annotations

import ast
from pathlib import Path

import attnkit

SRC = Path(attnkit.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the attnkit modules it imports anywhere in its source (top level or deferred)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:  # attnkit.x.y.name -> the module that defines it
                    t = t.rpartition(".")[0]
                if t.startswith("attnkit") and t != mod:
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_edges(graph):
    """Edges between modules, ignoring a package's __init__ re-exporting its own submodules."""
    for a, targets in graph.items():
        for b in targets:
            if not (b.startswith(a + ".") or a.startswith(b + ".")):
                yield a, b


def test_no_import_cycles():
    graph = {a: {b for b in t if not (b.startswith(a + ".") or a.startswith(b + "."))}
             for a, t in import_graph().items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


LAYERS = [  # lower layers never import higher ones (docs/index.md, "where things live")
    {"attnkit._validate", "attnkit._hash", "attnkit._numerics", "attnkit._memory", "attnkit.tolerances",
     "attnkit._nonfinite"},
    {"attnkit.masks", "attnkit.biases", "attnkit.caches"},
    {"attnkit._call", "attnkit.backends", "attnkit.dispatch", "attnkit.functional", "attnkit.positions"},
    {"attnkit.variants"},
    {"attnkit.nn"},
    {"attnkit.models"},
    {"attnkit.distributed"},
    {"attnkit.tasks"},
    {"attnkit.train"},
    {"attnkit.cli"},
]


def _layer(mod: str) -> int | None:
    for i, group in enumerate(LAYERS):
        if any(mod == g or mod.startswith(g + ".") for g in group):
            return i
    return None


def test_layers_only_import_downwards():
    up = [(a, b) for a, b in _package_edges(import_graph())
          if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)]
    assert up == []
