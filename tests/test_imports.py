"""The import graph of src/sd35fp8: no circles, and the layers import one way.

Every `import` / `from ... import` statement counts, at module level and inside functions alike
(a function-level import still ties the two modules together). A package's `__init__` importing its
own submodules (or a submodule importing its package) is not an edge: that is how packages re-export.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "sd35fp8"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> list[str]:
    """Module names (of this package) an import statement in `module` reaches."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
    out = []
    for name in names:
        while name and name not in mods:  # `import a.b.c` where c is an attribute: the module a.b
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}, for modules of src/sd35fp8."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(module, path, node, mods):
                own = target == module or module.startswith(target + ".") or target.startswith(module + ".")
                if not own:
                    graph[module].setdefault(target, node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or around a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in graph:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return groups


def _describe(group: list[str], graph: dict[str, dict[str, int]]) -> str:
    mods = _modules()
    edges = [f"  {a} -> {b} ({mods[a].relative_to(SRC.parent)}:{graph[a][b]})"
             for a in group for b in sorted(graph[a]) if b in group]
    return " <-> ".join(group) + "\n" + "\n".join(edges)


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert len(graph) > 50
    assert "sd35fp8.errors" in graph["sd35fp8.cli.generate"]  # `from ..errors import InputError`
    assert "sd35fp8.pipeline" in graph["sd35fp8.cli.generate"]  # inside a function
    fake = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert strongly_connected(fake) == [["a", "b", "c"]]


def test_no_import_circles():
    graph = import_graph()
    circles = strongly_connected(graph)
    assert not circles, "import circles in src/:\n" + "\n".join(_describe(c, graph) for c in circles)


# The one-way rules of the issue tracker and docs/ARCHITECTURE.md: package -> what it must not import.
# (models know math, fp8 knows FP8 math, sampling is pure, the loaders know no doors.)
DOORS = ("sd35fp8.pipeline", "sd35fp8.workflow", "sd35fp8.server", "sd35fp8.scale", "sd35fp8.cli",
         "sd35fp8.generation", "sd35fp8.tiny.")
FORBIDDEN = {
    "sd35fp8.models": ("sd35fp8.checkpoints", "sd35fp8.fp8", "sd35fp8.fast", "sd35fp8.sampling") + DOORS,
    "sd35fp8.fp8": ("sd35fp8.checkpoints", "sd35fp8.fast") + DOORS,
    "sd35fp8.sampling": ("sd35fp8.models", "sd35fp8.checkpoints", "sd35fp8.fast") + DOORS,
    "sd35fp8.checkpoints": ("sd35fp8.fast",) + DOORS,
}


def test_layers_import_one_way():
    graph = import_graph()
    mods = _modules()
    wrong = []
    for package, forbidden in FORBIDDEN.items():
        for module, targets in graph.items():
            if module != package and not module.startswith(package + "."):
                continue
            for target, line in targets.items():
                if any(target.startswith(f) if f.endswith(".") else target == f or target.startswith(f + ".")
                       for f in forbidden):
                    wrong.append(f"{module} imports {target} ({mods[module].relative_to(SRC.parent)}:{line})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)
