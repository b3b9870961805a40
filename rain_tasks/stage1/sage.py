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

The computation is Stage 1's own (stage1/projection.py: one layer loop, `method: sage` selecting this basis rule);
this module names it for the SAGE neighbour model. Output layout = projection's (per-layer Δ' keyed by checkpoint
names, report rows in the metadata, manifest last, a report table beside it), so Stage 2 and the merge read it where
they read Δ⊥.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rain_tasks.io.arch import ModelShape
from rain_tasks.params import SageParams
from rain_tasks.stage1.projection import Basis, RowStats, project, project_layer, protected_basis


def sage_basis(stats: RowStats, params: SageParams) -> Basis:
    """U_r with the damping weights w_i = βσ̃_i/(1 + βσ̃_i), so Δ' = Δ − (ΔU_r) diag(w) U_rᵀ (projection's
    `method: sage` basis, the same code)."""
    return protected_basis(stats, params.retained())


def sanitize_layer(
    delta: dict[str, torch.Tensor], stats: dict[str, RowStats], shape: ModelShape, layer: int, params: SageParams
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Δ' of one layer's seven modules (fp32, by checkpoint name) and one projection report row per block
    (`residual_calib`: the bias left on the calibration rows, `energy_protected`: the share of energy damped)."""
    return project_layer(delta, stats, shape, layer, params.retained())


def sanitize(task_vectors_dir: str | Path, features_dir: str | Path, params: SageParams, out_dir: str | Path) -> Path:
    """Write Δ' per layer into `out_dir` and its report to `<out_dir>.parquet` (projection's layout and writer, layers
    made from the same inputs skipped); return the manifest."""
    out_dir = Path(out_dir)
    return project(task_vectors_dir, features_dir, params.retained(), out_dir, out_dir.with_suffix(".parquet"))
