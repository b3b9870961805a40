"""Content digests of files, directories and params: the cache keys of the Prefect tasks and lineage.

Hashing a 7B–32B checkpoint takes minutes, and every flow run and recorded lineage needs the digests of
the same unchanged inputs. With `remembered=True` a file's sha256 is taken from a per-user memo when
its path, size, mtime and inode are what they were when it was hashed (the rule DVC applies to its own
outputs); audits (`rain verify`, releases) always hash afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_MEMO_MIN_BYTES = 1 << 20  # smaller files are hashed again: cheaper than a memo entry
_DIGESTS = "digests"  # memo name: resolved path -> [size, mtime_ns, inode, sha256]


def user_cache_dir() -> Path:
    """Per-user cache of this package ($RAIN_CACHE_DIR, else $XDG_CACHE_HOME/rain, else ~/.cache/rain)."""
    explicit = os.environ.get("RAIN_CACHE_DIR")
    return Path(explicit) if explicit else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rain"


def load_memo(name: str) -> dict[str, list]:
    """A per-user memo (user_cache_dir()/NAME.json) keyed by resolved file path; empty if absent or unreadable."""
    try:
        return json.loads((user_cache_dir() / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def save_memo(name: str, memo: dict[str, list]) -> None:
    """Replace a memo file atomically; a memo that cannot be written is only a lost shortcut."""
    path = user_cache_dir() / f"{name}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{name}-", delete=False) as f:
            json.dump(memo, f)
        os.replace(f.name, path)
    except OSError as e:
        log.warning("could not write %s (%s): the work it saves will be done again", path, e)


def file_identity(path: Path) -> list[int]:
    """[size, mtime_ns, inode]: a file is taken as unchanged while these are (the rule DVC applies to its outputs)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_files(path: str | Path, hidden: bool = False) -> dict[str, Path]:
    """Relative name -> path of every file under a directory (or the file itself), in a stable order,
    skipping hidden names (temporaries of interrupted writes) unless `hidden` (audits see every file)."""
    path = Path(path)
    if path.is_file():
        return {path.name: path}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: does not exist")
    found = sorted(p for p in path.rglob("*") if p.is_file()
                   and (hidden or not any(part.startswith(".") for part in p.relative_to(path).parts)))
    return {p.relative_to(path).as_posix(): p for p in found}


def _remembered_digest(path: Path, memo: dict[str, list]) -> tuple[str, bool]:
    """(sha256, whether the memo gained an entry): [size, mtime_ns, inode, sha256] per resolved path, files ≥ 1 MiB."""
    identity = file_identity(path)
    if identity[0] < _MEMO_MIN_BYTES:
        return file_digest(path), False
    key = str(path.resolve())
    entry = memo.get(key)
    if entry is not None and entry[:3] == identity:
        return entry[3], False
    memo[key] = [*identity, file_digest(path)]
    return memo[key][3], True


def tree_digests(path: str | Path, remembered: bool = False, hidden: bool = False) -> dict[str, str]:
    """Relative path -> sha256 for every file under a directory (or the file itself); see the module
    docstring for `remembered` and `tree_files` for `hidden`."""
    files = tree_files(path, hidden)
    if not remembered:
        return {name: file_digest(p) for name, p in files.items()}
    memo, digests, changed = load_memo(_DIGESTS), {}, False
    for name, p in files.items():
        digests[name], added = _remembered_digest(p, memo)
        changed |= added
    if changed:
        save_memo(_DIGESTS, memo)
    return digests


def path_digest(path: str | Path, remembered: bool = False) -> str:
    """One sha256 for a file or a whole directory (names and contents)."""
    return json_digest(tree_digests(path, remembered))


def json_digest(obj: Any) -> str:
    """sha256 of a JSON-serialisable object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
