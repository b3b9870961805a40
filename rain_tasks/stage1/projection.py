"""Stage 1 projection: Δ⊥ = Δ − (Δ U) Uᵀ per merged module, U the protected subspace of its Ω features.

For every layer and module, [W | b] of the task vector (bias column where the module has one)
is projected on the right by the protected basis of the module's row set (features.row_sets);
k/v rows of KV group g use group g's basis, and o_proj's columns of head h its head's basis
(`module_blocks`), so that θ_R + λ·α⊙Δ⊥ keeps Ω for any per-head α, not only α = 1. The basis comes from the eigendecomposition of the
Gram (float64), or, on the low-rank path, from the QR of the rows' transpose and the n × n eigenproblem
of R Rᵀ (O(n²·d + n³)): G = XᵀX = Q R Rᵀ Qᵀ, so both give the same projector. Directions with eigenvalue ≤ 1e-12·λ_max count as numerically zero.
`precision: float32` does all of it (bases, projection, diagnostics) in float32 instead: no float64 copy of [W | b]
or of the rows; on the low-rank path the basis comes from the n × n eigenproblem of X Xᵀ itself (U = Xᵀ V Λ^(-1/2),
no QR: R Rᵀ is formed explicitly anyway, so its eigenvalues are resolved no better); eigenvalues ≤ 1e-6·λ_max count
as zero (float32's eigensolver resolves about 10·eps·λ_max), and tests/test_projection.py bounds its departure from
the float64 path.
`dtype` stores Δ⊥ as float32 (default) or in a 16-bit dtype (the LRM's, halving what the merge reads).

Selection (ProjectionParams):
  max_leftover    per block, the fewest directions (by their share λ_i‖Δu_i‖² of Δ's response) that leave
                  ‖Δ⊥Xᵀ‖/‖ΔXᵀ‖ ≤ max_leftover on the calibration rows: protection reaches every direction
                  where Δ acts, not only the top of the feature spectrum (which outlier dimensions dominate);
  rank            the top `rank` directions;
  rel_threshold   directions with λ > rel_threshold·λ_max;
  energy          otherwise: the smallest top set holding `energy` of the trace;
  ridge > 0       instead of a hard set, the soft projector P = G (G + εI)⁻¹ with ε = ridge·tr(G)/d,
                  i.e. weight λ/(λ+ε) on every eigen-direction: Δ⊥ = Δ (I − P).
`rank_kept` in the report is tr(P) rounded (the number of directions for a hard set).

Layout of the output directory:
  layer_000.safetensors …  Δ⊥ (projection.dtype, float32 by default) keyed by the checkpoint names of the q/k/v/o/gate/up/down
                           weights and biases; metadata holds the input digests and this layer's
                           report rows (JSON), so a rerun skips layers made from the same inputs.
  manifest.json            written last: its presence means complete.
The report (parquet, PROJECTION_REPORT_SCHEMA) has one row per layer × module × block (KV group for k/v,
query head for o_proj): rank kept, energy protected, ‖Δ⊥‖/‖Δ‖, and the invariance residual ‖Δ⊥Xᵀ‖/‖ΔXᵀ‖ on
the calibration rows (overall, and with the outlier dimensions of the rows left out), and on held-out rows.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from pydantic import BaseModel
from tqdm import tqdm

from rain_tasks.io.arch import MODULES, ModelShape
from rain_tasks.io.checkpoint import is_current, load_tensors, read_metadata, save_tensors
from rain_tasks.io.artifacts import MANIFEST, atomic_path, layer_file, read_manifest, write_json
from rain_tasks.io.guards import require_finite
from rain_tasks.io.digest import file_digest, json_digest
from rain_tasks.stage1.features import GRAM, ROWS, row_sets
from rain_tasks.params import ProjectionParams
from rain_tasks.io.schemas import PROJECTION_REPORT_SCHEMA

_ZERO_RTOL = 1e-12
#: eigenvalues ≤ this × λ_max count as numerically zero, per compute dtype (float32's eigh resolves about 10·eps·λ_max)
ZERO_RTOL = {torch.float64: _ZERO_RTOL, torch.float32: 1e-6}
#: params' precision names -> the compute dtype of the bases, the projection and its diagnostics
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
#: an input dimension whose RMS over the Ω rows exceeds this × the median is an outlier dimension (report only)
OUTLIER_FACTOR = 6.0


def nonzero_directions(t: torch.Tensor, vals: torch.Tensor, vecs: torch.Tensor, kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs (descending, ≥ 0) above the numerical zero (ZERO_RTOL·λ_max) as directions of the input space; for
    eigenvectors V of X Xᵀ (`kernel`), U = Xᵀ V Λ^(-1/2), orthonormal whenever Vᵀ X Xᵀ V = Λ."""
    if vals.numel() == 0 or vals[0] <= 0:
        return vals[:0], vecs.new_zeros(t.shape[1], 0)
    keep = vals > ZERO_RTOL[t.dtype] * vals[0]
    if kernel:
        return vals[keep], (t.T @ vecs[:, keep]) / vals[keep].sqrt()
    return vals[keep], vecs[:, keep]


@dataclass(frozen=True)
class RowStats:
    """Second moments of one row set: a Gram G [d, d], or rows X [n, d] standing for G = XᵀX (n rows in all)."""

    kind: str
    tensor: torch.Tensor
    n: int

    @property
    def dim(self) -> int:
        return self.tensor.shape[1]

    @property
    def _t(self) -> torch.Tensor:
        """The statistics in their compute dtype: float64 or float32 as stored (`astype`), anything else in float64."""
        return self.tensor if self.tensor.dtype in PRECISIONS.values() else self.tensor.to(torch.float64)

    def astype(self, dtype: torch.dtype) -> RowStats:
        """The same statistics with every later computation (spectrum, diagnostics) in `dtype`."""
        return self if self.tensor.dtype == dtype else RowStats(self.kind, self.tensor.to(dtype), self.n)

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending, ≥ 0) and eigenvectors [d, r] of G, numerical zeros dropped (computed once)."""
        return self._spectrum

    @functools.cached_property
    def _spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._t
        kernel = self.kind == ROWS and t.shape[0] < t.shape[1] and t.dtype == torch.float32
        if kernel:  # eigh of X Xᵀ [n, n], then U = Xᵀ V Λ^(-1/2) for the directions kept (float32 only: see below)
            vals, vecs = torch.linalg.eigh(t @ t.T)
        elif self.kind == ROWS and t.shape[0] < t.shape[1]:
            q, r = torch.linalg.qr(t.T)  # Xᵀ = QR, so G = XᵀX = Q (R Rᵀ) Qᵀ: an n × n eigenproblem, not d × d
            vals, b = torch.linalg.eigh(r @ r.T)
            vecs = q @ b
        else:
            vals, vecs = torch.linalg.eigh(t if self.kind == GRAM else t.T @ t)
        # kernel: no QR, since R Rᵀ = X Xᵀ has the same eigenvalues and float32 resolves them no finer either way
        return nonzero_directions(t, vals.flip(0).clamp_min(0.0), vecs.flip(1), kernel)

    def without(self, dims: torch.Tensor) -> RowStats:
        """The same statistics with the input dimensions `dims` zeroed (e.g. outlier dimensions left out)."""
        t = self._t.clone()
        t[:, dims] = 0.0
        if self.kind == GRAM:
            t[dims, :] = 0.0
        return RowStats(self.kind, t, self.n)

    def outlier_dims(self, factor: float, skip_last: bool = False) -> torch.Tensor:
        """Input dimensions whose RMS over the rows exceeds `factor` × the median RMS (a bias column excluded)."""
        t = self._t
        ms = t.diagonal() if self.kind == GRAM else t.square().sum(0)
        if skip_last:
            ms = ms[:-1]
        rms = (ms / max(self.n, 1)).sqrt()
        return (rms > factor * rms.median()).nonzero().flatten() if rms.numel() else rms.long()

    def trace(self) -> float:
        """tr(G)."""
        t = self._t
        return float(t.diagonal().sum() if self.kind == GRAM else t.square().sum())

    def quad(self, m: torch.Tensor) -> float:
        """tr(M G Mᵀ) = ‖M Xᵀ‖²: the squared response of M on the rows."""
        t = self._t
        return float(((m @ t) * m).sum() if self.kind == GRAM else (m @ t.T).square().sum())

    def quad_before_after(self, m: torch.Tensor, a: torch.Tensor, u: torch.Tensor) -> tuple[float, float]:
        """(quad(M), quad(M − A Uᵀ)) with one product of M against the statistics, not two.

        A = (M U) diag(w) is what the projection already computed; the second term then costs
        out·r·n (rows) or out·d·r (Gram) instead of another out·d·n or out·d² product.
        """
        t = self._t
        if self.kind == GRAM:
            mg = m @ t
            before = (mg * m).sum()
            after = before - 2 * (a * (mg @ u)).sum() + ((a @ (u.T @ t @ u)) * a).sum()
        else:
            y = m @ t.T
            before, after = y.square().sum(), (y - a @ (u.T @ t.T)).square().sum()
        return float(before), max(float(after), 0.0)


def load_stats(path: str | Path) -> dict[str, RowStats]:
    """Read a features layer file into row-set name -> RowStats."""
    counts = json.loads(read_metadata(path)["rows"])
    out = {}
    for key, t in load_tensors(path).items():
        kind, name = key.split(".", 1)
        out[name] = RowStats(kind, t, int(counts[name]))
    return out


@dataclass(frozen=True)
class Basis:
    """A (soft) protected subspace: directions U [d, r] with weights w ∈ (0, 1]; P = U diag(w) Uᵀ."""

    u: torch.Tensor
    w: torch.Tensor
    energy_protected: float

    @property
    def rank(self) -> int:
        return int(round(float(self.w.sum())))


def leftover_weights(vals: torch.Tensor, vecs: torch.Tensor, block: torch.Tensor, max_leftover: float) -> torch.Tensor:
    """1 on the fewest eigen-directions whose removal leaves ‖Δ⊥Xᵀ‖/‖ΔXᵀ‖ ≤ max_leftover, else 0.

    ‖ΔXᵀ‖² = Σ_i λ_i‖Δu_i‖² over the eigenpairs of G = XᵀX, so the directions are taken by their share
    λ_i‖Δu_i‖² of the block's response, largest first: the fewest that reach the target.
    """
    weights = torch.zeros_like(vals)
    if vals.numel() == 0:
        return weights
    response = (block.to(vecs.dtype) @ vecs).square().sum(0) * vals
    total = float(response.sum())
    if total <= 0.0:
        return weights
    order = response.argsort(descending=True)
    left = total - response[order].cumsum(0)  # response left after protecting the first k + 1
    k = int((left > max_leftover**2 * total).sum()) + 1
    weights[order[: min(k, vals.numel())]] = 1.0
    return weights


def selection_weights(vals: torch.Tensor, params: ProjectionParams, trace: float, dim: int, total: float | None = None) -> torch.Tensor:
    """Protection weight per eigen-direction (descending λ): 1/0 for a hard set, λ/(λ+ε) for ridge.

    The energy rule reads its share of `total`: the spectrum's own sum by default, the trace where `vals` is
    only the top of the spectrum (the randomized solver)."""
    if vals.numel() == 0:
        return vals.clone()
    if params.ridge > 0:
        return vals / (vals + params.ridge * trace / dim)
    if params.rank is not None:
        k = min(params.rank, vals.numel())
    elif params.rel_threshold is not None:
        k = int((vals > params.rel_threshold * vals[0]).sum())
    else:
        cum = vals.cumsum(0)
        whole = cum[-1] if total is None else total
        k = int(torch.searchsorted(cum, params.energy * whole * (1 - _ZERO_RTOL))) + 1  # ties count as reached
        k = min(k, vals.numel())
    return (torch.arange(vals.numel()) < k).to(vals.dtype)


#: the randomized solver: first block of directions (doubled until the rule is met), extra columns, power iterations
SUBSPACE_START, SUBSPACE_OVERSAMPLE, SUBSPACE_ITERS = 64, 16, 4


def rule_covered(vals: torch.Tensor, params: ProjectionParams, trace: float) -> bool:
    """Whether the top eigenvalues `vals` (descending) already decide the hard rule: the directions it keeps are among them."""
    if vals.numel() == 0 or vals[-1] <= ZERO_RTOL[vals.dtype] * vals[0]:
        return True  # the spectrum is exhausted within the block
    if params.rank is not None:
        return vals.numel() >= params.rank
    if params.rel_threshold is not None:
        return bool(vals[-1] <= params.rel_threshold * vals[0])
    return float(vals.sum()) >= params.energy * trace * (1 - _ZERO_RTOL)


def top_spectrum(stats: RowStats, covered: Callable[[torch.Tensor], bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """The top eigenpairs of G = XᵀX (as `RowStats.spectrum`), by block subspace iteration with Rayleigh–Ritz.

    The block starts at SUBSPACE_START directions and doubles (the last block kept as the start of the next) until
    `covered(vals)`; past a quarter of the problem's size the exact spectrum is cheaper. Ritz values never exceed the
    true eigenvalues (so an energy target reached on them is reached by the exact top set of the same size), and the
    Ritz vectors are orthonormal; on the low-rank path the operator X Xᵀ is applied as X (Xᵀ Q), never formed. A
    fixed seed keeps the bases bit-identical."""
    t = stats._t
    kernel = stats.kind == ROWS and t.shape[0] < t.shape[1]  # directions in row space: U = Xᵀ V Λ^(-1/2)
    if stats.kind == GRAM:
        apply, size = (lambda q: t @ q), t.shape[1]
    elif kernel:
        apply, size = (lambda q: t @ (t.T @ q)), t.shape[0]
    else:
        apply, size = (lambda q: t.T @ (t @ q)), t.shape[1]
    generator, k = torch.Generator().manual_seed(0), SUBSPACE_START
    q = t.new_zeros(size, 0)
    while k + SUBSPACE_OVERSAMPLE <= size // 4:
        fresh = torch.randn(size, k + SUBSPACE_OVERSAMPLE - q.shape[1], generator=generator, dtype=t.dtype).to(t.device)
        q = torch.cat([q, fresh], dim=1)
        for _ in range(SUBSPACE_ITERS + 1):
            q = torch.linalg.qr(apply(q)).Q
        b = q.T @ apply(q)
        vals, w = torch.linalg.eigh((b + b.T) / 2)
        vals, vecs = vals.flip(0)[:k].clamp_min(0.0), (q @ w.flip(1)[:, :k])  # the oversampled tail is the least accurate
        if covered(vals):
            return nonzero_directions(t, vals, vecs, kernel)
        k *= 2
    return stats.spectrum()


def protected_basis(stats: RowStats, params: ProjectionParams, block: torch.Tensor | None = None) -> Basis:
    """The protected subspace of one row set under `params` (`max_leftover` also needs the block it protects)."""
    trace = stats.trace()
    if params.solver == "randomized":
        vals, vecs = top_spectrum(stats, lambda top: rule_covered(top, params, trace))
    else:
        vals, vecs = stats.spectrum()
    if params.max_leftover is not None:
        if block is None:
            raise ValueError("projection.max_leftover selects directions per block: pass the block")
        w = leftover_weights(vals, vecs, block, params.max_leftover)
    else:
        w = selection_weights(vals, params, trace, stats.dim, total=trace if params.solver == "randomized" else None)
    keep = w > 0
    if params.method == "sage":  # each kept direction damped by βσ̃/(1 + βσ̃), σ̃ = σ/σ_1 (stage1/sage.py)
        sig = vals / vals[0] if keep.any() else vals
        w = torch.where(keep, params.beta * sig / (1.0 + params.beta * sig), w)
    energy = min(float((w * vals).sum() / trace), 1.0) if trace > 0 else 0.0  # a share: float32 sums can round past 1
    return Basis(vecs[:, keep], w[keep], energy)


def project_block_with_coefficients(m: torch.Tensor, basis: Basis) -> tuple[torch.Tensor, torch.Tensor]:
    """(M − A Uᵀ, A) with A = (M U) diag(w), the coefficients the residual diagnostics reuse."""
    a = (m @ basis.u) * basis.w
    return m - a @ basis.u.T, a


def sqrt_ratio(num: float, den: float) -> float:
    """√(num/den) of two squared norms (a norm ratio for the reports; NaN where den is 0)."""
    return math.sqrt(max(num, 0.0) / den) if den > 0 else math.nan


def augmented(delta: dict[str, torch.Tensor], w_name: str, b_name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[W | b] in `dtype` (just W when the module has no bias; no copy when W is stored in `dtype`)."""
    w = delta[w_name].to(dtype)
    return torch.cat([w, delta[b_name].to(dtype)[:, None]], dim=1) if b_name in delta else w


def module_blocks(module: str, shape: ModelShape, layer: int, size: tuple[int, int]) -> list[tuple[int, str, tuple[slice, slice]]]:
    """(block, row set, (rows, columns) of [W | b]) for each part of `module` that is projected on its own basis.

    k/v: the rows of each KV group (Stage 2 scales them by the group's α). o_proj: the columns of each query
    head (scaled by α_h), each on its head's slice of the attention output, so that Δ⊥ z = 0 at Ω holds head
    by head and survives any α; o_proj's bias column (scaled by the layer mean, acting on the constant 1 that
    every Ω row carries) is fully protected, i.e. left at 0. Others: the whole [W | b].
    """
    groups = row_sets(module, shape)
    rows, cols = size
    if module == "o_proj":
        hd = shape.head_dim
        if hd * len(groups) > cols:
            raise ValueError(f"layer {layer} o_proj: {cols} columns cannot hold {len(groups)} heads of width {hd}")
        return [(h, name, (slice(None), slice(h * hd, (h + 1) * hd))) for h, name in groups]
    per = rows // len(groups)
    if per * len(groups) != rows:
        raise ValueError(f"layer {layer} {module}: {rows} rows do not split into {len(groups)} KV groups")
    return [(g, name, (slice(max(g, 0) * per, (max(g, 0) + 1) * per), slice(None))) for g, name in groups]


def project_layer(
    delta: dict[str, torch.Tensor],
    stats: dict[str, RowStats],
    shape: ModelShape,
    layer: int,
    params: ProjectionParams,
    heldout: dict[str, RowStats] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Project one layer's seven modules; return (Δ⊥ tensors by checkpoint name, report rows).

    Arithmetic in `params.precision` (the statistics are cast once per row set), Δ⊥ stored in `params.dtype`."""
    ct, out_dtype = PRECISIONS[params.precision], getattr(torch, params.dtype)
    stats = {name: s.astype(ct) for name, s in stats.items()}
    heldout = {name: s.astype(ct) for name, s in heldout.items()} if heldout is not None else None
    bases: dict[str, Basis] = {}
    inlier_stats: dict[tuple[str, bool], tuple[torch.Tensor, RowStats]] = {}  # one copy per row set, not per block
    out: dict[str, torch.Tensor] = {}
    report = []
    for module in MODULES:
        w_name, b_name = shape.spec.param_name(layer, module, "weight"), shape.spec.param_name(layer, module, "bias")
        if w_name not in delta:
            raise KeyError(f"task vector of layer {layer} lacks {w_name}")
        m = augmented(delta, w_name, b_name, ct)
        blocks = module_blocks(module, shape, layer, tuple(m.shape))
        whole = len(blocks) == 1 and m[blocks[0][2]].shape == m.shape  # one block covering [W | b]: no assembly copy
        # o_proj's bias column (no block: module_blocks) stays 0, or is damped as SAGE's constant direction
        projected = (None if whole else (m / (1.0 + params.beta)).to(torch.float32) if params.method == "sage"
                     else torch.zeros(m.shape, dtype=torch.float32))
        for block_index, set_name, sel in blocks:
            s = stats[set_name]
            block = m[sel]
            if s.dim != block.shape[1]:
                raise ValueError(f"layer {layer} {module}: features of set {set_name!r} have width {s.dim}, its block has {block.shape[1]}")
            key = set_name if params.max_leftover is None else f"{module}.{block_index}"  # max_leftover: per block
            if key not in bases:
                bases[key] = protected_basis(s, params, block)
            basis = bases[key]
            block_projected, coeffs = project_block_with_coefficients(block, basis)
            if whole:
                projected = block_projected.to(torch.float32)
            else:
                projected[sel] = block_projected.to(torch.float32)
            calib = s.quad_before_after(block, coeffs, basis.u)
            skip_last = b_name in delta and module != "o_proj"
            if (set_name, skip_last) not in inlier_stats:
                dims = s.outlier_dims(OUTLIER_FACTOR, skip_last=skip_last)
                inlier_stats[set_name, skip_last] = dims, s.without(dims) if dims.numel() else s
            outliers, inlier_set = inlier_stats[set_name, skip_last]
            inliers = inlier_set.quad_before_after(block, coeffs, basis.u) if outliers.numel() else calib
            held = heldout[set_name].quad_before_after(block, coeffs, basis.u) if heldout is not None else None
            report.append(
                {
                    "layer": layer,
                    "module": module,
                    "group": block_index,
                    "path": s.kind,
                    "d_in": s.dim,
                    "rows": s.n,
                    "rank_kept": basis.rank,
                    "energy_protected": basis.energy_protected,
                    "norm_ratio": sqrt_ratio(block_projected.square().sum().item(), block.square().sum().item()),
                    "residual_calib": sqrt_ratio(calib[1], calib[0]),
                    "outlier_dims": int(outliers.numel()),
                    "residual_calib_inliers": sqrt_ratio(inliers[1], inliers[0]),
                    "residual_heldout": sqrt_ratio(held[1], held[0]) if held is not None else math.nan,
                }
            )
        out[w_name] = projected[:, : delta[w_name].shape[1]].to(out_dtype).contiguous()
        if b_name in delta:
            out[b_name] = projected[:, -1].to(out_dtype).contiguous()
    return out, report


def project(
    task_vectors_dir: str | Path,
    features_dir: str | Path,
    params: ProjectionParams,
    out_dir: str | Path,
    report_path: str | Path,
    heldout_features_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
) -> Path:
    """Write Δ⊥ per layer into `out_dir`, the per-module report to `report_path` and its summary to
    `metrics_path` (JSON for `dvc metrics`); return the manifest path."""
    out_dir = Path(out_dir)
    shape, meta = layer_meta(task_vectors_dir, features_dir, params, heldout_features_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    report: list[dict] = []
    for layer in tqdm(range(shape.num_layers), desc="projection", unit="layer"):
        path = _ensure_layer(task_vectors_dir, features_dir, params, out_dir, heldout_features_dir, shape, meta, layer)
        report.extend(json.loads(read_metadata(path)["report"]))
    table = write_report(report, report_path)
    if metrics_path is not None:
        write_json(metrics_path, report_summary(table))
    manifest = {**meta, "num_layers": shape.num_layers, "params_json": params.model_dump()}
    write_json(out_dir / MANIFEST, manifest)
    return out_dir / MANIFEST


def project_layer_file(
    task_vectors_dir: str | Path,
    features_dir: str | Path,
    params: ProjectionParams,
    out_dir: str | Path,
    layer: int,
    heldout_features_dir: str | Path | None = None,
) -> Path:
    """Write one layer's Δ⊥ file into `out_dir` unless it is current; return its path.

    The unit the Prefect flow fans out per layer; `project` then keeps the file as it is.
    """
    shape, meta = layer_meta(task_vectors_dir, features_dir, params, heldout_features_dir)
    return _ensure_layer(task_vectors_dir, features_dir, params, Path(out_dir), heldout_features_dir, shape, meta, layer)


def layer_meta(
    task_vectors_dir: str | Path, features_dir: str | Path, params: BaseModel, heldout_features_dir: str | Path | None
) -> tuple[ModelShape, dict[str, str]]:
    """Check the inputs are complete and agree; return the model shape and the layer files' metadata (input digests).

    `params` is the projection's (or another Stage 1 variant's, e.g. SAGE's): its digest marks the layer files."""
    tv, feats = read_manifest(Path(task_vectors_dir), "task vectors"), read_manifest(Path(features_dir), "features")
    if heldout_features_dir is not None:
        read_manifest(Path(heldout_features_dir), "held-out features")
    if tv["num_layers"] != feats["num_layers"]:
        raise ValueError(f"task vectors have {tv['num_layers']} layers, features {feats['num_layers']}")
    shape = ModelShape(**feats["shape"])
    meta = {
        "kind": "projection",
        "task_vectors": file_digest(Path(task_vectors_dir) / MANIFEST),
        "features": file_digest(Path(features_dir) / MANIFEST),
        "heldout": file_digest(Path(heldout_features_dir) / MANIFEST) if heldout_features_dir is not None else "",
        "params": json_digest(params.model_dump()),
    }
    return shape, meta


def _ensure_layer(
    task_vectors_dir: str | Path,
    features_dir: str | Path,
    params: ProjectionParams,
    out_dir: Path,
    heldout_features_dir: str | Path | None,
    shape: ModelShape,
    meta: dict[str, str],
    layer: int,
) -> Path:
    """Project one layer into its file unless the file was already made from the same inputs."""
    path = layer_file(out_dir, layer)
    if not is_current(path, meta):
        out_dir.mkdir(parents=True, exist_ok=True)
        heldout = load_stats(layer_file(heldout_features_dir, layer)) if heldout_features_dir is not None else None
        delta = load_tensors(layer_file(task_vectors_dir, layer))
        tensors, rows = project_layer(delta, load_stats(layer_file(features_dir, layer)), shape, layer, params, heldout)
        save_tensors(path, require_finite(tensors, f"projection {path}"), {**meta, "layer": str(layer), "report": json.dumps(rows)})
    return path


def write_report(rows: list[dict], path: str | Path) -> pd.DataFrame:
    """Validate the report rows against PROJECTION_REPORT_SCHEMA and write them as parquet (atomically)."""
    df = PROJECTION_REPORT_SCHEMA.validate(pd.DataFrame.from_records(rows))
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return df


def report_summary(table: pd.DataFrame) -> dict[str, float]:
    """Headline numbers of a projection report: means over modules (and the worst module's residuals)."""
    out = {
        "energy_protected": table["energy_protected"].mean(),
        "rank_kept": table["rank_kept"].mean(),
        "norm_ratio": table["norm_ratio"].mean(),
        "residual_calib": table["residual_calib"].mean(),
        "residual_calib_max": table["residual_calib"].max(),
        "residual_calib_inliers": table["residual_calib_inliers"].mean(),
        "residual_calib_inliers_max": table["residual_calib_inliers"].max(),
    }
    if table["residual_heldout"].notna().all():
        out |= {"residual_heldout": table["residual_heldout"].mean(), "residual_heldout_max": table["residual_heldout"].max()}
    return {k: float(v) for k, v in out.items()}
