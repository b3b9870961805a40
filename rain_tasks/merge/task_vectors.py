"""Task vectors Δ_I = θ_ITM − θ_base in fp32, streamed tensor by tensor into one file per layer.

Layout of the output directory (read by projection, merge and the baselines):
  layer_000.safetensors … one file per decoder layer, tensors keyed by their checkpoint names
  non_layer.safetensors   embeddings, final norm, lm_head
  manifest.json           input digests and layer count (written last: its presence means complete)
A rerun skips layer files whose metadata already names the same inputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from rain_tasks.io.arch import read_shape
from rain_tasks.io.checkpoint import Checkpoint, atomic_path, read_metadata, save_streamed
from rain_tasks.io.digest import path_digest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
NON_LAYER = "non_layer.safetensors"


def layer_file(directory: str | Path, layer: int) -> Path:
    """Per-layer artifact path inside a stage directory."""
    return Path(directory) / f"layer_{layer:03d}.safetensors"


def check_compatible(a: Checkpoint, b: Checkpoint) -> None:
    """Refuse two checkpoints whose tensor names or shapes differ, listing the differences."""
    only_a, only_b = sorted(set(a.names()) - set(b.names())), sorted(set(b.names()) - set(a.names()))
    problems = []
    if only_a or only_b:
        problems.append(f"tensor names differ: only in {a.path}: {only_a[:5]}; only in {b.path}: {only_b[:5]}")
    shapes = [n for n in set(a.names()) & set(b.names()) if a.shape(n) != b.shape(n)]
    for n in sorted(shapes)[:5]:
        problems.append(f"{n}: shape {a.shape(n)} in {a.path} vs {b.shape(n)} in {b.path}")
    if problems:
        raise ValueError("checkpoints are not the same architecture:\n  " + "\n  ".join(problems))


def is_current(path: Path, metadata: dict[str, str]) -> bool:
    """True if a per-layer artifact exists and was made from exactly these inputs."""
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except Exception:  # a truncated or foreign file is simply recomputed
        return False
    return all(meta.get(k) == v for k, v in metadata.items())


def _save_delta(path: Path, base: Checkpoint, itm: Checkpoint, names: list[str], metadata: dict[str, str]) -> None:
    """Δ = θ_I − θ_B (fp32) of `names` into one file, one tensor in memory at a time."""
    specs = {n: (torch.float32, base.shape(n)) for n in names}
    save_streamed(path, specs, lambda n: itm.get(n).to(torch.float32) - base.get(n).to(torch.float32), metadata)


def compute_task_vectors(base_dir: str | Path, itm_dir: str | Path, out_dir: str | Path) -> Path:
    """Write Δ_I = θ_I − θ_B (fp32) per layer into `out_dir`; return the manifest path."""
    base, itm, out_dir = Checkpoint(base_dir), Checkpoint(itm_dir), Path(out_dir)
    check_compatible(base, itm)
    shape = read_shape(base_dir)
    meta = {"kind": "task_vector", "base": path_digest(base_dir, remembered=True), "itm": path_digest(itm_dir, remembered=True)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for layer in tqdm(range(shape.num_layers), desc="task vectors", unit="layer"):
        path = layer_file(out_dir, layer)
        if not is_current(path, meta):
            _save_delta(path, base, itm, base.layer_names(layer), {**meta, "layer": str(layer)})
    if not is_current(out_dir / NON_LAYER, meta):
        _save_delta(out_dir / NON_LAYER, base, itm, base.non_layer_names(), meta)
    manifest = {**meta, "num_layers": shape.num_layers}
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir / MANIFEST
