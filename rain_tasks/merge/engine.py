"""Stage 3: the streaming merge engine and its registered merge methods.

The engine walks the LRM's tensors one at a time, asks a registered method for the merged
tensor (fp32 arithmetic), casts it to the LRM dtype and writes new shards; everything else
(config, tokenizer, chat template, generation config) is copied from the LRM. A method is
one small function of one tensor's inputs, so baselines reuse the same engine.

RAIN and task arithmetic are LRM-centred: θ = θ_R + λ·(update from Δ_I). TIES and DARE
follow mergekit with base_model = θ_B: they merge the two task vectors Δ_R = θ_R − θ_B and
Δ_I = θ_I − θ_B and add the result to θ_B, so θ = θ_R + (merged − Δ_R). SLERP interpolates
θ_R ↔ θ_I = θ_B + Δ_I. Tensors without a Δ_I in the plan (scope 'linear': norms,
embeddings) stay θ_R for every method. The tensor math lives in `rain_tasks.methods.ops`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rain_tasks.methods import ops as baselines
from rain_tasks.io.arch import layer_of, module_of
from rain_tasks.io.checkpoint import Checkpoint, ShardWriter, TensorFile, parse_size, save_tensors
from rain_tasks.io.artifacts import atomic_path
from rain_tasks.io.artifacts import NON_LAYER, layer_file

log = logging.getLogger(__name__)

#: files copied verbatim from the LRM directory
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
           "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


@dataclass(frozen=True)
class TensorInputs:
    """What a merge method sees for one tensor: θ_R, its update Δ (or None), a scale (or None) and θ_B (or None), fp32."""

    name: str
    lrm: torch.Tensor
    delta: torch.Tensor | None
    scale: torch.Tensor | None
    base: torch.Tensor | None = None


MergeMethod = Callable[[TensorInputs, dict], torch.Tensor]
METHODS: dict[str, MergeMethod] = {}
NEEDS_BASE: set[str] = set()  # methods that read θ_B (the others never load it)


def register(name: str, needs_base: bool = False) -> Callable[[MergeMethod], MergeMethod]:
    """Register a merge method under `name`; `needs_base` if it reads TensorInputs.base."""

    def deco(fn: MergeMethod) -> MergeMethod:
        METHODS[name] = fn
        if needs_base:
            NEEDS_BASE.add(name)
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


def _require_base(x: TensorInputs) -> torch.Tensor:
    """θ_B, refusing a plan without the base checkpoint (TIES, DARE and SLERP need it)."""
    if x.base is None:
        raise ValueError(f"{x.name}: this merge method needs the base checkpoint (DeltaPlan.base)")
    return x.base


def _task_vectors(x: TensorInputs) -> torch.Tensor:
    """The stacked task vectors [Δ_R, Δ_I] = [θ_R − θ_B, θ_I − θ_B] that TIES and DARE merge."""
    return torch.stack([x.lrm - _require_base(x), x.delta])


def _merge_task_vectors(x: TensorInputs, p: dict, sparsified: torch.Tensor, consensus: bool, normalize: bool) -> torch.Tensor:
    """θ_B + λ·combine(w_R·Δ̃_R, w_I·Δ̃_I) as mergekit's generalized task arithmetic (with base_model = θ_B)."""
    weights = torch.tensor(p["weights"], dtype=sparsified.dtype)
    return x.base + p["lam"] * baselines.combine_task_vectors(sparsified, weights, consensus=consensus, normalize=normalize)


@register("ties", needs_base=True)
def ties(x: TensorInputs, p: dict) -> torch.Tensor:
    """θ_B + λ·disjoint mean of the sign-elected, top-`density`-trimmed Δ_R and Δ_I (θ_R where Δ_I is absent)."""
    if x.delta is None:
        return x.lrm
    trimmed = torch.stack([baselines.trim_top_magnitude(d, p["density"]) for d in _task_vectors(x)])
    return _merge_task_vectors(x, p, trimmed, consensus=True, normalize=True)


@register("dare", needs_base=True)
def dare(x: TensorInputs, p: dict) -> torch.Tensor:
    """θ_B + λ·merge of the DARE-dropped Δ_R and Δ_I (θ_R where Δ_I is absent).

    combine 'linear' sums them (mergekit dare_linear); 'ties' sums only the entries agreeing
    with the elected sign (mergekit dare_ties, which does not divide by the agreeing weight).
    """
    if x.delta is None:
        return x.lrm
    deltas = _task_vectors(x)
    seeds = [baselines.tensor_seed(p["seed"], x.name, i) for i in range(len(deltas))]
    dropped = torch.stack([baselines.dare_drop(d, p["drop"], s) for d, s in zip(deltas, seeds)])
    return _merge_task_vectors(x, p, dropped, consensus=p["combine"] == "ties", normalize=False)


@register("slerp", needs_base=True)
def slerp(x: TensorInputs, p: dict) -> torch.Tensor:
    """Per-tensor SLERP from θ_R (t=0) to θ_I = θ_B + Δ_I (t=1); θ_R where Δ_I is absent."""
    if x.delta is None:
        return x.lrm
    return baselines.slerp(p["t"], x.lrm, _require_base(x) + x.delta, p["dot_threshold"])


class TensorDir:
    """Lazy per-layer tensor files (task vectors, Δ⊥, α scales) addressed by checkpoint tensor name."""

    def __init__(self, directory: str | Path | None, single_file: str | Path | None = None):
        self.directory = Path(directory) if directory else None
        self.single_file = Path(single_file) if single_file else None
        self._open: dict[Path, TensorFile] = {}

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
            self._open[path] = TensorFile(path)
        f = self._open[path]
        return f.get_tensor(name).to(torch.float32) if name in f.entries else None


@dataclass
class DeltaPlan:
    """Which update each tensor receives: linear modules from `linear`, the rest from `other` when scope is 'all'."""

    linear: TensorDir
    other: TensorDir | None = None
    scales: TensorDir | None = None
    base: Checkpoint | None = None  # θ_B, for methods that merge Δ_R = θ_R − θ_B too (TIES, DARE, SLERP)

    def delta(self, name: str) -> torch.Tensor | None:
        if module_of(name) is not None:
            return self.linear.get(name)
        return self.other.get(name) if self.other is not None else None

    def scale(self, name: str) -> torch.Tensor | None:
        return self.scales.get(name) if self.scales is not None and module_of(name) is not None else None

    def base_tensor(self, name: str) -> torch.Tensor | None:
        return self.base.get(name).to(torch.float32) if self.base is not None else None


def _method(method: str) -> MergeMethod:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; registered: {sorted(METHODS)}")
    return METHODS[method]


def _merged(lrm: Checkpoint, name: str, method: str, method_params: dict, plan: DeltaPlan) -> torch.Tensor:
    """One merged tensor: the method in fp32 on θ_R and the plan's inputs (θ_B only if it reads it), cast back."""
    dtype = lrm.dtype(name)
    theta = lrm.get(name).to(torch.float32)  # the stored-dtype copy is dropped at once: peak is fp32 tensors only
    base = plan.base_tensor(name) if method in NEEDS_BASE else None
    inputs = TensorInputs(name, theta, plan.delta(name), plan.scale(name), base)
    return _method(method)(inputs, method_params).to(dtype)


def merge_layer(
    lrm_dir: str | Path, layer: int, method: str, method_params: dict, plan: DeltaPlan, out_file: str | Path
) -> Path:
    """Merge one decoder layer's tensors into `out_file` (a part that `merge_checkpoint(parts=...)` assembles).

    This is the unit the Prefect flow fans out (on a Dask cluster, say); the values are exactly
    those the serial merge computes, so assembling parts gives the same bytes.
    """
    lrm = Checkpoint(lrm_dir)
    _method(method)
    save_tensors(out_file, {name: _merged(lrm, name, method, method_params, plan) for name in lrm.layer_names(layer)})
    return Path(out_file)


def merge_checkpoint(
    lrm_dir: str | Path,
    out_dir: str | Path,
    method: str,
    method_params: dict,
    plan: DeltaPlan,
    max_shard_size: str | int = "2GB",
    metadata: dict[str, str] | None = None,
    parts: TensorDir | None = None,
    finalize: Callable[[Path], None] | None = None,
) -> list[str]:
    """Stream-merge into `out_dir` (complete or absent, never half-written); return the shard names.

    `parts` holds tensors already merged by `merge_layer` (taken as they are; any tensor without
    a part is merged here). `finalize(tmp_dir)` runs on the complete temporary directory just
    before it is renamed into place, e.g. to write lineage.json inside the atomic write.
    """
    _method(method)  # an unknown method fails before anything is written
    lrm = Checkpoint(lrm_dir)
    shard_meta = {"merge_method": method, "merge_params": json.dumps(method_params, sort_keys=True), **(metadata or {})}
    with atomic_path(out_dir) as tmp:
        order = _stream_order(lrm)
        writer = ShardWriter(tmp, parse_size(max_shard_size), [(n, lrm.dtype(n), lrm.shape(n)) for n in order], shard_meta)
        for name in tqdm(order, desc=f"merge ({method})", unit="tensor"):
            part = parts.get(name) if parts is not None else None
            writer.add(name, part.to(lrm.dtype(name)) if part is not None else _merged(lrm, name, method, method_params, plan))
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

