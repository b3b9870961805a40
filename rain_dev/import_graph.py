"""The library's import graph, read with `ast` from every import statement (module level or inside a function).

    python -m rain_dev.import_graph     # print the layers, the edges that break them, and any circle

LAYERS lists the library's parts from the bottom up: a module may import its own layer or one below,
never one above, and no set of modules may import each other in a circle. tests/test_import_graph.py
asserts both.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "rain_tasks"
#: bottom to top; a module's layer is the first entry its dotted name starts with
LAYERS = ("rain_tasks.io", "rain_tasks.params", "rain_tasks.model", "rain_tasks.methods", "rain_tasks.merge",
          "rain_tasks.stage1", "rain_tasks.stage2", "rain_tasks.evaluate", "rain_tasks.zoo", "rain_tasks.audit",
          "rain_tasks.pipeline", "rain_tasks.cli")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the library (a package is its __init__)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The library module an imported dotted name resolves to (the longest known prefix), if any."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The library modules `module` imports anywhere in its file (`from X import y` counts X.y when y is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for n in names if (t := _target(n, known)) and t != module}
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the library modules it imports (package __init__ files left out of the edges' targets when they
    merely hold a docstring, so `from rain_tasks.io import x` names x)."""
    known = modules(root)
    return {m: imports(m, p, known) for m, p in known.items()}


def layer(module: str) -> int | None:
    """Index of the module's layer in LAYERS (None: outside every layer, e.g. the package's own __init__)."""
    return next((i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")), None)


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module imports a layer above its own."""
    return sorted((a, b) for a, bs in edges.items() for b in bs
                  if layer(a) is not None and layer(b) is not None and layer(b) > layer(a))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    """Print the layers with their modules, then every upward import and every circle; exit 1 if any."""
    edges = graph()
    for i, prefix in enumerate(LAYERS):
        print(f"{i:2d} {prefix}: {', '.join(sorted(m.rpartition('.')[2] for m in edges if layer(m) == i and m != prefix)) or '-'}")
    bad_up, bad_circles = upward(edges), cycles(edges)
    for a, b in bad_up:
        print(f"upward: {a} -> {b}")
    for c in bad_circles:
        print(f"circle: {' <-> '.join(c)}")
    return 1 if bad_up or bad_circles else 0


if __name__ == "__main__":
    sys.exit(main())
