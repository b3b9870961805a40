"""Stage 2 coefficients: α per (layer, query head) from the attention statistics, mapped onto per-module scales.

The statistics (attention.py) hold, per sample x and (layer, head), the alignment a and leakage u at
θ_R + t·D for t = 0, p and 2p, D being the merge's update at α = 1. With J = a − ρu:
  curvature   per sample g_x = (−3J(0) + 4J(p) − J(2p))/(2p),  H_x = −(J(2p) − 2J(p) + J(0))/p² + μ·u(p);
              g, H = their means (S cancels): the slope and curvature of the objective along D, so α is a
              step along D with units (METHOD.md's corrected form)
  two_pass    g_x = Δa − ρΔu,  H_x = λ_H + μ·u¹; g, H = their SUMS   (METHOD.md's reference form)
  anchor_only g_x = a⁰ − ρu⁰,  H_x = λ_H + μ·u⁰; sums                (pass 0 only: θ_R's own attention)
  post_only   g_x = a¹ − ρu¹,  H_x = λ_H + μ·u¹; sums                (pass 1 only)
α maximises g·α − ½H·α² − ½ℓ₂(α − p)² − ℓ₁|α − p| on [lo, hi]: for H + ℓ₂ > 0
  α = clip(p + soft(g − H·p, ℓ₁) / (H + ℓ₂), lo, hi)
(for ℓ₁ = 0, clip((g + ℓ₂p)/(H + ℓ₂), lo, hi)); where H + ℓ₂ ≤ 0 the objective is convex on the box and
the better bound wins. (rain_dev.checks.solve_box_qp solves the same problem numerically for any curvature; the
tests check the closed form against it.)

Evidence: g's standard error over samples (g_se); a head whose |g| < min_t·g_se has no measurable gain and
keeps the prior p. Heads whose curvature is not measurably positive are counted (the attention objective
sets no scale there: choose λ by thinking-format cost on a validation split). The split-half reliability is
the Spearman correlation between the α solved from the even and the odd samples.

Scale: with the reference sums, g and H grow with S and α tends to mean(Δa − ρΔu)/λ_H (10⁻³–10⁻²):
the merge barely moves θ_R. `scale: relative` keeps the solved α's proportions between heads but
rescales them to mean p (then clips to the box), so Stage 2 allocates the update and λ sets its size.

Module scales (one safetensors file keyed by checkpoint tensor names, each broadcasting against
its tensor): q_proj rows and o_proj columns of head h take α_{l,h}; k_proj/v_proj rows of KV group g
take the mean α of the query heads h with h // n_rep = g (applied once per group); gate/up/down,
and o_proj's bias where present (an output-side term of the whole layer), take the layer mean.
Beside them, two controls at the same mean α: every head the mean (`uniform`) and α permuted across
heads (`permuted`), which the ablations merge to show what the allocation itself is worth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from rain_tasks.io.arch import ModelShape, layer_of, module_of, read_shape
from rain_tasks.io.checkpoint import Checkpoint, save_tensors
from rain_tasks.io.artifacts import atomic_path, write_json, write_text
from rain_tasks.io.guards import require_finite
from rain_tasks.params import AlphaParams
from rain_tasks.io.plots import heatmap
from rain_tasks.io.schemas import PASS_COLUMNS, STATS_SCHEMA, alpha_schema


#: per-sample reduction of each variant: curvature takes means (S cancels), the reference forms sums
_MEANS = {"curvature"}


def sample_grid(stats: pd.DataFrame) -> dict[str, np.ndarray]:
    """The per-sample table (a complete grid, STATS_SCHEMA) as arrays [samples, layers·heads] per pass column,
    columns in (layer, head) order."""
    ordered = stats.sort_values(["sample", "layer", "head"])
    n = int(ordered["sample"].max()) + 1
    return {c: ordered[c].to_numpy(np.float64).reshape(n, -1) for c in PASS_COLUMNS}


def sample_terms(grid: dict[str, np.ndarray], params: AlphaParams, prior: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample linear term g_x and curvature H_x [samples, heads] of the chosen variant (module docstring)."""
    a0, a1, a2, u0, u1, u2 = (grid[c] for c in PASS_COLUMNS)
    if params.variant == "curvature":
        if np.isnan(a2).any():
            raise ValueError("alpha.variant 'curvature' needs the third attention pass: set attention.curvature_pass: true "
                             "(or choose alpha.variant two_pass)")
        j0, j1, j2 = a0 - params.rho * u0, a1 - params.rho * u1, a2 - params.rho * u2
        return (-3 * j0 + 4 * j1 - j2) / (2 * prior), -(j2 - 2 * j1 + j0) / prior**2 + params.mu * u1
    align = {"two_pass": a1 - a0, "anchor_only": a0, "post_only": a1}[params.variant]
    leak = {"two_pass": u1 - u0, "anchor_only": u0, "post_only": u1}[params.variant]
    return align - params.rho * leak, params.lambda_h + params.mu * (u0 if params.variant == "anchor_only" else u1)


def reduce_terms(g_x: np.ndarray, h_x: np.ndarray, params: AlphaParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(g, H, g's standard error, H's standard error) per head: means or sums over samples as the variant says."""
    n = g_x.shape[0]
    factor = 1.0 / n if params.variant in _MEANS else 1.0
    spread = (lambda x: x.std(0, ddof=1) * np.sqrt(n) * factor) if n > 1 else (lambda x: np.full(x.shape[1], np.nan))
    return g_x.sum(0) * factor, h_x.sum(0) * factor, spread(g_x), spread(h_x)


def soft_threshold(x: np.ndarray, t: float) -> np.ndarray:
    """sign(x)·max(|x| − t, 0): the proximal step of t·|·|."""
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


def _objective(alpha: np.ndarray, g: np.ndarray, h: np.ndarray, params: AlphaParams, prior: float) -> np.ndarray:
    """g·α − ½H·α² − ½ℓ₂(α − p)² − ℓ₁|α − p| per head."""
    d = alpha - prior
    return g * alpha - 0.5 * h * alpha**2 - 0.5 * params.l2 * d**2 - params.l1 * np.abs(d)


def closed_form_alpha(g: np.ndarray, h: np.ndarray, params: AlphaParams, prior: float) -> np.ndarray:
    """Exact per-head maximiser of gα − ½Hα² − ½ℓ₂(α−p)² − ℓ₁|α−p| on the box: the clipped free optimum where the
    objective is concave (H + ℓ₂ > 0), else the better of the two bounds."""
    concave = h + params.l2 > 0
    free = prior + soft_threshold(g - h * prior, params.l1) / np.where(concave, h + params.l2, 1.0)
    lo, hi = np.full_like(g, params.box_lo), np.full_like(g, params.box_hi)
    bound = np.where(_objective(hi, g, h, params, prior) > _objective(lo, g, h, params, prior), hi, lo)
    return np.where(concave, np.clip(free, params.box_lo, params.box_hi), bound)


def solve_heads(g: np.ndarray, h: np.ndarray, g_se: np.ndarray, params: AlphaParams, prior: float) -> tuple[np.ndarray, np.ndarray]:
    """(α, significant) per head: the box maximiser where |g| ≥ min_t·g_se, the prior (clipped) elsewhere."""
    significant = ~(np.abs(g) < params.min_t * g_se)  # an unknown spread (one sample) counts as significant
    keep = np.clip(np.full_like(g, prior), params.box_lo, params.box_hi)
    return np.where(significant, closed_form_alpha(g, h, params, prior), keep), significant


def split_half_reliability(g_x: np.ndarray, h_x: np.ndarray, params: AlphaParams, prior: float) -> float:
    """Spearman correlation over heads between α solved from the even and from the odd samples (NaN if undefined)."""
    if g_x.shape[0] < 4:
        return float("nan")
    halves = []
    for part in (slice(0, None, 2), slice(1, None, 2)):
        g, h, _, _ = reduce_terms(g_x[part], h_x[part], params)
        halves.append(closed_form_alpha(g, h, params, prior))
    if np.ptp(halves[0]) == 0 or np.ptp(halves[1]) == 0:
        return float("nan")
    return float(spearmanr(halves[0], halves[1]).statistic)


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


def alpha_table(stats: pd.DataFrame, terms: dict[str, np.ndarray], solved: np.ndarray, alpha: np.ndarray,
                significant: np.ndarray, shape: ModelShape) -> pd.DataFrame:
    """Per-(layer, head) table: mean statistics per pass, objective terms with g's standard error, α solved and merged."""
    out = stats.groupby(["layer", "head"], sort=True)[list(PASS_COLUMNS)].mean().reset_index()
    out.insert(2, "kv_group", (out["head"] // shape.n_rep).astype(np.int64))
    out["g"], out["g_se"], out["H"] = terms["g"], terms["g_se"], terms["H"]
    out["significant"], out["alpha_solved"], out["alpha"] = significant.astype(bool), solved, alpha
    return out


def read_stats(stats_path: str | Path, shape: ModelShape) -> pd.DataFrame:
    """The validated per-sample statistics, refused if its (layer, head) grid is not the model's."""
    stats = STATS_SCHEMA.validate(pd.read_parquet(stats_path))
    grid = (int(stats["layer"].max()) + 1, int(stats["head"].max()) + 1)
    if grid != (shape.num_layers, shape.num_heads):
        raise ValueError(f"{stats_path}: statistics cover {grid} (layers, heads); the LRM has {(shape.num_layers, shape.num_heads)}")
    return stats


def control_alphas(alpha: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The ablations' controls at the same mean α: every head the mean, and α permuted across heads (seeded)."""
    return {"uniform": np.full_like(alpha, alpha.mean()), "permuted": np.random.default_rng(seed).permutation(alpha.ravel()).reshape(alpha.shape)}


def control_scales_path(scales_path: str | Path, control: str) -> Path:
    """Where a control's module scales lie: beside the α scales (`scales.safetensors` -> `scales_uniform.safetensors`)."""
    path = Path(scales_path)
    return path.with_name(f"{path.stem}_{control}{path.suffix}")


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
    out_metrics: str | Path | None = None,
) -> Path:
    """Solve α per head; write the α table (parquet), module scales and the controls' (safetensors), heatmap CSV and
    PNG, the report section (markdown, embedding the PNG as `summary_image`) and metrics (JSON); return out_table."""
    shape = read_shape(lrm_dir)
    stats = read_stats(stats_path, shape)
    g_x, h_x = sample_terms(sample_grid(stats), params, prior)
    g, h, g_se, h_se = reduce_terms(g_x, h_x, params)
    solved, significant = solve_heads(g, h, g_se, params, prior)
    alpha = rescale(solved, params, prior)
    table = alpha_table(stats, {"g": g, "g_se": g_se, "H": h}, solved, alpha, significant, shape)
    require_finite(table.dropna(axis=1, how="all"), f"alpha {out_table}")  # whole-NaN columns: a pass not run, one sample
    table = alpha_schema(params.box_lo, params.box_hi).validate(table)
    with atomic_path(out_table) as tmp:
        table.to_parquet(tmp, index=False)
    ckpt, grid = Checkpoint(lrm_dir), (shape.num_layers, shape.num_heads)
    meta = {"kind": "alpha_scales", "variant": params.variant, "prior": repr(float(prior)), "params": params.model_dump_json()}
    save_tensors(out_scales, module_scales(alpha.reshape(grid), shape, ckpt), meta)
    for control, values in control_alphas(alpha).items():
        save_tensors(control_scales_path(out_scales, control), module_scales(values.reshape(grid), shape, ckpt), {**meta, "control": control})
    evidence = {
        "n_samples": int(g_x.shape[0]),
        "significant_share": float(significant.mean()),
        "no_scale_share": float(np.mean(~(h > 2 * np.nan_to_num(h_se, nan=0.0)))),
        "split_half_spearman": split_half_reliability(g_x, h_x, params, prior),
    }
    if out_metrics is not None:
        summary = {"alpha_mean": float(alpha.mean()), "at_box_lo": float((alpha <= params.box_lo).mean()),
                   "at_box_hi": float((alpha >= params.box_hi).mean()), **evidence}
        write_json(out_metrics, summary)
    if out_plot_csv is not None:
        with atomic_path(out_plot_csv) as tmp:
            unit = "L" + table["layer"].astype(str) + ".h" + table["head"].astype(str)
            table[["layer", "head"]].assign(unit=unit, alpha=table["alpha"]).to_csv(tmp, index=False)
    if out_plot_png is not None:
        title = f"α per (layer, head): {params.variant}, {params.scale}"
        heatmap(table, "layer", "head", "alpha", out_plot_png, title, vmin=params.box_lo, vmax=params.box_hi)
    if out_summary is not None:
        write_text(out_summary, summary_markdown(table, params, summary_image, evidence))
    return Path(out_table)


def summary_markdown(table: pd.DataFrame, params: AlphaParams, image: str | None = None, evidence: dict | None = None) -> str:
    """Report section: α per layer (mean, min, max, share on the box bounds, heads with a measurable gain), the
    evidence behind it (split-half reliability, heads where the objective sets no scale) and the heatmap."""
    rows = ["| layer | mean α | min α | max α | at box_lo | at box_hi | mean solved α | significant gain |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layer, part in table.groupby("layer", sort=True):
        a = part["alpha"]
        rows.append(
            f"| {layer} | {a.mean():.4f} | {a.min():.4f} | {a.max():.4f} | {(a <= params.box_lo).mean():.2f} "
            f"| {(a >= params.box_hi).mean():.2f} | {part['alpha_solved'].mean():.4f} | {part['significant'].mean():.2f} |"
        )
    head = [f"## Stage 2: α per head ({params.variant}, scale {params.scale}, box [{params.box_lo}, {params.box_hi}])", ""]
    notes = []
    if evidence is not None:
        notes = ["", f"Heads whose gain g is at least {params.min_t} standard errors from 0: {evidence['significant_share']:.2f} "
                     f"(the others keep the prior). Split-half reliability (Spearman of α from even vs odd samples, "
                     f"{evidence['n_samples']} samples): {evidence['split_half_spearman']:.3f}."]
        if params.variant == "curvature" and evidence["no_scale_share"] > 0:
            notes.append(f"The measured curvature H is not positive beyond two standard errors in {evidence['no_scale_share']:.0%} "
                         "of heads: there the attention objective sets no scale, and λ should be chosen by thinking-format "
                         "cost on the validation split.")
    tail = ["", f"![α heatmap]({image})", ""] if image else [""]
    return "\n".join(head + rows + notes + tail)
