"""How every stage writes its outputs: atomically (a temporary sibling renamed into place, so a killed run never
leaves a file or directory that looks complete), under a per-output lock, as JSON or text with fixed formatting
(bit-identical for identical inputs), one safetensors file per decoder layer beside a manifest."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"  # a stage directory's record of its inputs, written last (its presence means complete)
NON_LAYER = "non_layer.safetensors"  # embeddings, final norm, lm_head: the tensors outside the decoder layers


def layer_file(directory: str | Path, layer: int) -> Path:
    """Per-layer artifact path inside a stage directory."""
    return Path(directory) / f"layer_{layer:03d}.safetensors"


def read_manifest(directory: str | Path, what: str) -> dict:
    """A per-layer stage directory's manifest; its absence means the stage that writes `what` was interrupted."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} are incomplete (no {MANIFEST}); rerun that stage")
    return json.loads(path.read_text())


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = True, indent: int | None = 2) -> Path:
    """Write `obj` as JSON (2-space indent, sorted keys, a final newline: the same bytes for the same object) atomically."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or directory into; rename it over `final` on success.

    On error the temporary is removed and `final` is left as it was (an OSError such as a full
    disk is re-raised naming `final`). A directory being replaced is renamed aside into the
    temporary first and deleted only once the new one is in place, so a kill between the two
    renames loses neither: the next write of `final` puts the old one back (see
    `remove_stale_temporaries`). Temporaries that killed writers left beside `final` are removed
    first, so a rerun after SIGKILL does not accumulate them.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(final)}{os.getpid()}-", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            os.rename(final, tmp / _ASIDE)  # kept until the new one is in place
        elif target.is_dir() and (final.exists() or final.is_symlink()):
            final.unlink()
        os.replace(target, final)
    except OSError as e:
        e.filename = e.filename or str(final)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_ASIDE = ".replaced"  # inside an atomic_path temporary: the directory the write is replacing


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return True


def remove_stale_temporaries(final: str | Path) -> None:
    """Delete `atomic_path` temporaries of `final` whose writer process is gone (its pid is in the name); a
    writer killed between renaming the old directory aside and renaming the new one in gets the old one back."""
    final = Path(final)
    prefix = _temp_prefix(final)
    for p in final.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            if (p / _ASIDE).is_dir() and not (final.exists() or final.is_symlink()):
                os.rename(p / _ASIDE, final)
            shutil.rmtree(p, ignore_errors=True)


class OutputBusy(ValueError):
    """Another process holds the lock of an output this one would write."""


@contextlib.contextmanager
def output_locks(root: str | Path, outputs: list[str]) -> Iterator[None]:
    """Hold an exclusive lock per project output (ROOT/.rain/locks/) for a stage's run: a second runner on the
    same outputs (a Prefect flow and `rain stage` at once) stops with OutputBusy naming the holder, instead of
    interleaving its writes. Locks are released by the kernel when a holder dies."""
    import fcntl

    locks = Path(root) / ".rain" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    held: list[int] = []
    try:
        for out in sorted(set(outputs)):
            fd = os.open(locks / (out.strip("/").replace("/", "__") + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputBusy(f"{out} is being written by another runner (pid {holder}) in {Path(root).resolve()}; wait for it to "
                                 "finish (or stop it), then rerun: two runners on one output would interleave") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            held.append(fd)
        yield
    finally:
        for fd in held:
            os.close(fd)
