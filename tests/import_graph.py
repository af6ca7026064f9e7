"""The import graph of the ``llmcompress`` package, read from the source (every import statement,
at module level or inside a function), and its cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "llmcompress"


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports. ``from X import name``
    counts as importing ``X.name`` where that is a module, else ``X``. Importing ``a.b.c`` also
    runs ``a.b``'s ``__init__``, so it counts as importing every package above it that does not
    hold the importer (a module inside ``a.b`` runs within that package's import already)."""
    files = {module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in found:
                graph[name].update(_with_parents(target, name, files))
    return graph


def _with_parents(target: str, importer: str, files: dict[str, Path]) -> set[str]:
    """``target`` and the packages whose ``__init__`` importing it runs, except those holding the importer."""
    parts = target.split(".")
    packages = {".".join(parts[:n]) for n in range(1, len(parts))}
    reached = {target} | {p for p in packages if not (importer == p or importer.startswith(p + "."))}
    return {module for module in reached if module in files and module != importer}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


if __name__ == "__main__":
    for component in cycles(import_graph()):
        print(" <-> ".join(component))
