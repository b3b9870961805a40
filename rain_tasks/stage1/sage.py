"""SAGE-style sanitization (Zhang et al., arXiv 2606.18309), an alternative Stage 1: Δ' = Δ(I + βC_r)⁻¹.

EXPERIMENTAL, a reconstruction from the abstract only (METHODS-MORE §2): per row set of the Stage 1 features
(the same Grams or low-rank rows, the same blocks: k/v per KV group, o_proj per query head), C = XᵀX / n =
U diag(σ) Uᵀ, U_r the top eigenvectors that RAIN's `energy` (or `rank`) rule keeps, σ̃ = σ/σ_1 and
C_r = U_r diag(σ̃) U_rᵀ. The minimiser of ‖Δ' − Δ‖² + β·tr(Δ' C_r Δ'ᵀ) is
  Δ' = Δ(I + βC_r)⁻¹ = Δ − (Δ U_r) diag(βσ̃/(1 + βσ̃)) U_rᵀ,
computed from the float64 eigendecomposition (stage1.projection.RowStats.spectrum; no inverse is formed). Each retained
direction is damped by 1/(1 + βσ̃_i), Δ outside span(U_r) is kept; β = 0 is task arithmetic and β → ∞ RAIN's hard
projection Δ(I − U_rU_rᵀ) with the same U_r. With σ̃ normalised by σ_1 the result does not depend on n.

Inferred here beyond METHODS-MORE: o_proj's bias acts on the constant 1 that every row carries and has no per-head
block; RAIN protects it fully (left at 0), so SAGE damps it as a direction of σ̃ = 1, by 1/(1 + β), which keeps
both limits. The source's "forgetting carrier" (γ, V_c) is not implemented: no definition of V_c was found.

Output layout = projection's (per-layer Δ' keyed by checkpoint names, report rows in the metadata, manifest last),
so Stage 2 and the merge read it where they read Δ⊥.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rain_tasks.io.arch import MODULES, ModelShape
from rain_tasks.io.artifacts import MANIFEST, layer_file, write_json
from rain_tasks.io.checkpoint import is_current, load_tensors, save_tensors
from rain_tasks.io.guards import require_finite
from rain_tasks.params import SageParams
from rain_tasks.stage1.projection import (Basis, RowStats, augmented, layer_meta, load_stats, module_blocks,
                                          project_block_with_coefficients, protected_basis, sqrt_ratio)


def sage_basis(stats: RowStats, params: SageParams) -> Basis:
    """U_r with the damping weights w_i = βσ̃_i/(1 + βσ̃_i), so Δ' = Δ − (ΔU_r) diag(w) U_rᵀ (projection's
    `method: sage` basis, the same code)."""
    return protected_basis(stats, params.retained())


def sanitize_layer(
    delta: dict[str, torch.Tensor], stats: dict[str, RowStats], shape: ModelShape, layer: int, params: SageParams
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Δ' of one layer's seven modules (fp32, by checkpoint name) and one report row per block."""
    bases: dict[str, Basis] = {}
    out: dict[str, torch.Tensor] = {}
    report = []
    for module in MODULES:
        w_name, b_name = shape.spec.param_name(layer, module, "weight"), shape.spec.param_name(layer, module, "bias")
        if w_name not in delta:
            raise KeyError(f"task vector of layer {layer} lacks {w_name}")
        m = augmented(delta, w_name, b_name)
        result = m / (1.0 + params.beta)  # only o_proj's bias column keeps this (see the module docstring)
        for block_index, set_name, sel in module_blocks(module, shape, layer, tuple(m.shape)):
            s, block = stats[set_name], m[sel]
            if s.dim != block.shape[1]:
                raise ValueError(f"layer {layer} {module}: features of set {set_name!r} have width {s.dim}, its block has {block.shape[1]}")
            if set_name not in bases:
                bases[set_name] = sage_basis(s, params)
            basis = bases[set_name]
            sanitized, coeffs = project_block_with_coefficients(block, basis)
            result[sel] = sanitized
            before, after = s.quad_before_after(block, coeffs, basis.u)
            report.append({"layer": layer, "module": module, "group": block_index, "rank_kept": int(basis.u.shape[1]),
                           "energy_damped": basis.energy_protected,
                           "norm_ratio": sqrt_ratio(sanitized.square().sum().item(), block.square().sum().item()),
                           "bias_ratio": sqrt_ratio(after, before)})
        result = result.to(torch.float32)
        out[w_name] = result[:, : delta[w_name].shape[1]].contiguous()
        if b_name in delta:
            out[b_name] = result[:, -1].contiguous()
    return out, report


def sanitize(task_vectors_dir: str | Path, features_dir: str | Path, params: SageParams, out_dir: str | Path) -> Path:
    """Write Δ' per layer into `out_dir` (projection's layout, layers made from the same inputs skipped); return the manifest."""
    out_dir = Path(out_dir)
    shape, meta = layer_meta(task_vectors_dir, features_dir, params, None)
    meta["kind"] = "sage"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for layer in range(shape.num_layers):
        path = layer_file(out_dir, layer)
        if is_current(path, meta):
            continue
        delta = load_tensors(layer_file(task_vectors_dir, layer))
        tensors, rows = sanitize_layer(delta, load_stats(layer_file(features_dir, layer)), shape, layer, params)
        save_tensors(path, require_finite(tensors, f"sage {path}"), {**meta, "layer": str(layer), "report": json.dumps(rows)})
    return write_json(out_dir / MANIFEST, {**meta, "num_layers": shape.num_layers, "params_json": params.model_dump()})
