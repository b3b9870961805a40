"""Stage 2 coefficients: α per (layer, query head) in closed form, mapped onto per-module scales.

Per (layer, head), from the attention statistics table (sums over S samples, see attention.py):
  two_pass    g = Σ(a¹ − a⁰) − ρ·Σ(u¹ − u⁰),   H = S·λ_H + μ·Σu¹   (the paper's objective)
  anchor_only g = Σa⁰ − ρ·Σu⁰,                H = S·λ_H + μ·Σu⁰   (pass 0 only: θ_R's own attention)
  post_only   g = Σa¹ − ρ·Σu¹,                H = S·λ_H + μ·Σu¹   (pass 1 only: θ_R + p·Δ⊥)
α maximises g·α − ½H·α² − ½ℓ₂(α − p)² − ℓ₁|α − p| on [lo, hi]; per head this is
  α = clip(p + soft(g − H·p, ℓ₁) / (H + ℓ₂), lo, hi)
which for ℓ₁ = 0 is clip((g + ℓ₂p)/(H + ℓ₂), lo, hi). `solve_box_qp` solves the same problem
for a general (non-diagonal) curvature numerically.

Scale: g and H are both sums over samples, so for S ≫ ℓ₂ the solution tends to mean(Δa − ρΔu)/λ_H,
an attention-mass difference (typically 10⁻³–10⁻²): with METHOD.md's defaults α sits near the
box floor and the merge barely moves θ_R. `scale: relative` keeps the solved α's proportions
between heads but rescales them to mean p (then clips to the box), so Stage 2 allocates the update
and λ sets its size.

Module scales (one safetensors file keyed by checkpoint tensor names, each broadcasting against
its tensor): q_proj rows and o_proj columns of head h take α_{l,h}; k_proj/v_proj rows of KV group g
take the mean α of the query heads h with h // n_rep = g (applied once per group); gate/up/down,
and o_proj's bias where present (an output-side term of the whole layer), take the layer mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize

from rain_tasks.arch import ModelShape, layer_of, module_of, read_shape
from rain_tasks.checkpoint import Checkpoint, atomic_path, save_tensors
from rain_tasks.guards import require_finite
from rain_tasks.params import AlphaParams
from rain_tasks.plots import heatmap
from rain_tasks.schemas import STATS_SCHEMA, alpha_schema


def objective_terms(stats: pd.DataFrame, params: AlphaParams) -> tuple[np.ndarray, np.ndarray]:
    """Linear term g and diagonal curvature H per row of the statistics table, for the chosen variant."""
    align = {"two_pass": stats.a1 - stats.a0, "anchor_only": stats.a0, "post_only": stats.a1}[params.variant]
    leak = {"two_pass": stats.u1 - stats.u0, "anchor_only": stats.u0, "post_only": stats.u1}[params.variant]
    curvature_leak = stats.u0 if params.variant == "anchor_only" else stats.u1
    g = align - params.rho * leak
    h = stats.n_samples * params.lambda_h + params.mu * curvature_leak
    return g.to_numpy(np.float64), h.to_numpy(np.float64)


def soft_threshold(x: np.ndarray, t: float) -> np.ndarray:
    """sign(x)·max(|x| − t, 0): the proximal step of t·|·|."""
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


def closed_form_alpha(g: np.ndarray, h: np.ndarray, params: AlphaParams, prior: float) -> np.ndarray:
    """Exact per-head maximiser of gα − ½Hα² − ½ℓ₂(α−p)² − ℓ₁|α−p| on the box (1-D: clip the free optimum)."""
    free = prior + soft_threshold(g - h * prior, params.l1) / (h + params.l2)
    return np.clip(free, params.box_lo, params.box_hi)


def solve_box_qp(curvature: np.ndarray, g: np.ndarray, params: AlphaParams, prior: float) -> np.ndarray:
    """Numerical maximiser of gᵀα − ½αᵀHα − ½ℓ₂‖α−p‖² − ℓ₁‖α−p‖₁ on the box for any PSD curvature H.

    α = p + s⁺ − s⁻ with bounded s± ≥ 0 makes the L1 term linear (exact at the optimum) and maps the
    box exactly; L-BFGS-B then handles the bounds.
    """
    n = len(g)
    p = np.full(n, float(prior))
    lo, hi = params.box_lo, params.box_hi
    bounds = [(max(lo - prior, 0.0), max(hi - prior, 0.0))] * n + [(max(prior - hi, 0.0), max(prior - lo, 0.0))] * n

    def loss(z: np.ndarray) -> tuple[float, np.ndarray]:
        alpha = p + z[:n] - z[n:]
        grad = curvature @ alpha - g + params.l2 * (alpha - p)
        value = 0.5 * alpha @ curvature @ alpha - g @ alpha + 0.5 * params.l2 * np.sum((alpha - p) ** 2) + params.l1 * z.sum()
        return value, np.concatenate([grad + params.l1, -grad + params.l1])

    z0 = np.array([b[0] for b in bounds])
    res = minimize(loss, z0, jac=True, method="L-BFGS-B", bounds=bounds, options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000})
    if not res.success:
        raise RuntimeError(f"box QP did not converge: {res.message}")
    return np.clip(p + res.x[:n] - res.x[n:], lo, hi)


def rescale(alpha: np.ndarray, params: AlphaParams, prior: float) -> np.ndarray:
    """α as used for the merge: unchanged (absolute) or rescaled to mean `prior` and clipped (relative)."""
    if params.scale == "absolute":
        return alpha
    mean = float(alpha.mean())
    if mean <= 0.0:
        raise ValueError(
            "alpha.scale is 'relative' but every solved α is at or below 0 (no head gained instruction attention); "
            "use alpha.scale: absolute or a box_lo above 0"
        )
    return np.clip(alpha * (prior / mean), params.box_lo, params.box_hi)


def group_mean(alpha_layer: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """Mean α of the query heads sharing each KV group (query head h reads group h // n_rep)."""
    return alpha_layer.view(shape.num_kv_heads, shape.n_rep).mean(1)


def module_scale(module: str, kind: str, alpha_layer: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """Scale tensor for one parameter of a layer, shaped to broadcast against it (see module docstring)."""
    if module in ("q_proj", "k_proj", "v_proj"):
        per_head = alpha_layer if module == "q_proj" else group_mean(alpha_layer, shape)
        rows = per_head.repeat_interleave(shape.head_dim)
        return rows[:, None] if kind == "weight" else rows
    if module == "o_proj" and kind == "weight":
        return alpha_layer.repeat_interleave(shape.head_dim)[None, :]
    mean = alpha_layer.mean().reshape(1)
    return mean.reshape(1, 1) if kind == "weight" else mean


def module_scales(alpha: np.ndarray, shape: ModelShape, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Scales for every q/k/v/o/gate/up/down weight and bias of the checkpoint, from α[layer, head]."""
    table = torch.from_numpy(alpha).to(torch.float32)
    scales = {}
    for name in ckpt.names():
        module = module_of(name)
        if module is None:
            continue
        scale = module_scale(module, name.rsplit(".", 1)[1], table[layer_of(name)], shape)
        target = ckpt.shape(name)
        if torch.broadcast_shapes(scale.shape, target) != torch.Size(target):
            raise ValueError(f"{name}: scale {tuple(scale.shape)} does not broadcast against {target}; config and checkpoint disagree")
        scales[name] = scale.contiguous()
    return scales


def alpha_table(
    stats: pd.DataFrame, g: np.ndarray, h: np.ndarray, solved: np.ndarray, alpha: np.ndarray, shape: ModelShape
) -> pd.DataFrame:
    """Per-(layer, head) table of the statistics, objective terms, the solved α and the α merged."""
    out = stats[["layer", "head"]].copy()
    out.insert(2, "kv_group", (out["head"] // shape.n_rep).astype(np.int64))
    for col in ("a0", "a1", "u0", "u1"):
        out[col] = stats[col].to_numpy(np.float64)
    out["g"], out["H"], out["alpha_solved"], out["alpha"] = g, h, solved, alpha
    return out.reset_index(drop=True)


def read_stats(stats_path: str | Path, shape: ModelShape) -> pd.DataFrame:
    """The validated statistics table sorted by (layer, head), refused if its grid is not the model's."""
    stats = STATS_SCHEMA.validate(pd.read_parquet(stats_path)).sort_values(["layer", "head"]).reset_index(drop=True)
    grid = (int(stats["layer"].max()) + 1, int(stats["head"].max()) + 1)
    if grid != (shape.num_layers, shape.num_heads):
        raise ValueError(f"{stats_path}: statistics cover {grid} (layers, heads); the LRM has {(shape.num_layers, shape.num_heads)}")
    return stats


def solve_alpha(
    stats_path: str | Path,
    lrm_dir: str | Path,
    params: AlphaParams,
    prior: float,
    out_table: str | Path,
    out_scales: str | Path,
    out_plot_csv: str | Path | None = None,
    out_plot_png: str | Path | None = None,
    out_summary: str | Path | None = None,
    summary_image: str | None = None,
) -> Path:
    """Solve α per head; write the α table (parquet), module scales (safetensors), heatmap CSV and PNG, and the
    report section (markdown, embedding the PNG as `summary_image`); return out_table."""
    shape = read_shape(lrm_dir)
    stats = read_stats(stats_path, shape)
    g, h = objective_terms(stats, params)
    solved = closed_form_alpha(g, h, params, prior)
    alpha = rescale(solved, params, prior)
    table = alpha_schema(params.box_lo, params.box_hi).validate(
        require_finite(alpha_table(stats, g, h, solved, alpha, shape), f"alpha {out_table}"))
    with atomic_path(out_table) as tmp:
        table.to_parquet(tmp, index=False)
    scales = module_scales(alpha.reshape(shape.num_layers, shape.num_heads), shape, Checkpoint(lrm_dir))
    meta = {"kind": "alpha_scales", "variant": params.variant, "prior": repr(float(prior)), "params": params.model_dump_json()}
    save_tensors(out_scales, scales, meta)
    if out_plot_csv is not None:
        with atomic_path(out_plot_csv) as tmp:
            unit = "L" + table["layer"].astype(str) + ".h" + table["head"].astype(str)
            table[["layer", "head"]].assign(unit=unit, alpha=table["alpha"]).to_csv(tmp, index=False)
    if out_plot_png is not None:
        title = f"α per (layer, head): {params.variant}, {params.scale}"
        heatmap(table, "layer", "head", "alpha", out_plot_png, title, vmin=params.box_lo, vmax=params.box_hi)
    if out_summary is not None:
        with atomic_path(out_summary) as tmp:
            tmp.write_text(summary_markdown(table, params, summary_image))
    return Path(out_table)


def summary_markdown(table: pd.DataFrame, params: AlphaParams, image: str | None = None) -> str:
    """Report section: α per layer (mean, min, max, share of heads on the box bounds) and the heatmap."""
    rows = ["| layer | mean α | min α | max α | at box_lo | at box_hi | mean solved α |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for layer, part in table.groupby("layer", sort=True):
        a = part["alpha"]
        rows.append(
            f"| {layer} | {a.mean():.4f} | {a.min():.4f} | {a.max():.4f} | {(a <= params.box_lo).mean():.2f} "
            f"| {(a >= params.box_hi).mean():.2f} | {part['alpha_solved'].mean():.4f} |"
        )
    head = [f"## Stage 2: α per head ({params.variant}, scale {params.scale}, box [{params.box_lo}, {params.box_hi}])", ""]
    tail = ["", f"![α heatmap]({image})", ""] if image else [""]
    return "\n".join(head + rows + tail)
