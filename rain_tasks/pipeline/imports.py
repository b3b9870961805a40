"""The library's import graph, read from its source with `ast` (every import statement, at module level or inside a
function): each stage's `code` deps in dvc.yaml are the import closure of its body (rain_tasks.pipeline.stages), and
the layering test (rain_dev.import_graph) checks it for circles and upward imports."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "rain_tasks"
#: the directory that holds the package (the project root in a checkout)
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def modules(root: Path = SOURCE_ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package under `root` (a package is its __init__)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The package module an imported dotted name resolves to (its longest known prefix), if any."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_in(tree: ast.AST, package: str, known: dict[str, Path]) -> set[str]:
    """The package modules the import statements under `tree` name (`from X import y` counts X.y when y is a module;
    `package` resolves relative imports)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for n in names if (t := _target(n, known))}
    return found


def _package_of(module: str, path: Path) -> str:
    """The package a module's relative imports start from."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def graph(root: Path = SOURCE_ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file."""
    known = modules(root)
    return {m: imports_in(ast.parse(p.read_text(), str(p)), _package_of(m, p), known) - {m} for m, p in known.items()}


def closure(start: Iterable[str], edges: dict[str, set[str]]) -> set[str]:
    """`start` and every module reachable from it through imports."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += edges.get(m, ())
    return seen


def function_imports(module: str, name: str, root: Path = SOURCE_ROOT) -> set[str]:
    """The package modules function `name` of `module` imports, itself or through the module's other top-level
    functions it calls (the imports a stage body makes when it runs)."""
    known = modules(root)
    path = known[module]
    tree = ast.parse(path.read_text(), str(path))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    package = _package_of(module, path)
    found: set[str] = set()
    seen, todo = set(), [name]
    while todo:
        fn = functions[todo.pop()]
        if fn.name in seen:
            continue
        seen.add(fn.name)
        found |= imports_in(fn, package, known)
        todo += [n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in functions and n.id not in seen]
    return found


def source_files(mods: Iterable[str], root: Path = SOURCE_ROOT) -> tuple[str, ...]:
    """The modules' files relative to `root`, sorted (as dvc.yaml lists deps)."""
    known = modules(root)
    return tuple(sorted(known[m].relative_to(root).as_posix() for m in mods))
