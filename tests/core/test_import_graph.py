"""The package's import graph (read with ast, nothing imported): no module-level import circles, and the
layers import downward only (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """loraplex modules `path` imports when it is imported: statements outside functions and outside
    `if TYPE_CHECKING:` blocks; `from . import x` counts as module `x` when it is one, else the package."""
    name, is_pkg = _module(path), path.name == "__init__.py"
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                root = (".".join(base[: len(base) - node.level + 1] + [node.module] if node.module else
                                 base[: len(base) - node.level + 1]) if node.level else node.module or "")
                for alias in node.names:
                    found.add(f"{root}.{alias.name}" if f"{root}.{alias.name}" in modules else root)

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    paths = {_module(p): p for p in (SRC / "loraplex").rglob("*.py")}
    return {m: _top_level_imports(p, set(paths)) for m, p in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_graph_is_read():
    graph = _graph()
    assert "loraplex.config" in graph["loraplex"] and "loraplex.store" in graph["loraplex.workflows.combine"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_level_import_cycles():
    assert _cycles(_graph()) == []


def test_layers_import_downward():
    """The core imports no subsystem at module level; serve/ imports neither train/ nor the eval pass."""
    graph = _graph()
    core = [m for m in graph if m.count(".") == 1 and m not in ("loraplex.__main__",)
            and not (SRC / m.replace(".", "/")).is_dir()]
    above = ("cli", "workflows", "serve", "train", "runtime")
    upward = {m: sorted(t for t in graph[m] if t.split(".")[1:2] and t.split(".")[1] in above) for m in core}
    assert {m: t for m, t in upward.items() if t} == {}
    serve = {t for m in graph if m.startswith("loraplex.serve") for t in graph[m]}
    assert not {t for t in serve if t.startswith(("loraplex.train", "loraplex.cli"))}
    assert "loraplex.workflows.evaluate" not in serve


def test_no_private_names_imported_across_modules():
    """A leading underscore means "this module's own": no module imports another's private name."""
    found = []
    for path in (SRC / "loraplex").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("loraplex")):
                found += [f"{_module(path)}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_no_module_over_400_lines():
    """Modules stay readable in one sitting (issue 16): split by responsibility past ~400 lines."""
    long = {_module(p): n for p in (SRC / "loraplex").rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
