"""Task vectors Δ_I = θ_ITM − θ_base in fp32, streamed tensor by tensor into one file per layer.

Layout of the output directory (read by projection, merge and the baselines):
  layer_000.safetensors … one file per decoder layer, tensors keyed by their checkpoint names
  non_layer.safetensors   embeddings, final norm, lm_head
  manifest.json           input digests and layer count (written last: its presence means complete)
A rerun skips layer files whose metadata already names the same inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from rain_tasks.io.arch import read_shape
from rain_tasks.io.checkpoint import Checkpoint, Difference, check_compatible, is_current, save_streamed
from rain_tasks.io.artifacts import MANIFEST, NON_LAYER, layer_file, write_json
from rain_tasks.io.digest import path_digest

log = logging.getLogger(__name__)

def _save_delta(path: Path, base: Checkpoint, itm: Checkpoint, names: list[str], metadata: dict[str, str]) -> None:
    """Δ = θ_I − θ_B (fp32) of `names` into one file, one tensor in memory at a time."""
    specs = {n: (torch.float32, base.shape(n)) for n in names}
    save_streamed(path, specs, Difference(itm, base).get, metadata)


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
    write_json(out_dir / MANIFEST, manifest)
    return out_dir / MANIFEST
