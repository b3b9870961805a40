"""Stage 3: the streaming merge engine.

The engine walks the LRM's tensors one at a time, asks a registered merge method
(rain_tasks.methods) for the merged tensor (fp32 arithmetic), casts it to the LRM dtype and
writes new shards; everything else (config, tokenizer, chat template, generation config) is
copied from the LRM. A method is one small function of one tensor's inputs, so baselines
reuse the same engine. Tensors without a Δ_I in the plan (scope 'linear': norms,
embeddings) stay θ_R, or θ_B for a method that merges on the base (its `untouched`:
rain_tasks.methods.registry.Method). A method is a registered name or a Method built from
data (AIM's wrapper, ReasonAny's masks).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from pydantic import BaseModel

from rain_tasks.io.arch import layer_of, module_of
from rain_tasks.io.artifacts import NON_LAYER, atomic_path, layer_file
from rain_tasks.io.checkpoint import Checkpoint, ShardWriter, TensorFile, parse_size, save_tensors
from rain_tasks.methods import Method, TensorInputs, get_method
from rain_tasks.params import MergeParams

log = logging.getLogger(__name__)

#: files copied verbatim from the LRM directory
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
           "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


class TensorSource(Protocol):
    """Where the plan finds one kind of per-tensor input, by checkpoint tensor name (None where it has none)."""

    def get(self, name: str) -> torch.Tensor | None: ...


class _Files:
    """Open safetensors files, read lazily, one tensor at a time in fp32."""

    def __init__(self) -> None:
        self._open: dict[Path, TensorFile] = {}

    def _read(self, path: Path, name: str) -> torch.Tensor | None:
        if not path.is_file():
            return None
        if path not in self._open:
            self._open[path] = TensorFile(path)
        f = self._open[path]
        return f.get_tensor(name).to(torch.float32) if name in f.entries else None


class TensorDir(_Files):
    """A stage directory of per-layer tensor files (task vectors, Δ⊥) beside its non-layer file."""

    def __init__(self, directory: str | Path):
        super().__init__()
        self.directory = Path(directory)

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor stored under `name` in its layer's file, or None where this directory has none."""
        layer = layer_of(name)
        return self._read(layer_file(self.directory, layer) if layer is not None else self.directory / NON_LAYER, name)


class SingleFile(_Files):
    """One tensor file holding every tensor's input (the α scales)."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor stored under `name`, or None where the file has none."""
        return self._read(self.path, name)


@dataclass
class DeltaPlan:
    """Which update each tensor receives: linear modules from `linear`, the rest from `other` when scope is 'all'."""

    linear: TensorSource
    other: TensorSource | None = None
    scales: TensorSource | None = None
    base: Checkpoint | None = None  # θ_B, for methods that merge Δ_R = θ_R − θ_B too (TIES, DARE, SLERP)

    def delta(self, name: str) -> torch.Tensor | None:
        if module_of(name) is not None:
            return self.linear.get(name)
        return self.other.get(name) if self.other is not None else None

    def scale(self, name: str) -> torch.Tensor | None:
        return self.scales.get(name) if self.scales is not None and module_of(name) is not None else None

    def base_tensor(self, name: str) -> torch.Tensor | None:
        return self.base.get(name).to(torch.float32) if self.base is not None else None


#: an elementwise method merges a tensor larger than this (in fp32) a block of rows of this size at a time: the fp32
#: temporaries stay small and in cache, and no fp32 copy of the whole θ_R is made
ROW_BLOCK_BYTES = 8 * 2**20


def row_blocks(shape: tuple[int, ...], block_bytes: int) -> list[slice] | None:
    """Consecutive row ranges of a tensor of `shape` holding about `block_bytes` of fp32 each (None: one block)."""
    if len(shape) == 0 or shape[0] < 2:
        return None
    per_row = 4 * math.prod(shape[1:])
    step = max(1, block_bytes // per_row)
    return None if step >= shape[0] else [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


def _rows(t: torch.Tensor | None, rows: slice, like: torch.Tensor) -> torch.Tensor | None:
    """The block `rows` of an input with one entry per row of the tensor `like`; an input broadcast along the rows
    (fewer dimensions, or one row) as it is."""
    return t[rows] if t is not None and t.dim() == like.dim() and t.shape[0] == like.shape[0] else t


def _merged(lrm: Checkpoint, name: str, method: Method, params: BaseModel, plan: DeltaPlan) -> torch.Tensor:
    """One merged tensor: the method in fp32 on θ_R and the plan's inputs (θ_B only if it reads it), cast back;
    an elementwise method a block of rows at a time (the same bits as one call on the whole tensor)."""
    stored, delta = lrm.get(name), plan.delta(name)
    base = plan.base_tensor(name) if method.needs_base and (delta is not None or method.untouched == "base") else None
    scale = plan.scale(name) if delta is not None else None
    blocks = row_blocks(tuple(stored.shape), ROW_BLOCK_BYTES) if method.elementwise and delta is not None else None
    if blocks is None:  # the stored-dtype copy is dropped at once: peak is fp32 tensors only
        return method(TensorInputs(name, stored.to(torch.float32), delta, scale, base), params).to(stored.dtype)
    out = torch.empty_like(stored)
    for rows in blocks:
        part = TensorInputs(name, stored[rows].to(torch.float32), delta[rows], _rows(scale, rows, stored), _rows(base, rows, stored))
        out[rows] = method(part, params)
    return out


def _resolved(method: str | Method, method_params: dict) -> tuple[Method, BaseModel]:
    """The method (registered, or built from data) and its validated params: an unknown method or a bad param fails
    before any work."""
    m = method if isinstance(method, Method) else get_method(method)
    return m, m.params.model_validate(method_params)


def merge_layer(
    lrm_dir: str | Path, layer: int, method: str | Method, method_params: dict, plan: DeltaPlan, out_file: str | Path
) -> Path:
    """Merge one decoder layer's tensors into `out_file` (a part that `merge_checkpoint(parts=...)` assembles).

    This is the unit the Prefect flow fans out (on a Dask cluster, say); the values are exactly
    those the serial merge computes, so assembling parts gives the same bytes.
    """
    m, params = _resolved(method, method_params)
    lrm = Checkpoint(lrm_dir)
    save_tensors(out_file, {name: _merged(lrm, name, m, params, plan) for name in lrm.layer_names(layer)})
    return Path(out_file)


def merge_checkpoint(
    lrm_dir: str | Path,
    out_dir: str | Path,
    method: str | Method,
    method_params: dict,
    plan: DeltaPlan,
    max_shard_size: str | int = MergeParams.model_fields["max_shard_size"].default,
    metadata: dict[str, str] | None = None,
    parts: TensorSource | None = None,
    finalize: Callable[[Path], None] | None = None,
) -> list[str]:
    """Stream-merge into `out_dir` (complete or absent, never half-written); return the shard names.

    `parts` holds tensors already merged by `merge_layer` (taken as they are; any tensor without
    a part is merged here). `finalize(tmp_dir)` runs on the complete temporary directory just
    before it is renamed into place, e.g. to write lineage.json inside the atomic write.
    """
    m, params = _resolved(method, method_params)  # an unknown method or bad params fail before anything is written
    lrm = Checkpoint(lrm_dir)
    shard_meta = {"merge_method": m.name, "merge_params": json.dumps(method_params, sort_keys=True), **(metadata or {})}
    with atomic_path(out_dir) as tmp:
        order = _stream_order(lrm)
        layout = [(n, lrm.dtype(n), lrm.shape(n)) for n in order]
        with ShardWriter(tmp, parse_size(max_shard_size), layout, shard_meta) as writer:
            for name in tqdm(order, desc=f"merge ({m.name})", unit="tensor"):
                part = parts.get(name) if parts is not None else None
                writer.add(name, part.to(lrm.dtype(name)) if part is not None else _merged(lrm, name, m, params, plan))
            shards = writer.close()
        for fname in _COPIED:
            if (Path(lrm_dir) / fname).is_file():
                shutil.copy2(Path(lrm_dir) / fname, tmp / fname)
        if finalize is not None:
            finalize(tmp)
    return shards


def _stream_order(ckpt: Checkpoint) -> list[str]:
    """Tensor names grouped by layer (non-layer tensors first) so each per-layer Δ file is read once."""
    return sorted(ckpt.names(), key=lambda n: (-1 if layer_of(n) is None else layer_of(n), n))

