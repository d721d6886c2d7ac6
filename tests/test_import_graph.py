"""The import graph of ``src/attnzoo``: no cycles between modules, and no import from a lower layer
into a higher one (layers as in the architecture notes: registry/ops < modules < networks <
bench/viz < cli). Read with ``ast``, so imports inside functions count too; imports under
``if TYPE_CHECKING:`` (type hints only) and of the lazy top-level facade ``attnzoo`` do not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "attnzoo"

#: top-level part of a module name -> its layer (a module may import its own layer and below)
LAYERS = {
    "_atomic": 0,
    "registry": 0,
    "ops": 0,
    "specs": 0,
    "modules": 1,
    "models": 2,
    "detection": 2,
    "segmentation": 2,
    "datasets": 2,
    "integrations": 2,
    "fast": 2,
    "bench": 3,
    "viz": 3,
    "cli": 4,
    "__main__": 4,
}

#: the known upward edges, each with its reason (keep this short; a new entry needs one)
ALLOWED_UPWARD: set[tuple[str, str]] = set()  # none: a new entry needs its reason here


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``tree`` (the module ``name``) imports at run time."""
    found: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        stack.extend(ast.iter_child_nodes(node))
    return {m for m in found if m in known and m not in (name, ROOT)}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (SRC / ROOT).rglob("*.py")}
    known = set(files)
    return {
        name: _imports(
            ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known
        )
        for name, path in files.items()
    }


def _layer(module: str) -> int:
    top = module.split(".")[1]
    if top not in LAYERS:
        raise AssertionError(f"{module}: add its package {top!r} to LAYERS in this test")
    return LAYERS[top]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "attnzoo.bench.engine" in graph["attnzoo.bench.run"]
    assert "attnzoo.bench.tasks.base" in graph["attnzoo.bench.tasks.classify"]
    assert "attnzoo.registry" in graph["attnzoo.modules.se"]


def test_no_import_cycles() -> None:
    # an allowed upward edge runs inside a function, after both modules are loaded
    graph = {
        a: {b for b in targets if (a, b) not in ALLOWED_UPWARD}
        for a, targets in import_graph().items()
    }
    cycles = _cycles(graph)
    assert not cycles, "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_upward_imports_between_layers() -> None:
    bad = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, targets in import_graph().items()
        for b in sorted(targets)
        if a != ROOT and _layer(b) > _layer(a) and (a, b) not in ALLOWED_UPWARD
    ]
    assert not bad, "\n".join(bad)
    graph = import_graph()
    stale = [edge for edge in ALLOWED_UPWARD if edge[1] not in graph.get(edge[0], set())]
    assert not stale, f"allowed upward edges that no longer exist (remove them): {stale}"


def test_the_checker_finds_a_cycle_and_an_upward_edge() -> None:
    graph = {
        "attnzoo.a": {"attnzoo.b"},
        "attnzoo.b": {"attnzoo.c"},
        "attnzoo.c": {"attnzoo.a"},
        "attnzoo.d": set(),
    }
    assert _cycles(graph) == [["attnzoo.a", "attnzoo.b", "attnzoo.c"]]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import attnzoo.x\n"
        "def f():\n    from attnzoo.models import y\n"
    )
    known = {"attnzoo.x", "attnzoo.models", "attnzoo.models.y"}
    assert _imports(tree, "attnzoo.ops.z", False, known) == {"attnzoo.models.y"}
    assert _layer("attnzoo.models.y") > _layer("attnzoo.ops.z")
    with pytest.raises(AssertionError, match="add its package"):
        _layer("attnzoo.unknown_pkg.m")
