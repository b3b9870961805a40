"""The library's layers, checked on its import graph (rain_tasks.pipeline.imports: every import statement, module
level or inside a function).

    python -m rain_dev.import_graph     # print the layers, the edges that break them, and any circle

LAYERS lists the library's parts from the bottom up: a module may import its own layer or one below,
never one above, and no set of modules may import each other in a circle. tests/test_import_graph.py
asserts both.
"""

from __future__ import annotations

import sys

from rain_tasks.pipeline.imports import graph, modules  # noqa: F401  (modules: re-exported for the tests)

#: bottom to top; a module's layer is the first entry its dotted name starts with
LAYERS = ("rain_tasks.io", "rain_tasks.methods", "rain_tasks.params", "rain_tasks.model", "rain_tasks.merge",
          "rain_tasks.data_aware", "rain_tasks.stage1", "rain_tasks.stage2", "rain_tasks.evaluate", "rain_tasks.zoo",
          "rain_tasks.audit", "rain_tasks.pipeline", "rain_tasks.cli")


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
