"""Guards shared by the stages, the audit and the release: names that cannot leave their directory, headers
whose stated length is bounded, and derived values that must be finite.

Every name that becomes a path (a baseline run, a release NAME/VERSION, a shard named by an index, a path
recorded in a lineage) passes `safe_name`, so no input can make a write or a read land outside the
directory it belongs to. Derived tensors and tables pass `require_finite` where they are written, so a
NaN is reported by the stage that produced it instead of surfacing later as a linear-algebra traceback.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np
import torch
from pydantic import ConfigDict

T = TypeVar("T")

#: the config of every params model: unknown keys refused, values frozen, every float finite (a NaN λ would
#: silently poison the merge)
STRICT_PARAMS = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

#: largest safetensors header accepted (the safetensors library's own limit, 100 MB)
MAX_HEADER_BYTES = 100_000_000


class NonFiniteError(ValueError):
    """A stage produced NaN or Inf values; the message names the stage's output and the tensors or columns."""


def unsafe_name(name: object, *, single: bool = False) -> str | None:
    """Why `name` is not a safe relative path ('' or None means safe); `single` also refuses '/'."""
    if not isinstance(name, str) or not name:
        return "is empty or not a string"
    if "\\" in name or "\x00" in name:
        return "contains a backslash or NUL byte"
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "is an absolute path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "contains '..', '.' or an empty component"
    if single and len(parts) > 1:
        return "contains '/' (a single name is required)"
    return None


def safe_name(name: object, what: str, *, single: bool = False) -> str:
    """`name` if it is a safe relative path (see `unsafe_name`), else a ValueError naming `what`."""
    why = unsafe_name(name, single=single)
    if why:
        raise ValueError(f"{what} {name!r} {why}: only relative names inside their directory are allowed")
    return name  # type: ignore[return-value]


def confined(root: Path, name: str) -> Path | None:
    """root/name if `name` is safe and, symlinks resolved, stays inside `root`; None otherwise."""
    if unsafe_name(name):
        return None
    path = root / name
    base = root.resolve()
    resolved = path.resolve()
    return path if resolved == base or base in resolved.parents else None


def header_length(raw: bytes, size: int, where: str) -> int:
    """The safetensors header length in the first 8 bytes, refused unless it fits the file of `size` bytes."""
    if len(raw) < 8:
        raise ValueError(f"{where}: {size} bytes, too short for a safetensors header")
    n = int.from_bytes(raw[:8], "little")
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise ValueError(f"{where}: header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte "
                         "limit; the file is corrupt or not safetensors")
    return n


def require_finite(values: T, what: str) -> T:
    """`values` (tensors or arrays by name, or a DataFrame) if all finite, else NonFiniteError naming `what` and the
    entries holding NaN/Inf: called by each stage on what it is about to write."""
    named = {c: values[c].to_numpy() for c in values.select_dtypes("number").columns} if hasattr(values, "select_dtypes") else values
    bad = sorted(name for name, v in named.items() if not _finite(v))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{what}: NaN or Inf in {shown}; the stage's inputs produce non-finite values (check the "
                             "calibration samples and the checkpoints with `rain check`); nothing was written")
    return values


def _finite(v: torch.Tensor | np.ndarray) -> bool:
    if isinstance(v, torch.Tensor):
        return not v.is_floating_point() or bool(torch.isfinite(v).all())
    v = np.asarray(v)
    return not np.issubdtype(v.dtype, np.floating) or bool(np.isfinite(v).all())
