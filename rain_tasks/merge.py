"""Stage 3: the streaming merge engine and its registered merge methods.

The engine walks the LRM's tensors one at a time, asks a registered method for the merged
tensor (fp32 arithmetic), casts it to the LRM dtype and writes new shards; everything else
(config, tokenizer, chat template, generation config) is copied from the LRM. A method is
one small function of one tensor's inputs, so baselines reuse the same engine.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from rain_tasks.arch import layer_of, module_of
from rain_tasks.checkpoint import Checkpoint, ShardWriter, atomic_path, parse_size
from rain_tasks.task_vectors import NON_LAYER, layer_file

log = logging.getLogger(__name__)

#: files copied verbatim from the LRM directory
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
           "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


@dataclass(frozen=True)
class TensorInputs:
    """What a merge method sees for one tensor: θ_R, its update Δ (or None) and a scale (or None), fp32."""

    name: str
    lrm: torch.Tensor
    delta: torch.Tensor | None
    scale: torch.Tensor | None


MergeMethod = Callable[[TensorInputs, dict], torch.Tensor]
METHODS: dict[str, MergeMethod] = {}


def register(name: str) -> Callable[[MergeMethod], MergeMethod]:
    """Register a merge method under `name`."""

    def deco(fn: MergeMethod) -> MergeMethod:
        METHODS[name] = fn
        return fn

    return deco


@register("task_arithmetic")
def task_arithmetic(x: TensorInputs, p: dict) -> torch.Tensor:
    """θ_R + λΔ (the scale, if any, is ignored: task arithmetic is unweighted)."""
    return x.lrm if x.delta is None else x.lrm + p["lam"] * x.delta


@register("rain")
def rain(x: TensorInputs, p: dict) -> torch.Tensor:
    """θ_R + λ·α⊙Δ⊥ (α broadcasts against the tensor: rows for q/k/v, columns for o, scalar for MLP)."""
    if x.delta is None:
        return x.lrm
    scaled = x.delta if x.scale is None else x.scale * x.delta
    return x.lrm + p["lam"] * scaled


class TensorDir:
    """Lazy per-layer tensor files (task vectors, Δ⊥, α scales) addressed by checkpoint tensor name."""

    def __init__(self, directory: str | Path | None, single_file: str | Path | None = None):
        self.directory = Path(directory) if directory else None
        self.single_file = Path(single_file) if single_file else None
        self._open: dict[Path, object] = {}

    def _file_for(self, name: str) -> Path | None:
        if self.single_file is not None:
            return self.single_file
        if self.directory is None:
            return None
        layer = layer_of(name)
        return layer_file(self.directory, layer) if layer is not None else self.directory / NON_LAYER

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor stored under `name`, or None where this source has none."""
        path = self._file_for(name)
        if path is None or not path.is_file():
            return None
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        f = self._open[path]
        return f.get_tensor(name).to(torch.float32) if name in f.keys() else None


@dataclass
class DeltaPlan:
    """Which update each tensor receives: linear modules from `linear`, the rest from `other` when scope is 'all'."""

    linear: TensorDir
    other: TensorDir | None = None
    scales: TensorDir | None = None

    def delta(self, name: str) -> torch.Tensor | None:
        if module_of(name) is not None:
            return self.linear.get(name)
        return self.other.get(name) if self.other is not None else None

    def scale(self, name: str) -> torch.Tensor | None:
        return self.scales.get(name) if self.scales is not None and module_of(name) is not None else None


def merge_checkpoint(
    lrm_dir: str | Path,
    out_dir: str | Path,
    method: str,
    method_params: dict,
    plan: DeltaPlan,
    max_shard_size: str | int = "2GB",
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Stream-merge into `out_dir` (complete or absent, never half-written); return the shard names."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; registered: {sorted(METHODS)}")
    fn = METHODS[method]
    lrm = Checkpoint(lrm_dir)
    shard_meta = {"merge_method": method, "merge_params": json.dumps(method_params, sort_keys=True), **(metadata or {})}
    with atomic_path(out_dir) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size), shard_meta)
        for name in tqdm(_stream_order(lrm), desc=f"merge ({method})", unit="tensor"):
            theta = lrm.get(name)
            merged = fn(TensorInputs(name, theta.to(torch.float32), plan.delta(name), plan.scale(name)), method_params)
            writer.add(name, merged.to(theta.dtype))
        shards = writer.close()
        for fname in _COPIED:
            if (Path(lrm_dir) / fname).is_file():
                shutil.copy2(Path(lrm_dir) / fname, tmp / fname)
    return shards


def _stream_order(ckpt: Checkpoint) -> list[str]:
    """Tensor names grouped by layer (non-layer tensors first) so each per-layer Δ file is read once."""
    return sorted(ckpt.names(), key=lambda n: (-1 if layer_of(n) is None else layer_of(n), n))

