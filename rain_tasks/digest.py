"""Content digests of files, directories and params: the cache keys of the Prefect tasks and lineage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    """Files under `root` in a stable order, skipping hidden temporaries of interrupted writes."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def tree_digests(path: str | Path) -> dict[str, str]:
    """Relative path -> sha256 for every file under a directory (or the file itself)."""
    path = Path(path)
    if path.is_file():
        return {path.name: file_digest(path)}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: does not exist")
    return {p.relative_to(path).as_posix(): file_digest(p) for p in _files(path)}


def path_digest(path: str | Path) -> str:
    """One sha256 for a file or a whole directory (names and contents)."""
    return json_digest(tree_digests(path))


def json_digest(obj: Any) -> str:
    """sha256 of a JSON-serialisable object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
