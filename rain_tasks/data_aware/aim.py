"""AIM's anchor statistic (the relaxation it feeds: rain_tasks.methods.aim).

Per merged Linear module with anchor inputs X (rows = tokens of calibration blocks):
  a_j = Σ_blocks mean_t |X_tj|   (float64, streamed per layer by the capture hooks; never T × hidden × layers)

Artifact (`collect_channel_stats`): one safetensors file, a[layer, module] keyed by the module's weight name
(float64 [in]), metadata: anchor digest, params, block count, and the forward dtype.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from rain_tasks.io.arch import ModelShape, read_shape
from rain_tasks.io.checkpoint import load_tensors, read_metadata, save_tensors
from rain_tasks.io.digest import json_digest, path_digest
from rain_tasks.io.guards import require_finite
from rain_tasks.methods.aim import relaxation
from rain_tasks.model.calibration import load_tokenizer, render_sample
from rain_tasks.model.capture import LayerCapture, forward_batch_with_hooks, token_batches
from rain_tasks.model.runtime import CPU, forward_dtype, load_causal_lm
from rain_tasks.params import AimParams, RuntimeParams

#: which captured input (capture.LayerCapture field) each merged module reads
INPUT_OF: dict[str, str] = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_act"}
SLOTS: tuple[str, ...] = tuple(dict.fromkeys(INPUT_OF.values()))


def calibration_blocks(token_lists: Sequence[Sequence[int]], block_tokens: int | None) -> list[torch.Tensor]:
    """Token blocks: the texts concatenated and cut into `block_tokens` pieces (tail dropped), or one per text (None)."""
    if block_tokens is None:
        return [torch.as_tensor(list(t), dtype=torch.long) for t in token_lists if len(t)]
    flat = torch.as_tensor([i for t in token_lists for i in t], dtype=torch.long)
    n = flat.numel() // block_tokens
    if n == 0:
        raise ValueError(f"calibration text holds {flat.numel()} tokens, fewer than one block of {block_tokens}; "
                         "add text or lower aim.block_tokens")
    return list(flat[: n * block_tokens].view(n, block_tokens))


def rendered_token_lists(model_dir: str | Path, records: Sequence[dict]) -> list[list[int]]:
    """Reasoning records as the LRM sees them (calibration.render_sample): the texts of our setting, anchor θ_R."""
    tokenizer = load_tokenizer(model_dir)
    return [render_sample(tokenizer, r["prompt"], r["reasoning"], r["response"]).input_ids for r in records]


def channel_mean_abs(model: torch.nn.Module, blocks: Sequence[torch.Tensor], batch_tokens: int = 16384) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, captured input) -> Σ_blocks mean_t |x_tj| in float64 on the CPU; one forward per batch of blocks."""
    acc: dict[tuple[int, str], torch.Tensor] = {}

    def reduce(_b: int, cap: LayerCapture) -> None:
        for slot in SLOTS:
            v = getattr(cap, slot).abs().to(torch.float64).mean(0).cpu()
            key = (cap.layer, slot)
            acc[key] = acc[key] + v if key in acc else v

    for batch in token_batches([len(b) for b in blocks], batch_tokens):
        forward_batch_with_hooks(model, [blocks[i] for i in batch], reduce)
    return acc


def stat_names(shape: ModelShape, modules: Sequence[str]) -> dict[str, tuple[int, str]]:
    """Weight tensor name -> (layer, captured input) for every covered module of every layer."""
    return {shape.spec.param_name(layer, m): (layer, INPUT_OF[m]) for layer in range(shape.num_layers) for m in modules}


def collect_channel_stats(
    model_dir: str | Path,
    token_lists: Sequence[Sequence[int]],
    params: AimParams,
    out_path: str | Path,
    runtime: RuntimeParams | None = None,
    calibration_digest: str = "",
) -> Path:
    """Write a (float64) per covered module of the anchor at `model_dir` on the blocks of `token_lists`; return the path."""
    runtime = runtime or CPU
    shape = read_shape(model_dir)
    blocks = calibration_blocks(token_lists[: params.max_samples], params.block_tokens)
    names = stat_names(shape, params.modules)
    model = load_causal_lm(model_dir, runtime)
    sums = channel_mean_abs(model, blocks, runtime.batch_tokens)
    tensors = {name: sums[key] for name, key in names.items()}
    meta = {"kind": "aim_stats", "anchor": path_digest(model_dir, remembered=True), "calibration": calibration_digest,
            "params": json_digest(params.statistic_params()), "params_json": json.dumps(params.statistic_params(), sort_keys=True),
            "blocks": str(len(blocks)), "forward_dtype": str(forward_dtype(model_dir, runtime)).removeprefix("torch.")}
    save_tensors(out_path, require_finite(tensors, f"aim statistics {out_path}"), meta)
    return Path(out_path)


def load_relaxations(stats_path: str | Path, omega: float) -> dict[str, torch.Tensor]:
    """Weight name -> r (float32) from a statistics file; one small vector per covered module."""
    read_metadata(stats_path)  # a truncated or foreign file fails here, naming itself
    return {name: relaxation(a, omega) for name, a in load_tensors(stats_path).items()}
