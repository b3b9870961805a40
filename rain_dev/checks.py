"""Measurements and reference solutions that only the tests and the benchmarks use: the library's results are
checked against them, and the pipeline never calls them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from rain_tasks.evaluate.evaluation import at_omega, encode_traces, invariance
from rain_tasks.model.generation import load_model
from rain_tasks.params import AlphaParams, RuntimeParams
from rain_tasks.stage1.projection import Basis, project_block_with_coefficients


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


def project_block(m: torch.Tensor, basis: Basis) -> torch.Tensor:
    """M − (M U) diag(w) Uᵀ: remove the protected directions from the rows of M."""
    return project_block_with_coefficients(m, basis)[0]


def think_invariance(lrm_dir: str | Path, model_dirs: dict[str, Path], traces: list[dict], radius: int,
                     runtime: RuntimeParams | None = None) -> dict[str, dict]:
    """Per model, teacher forced on the traces: L_think = mean KL(p_LRM ‖ p_model) at Ω, h_drift = mean over layers
    of ‖h_model − h_LRM‖ / ‖h_LRM‖ at Ω (both 0 for the LRM itself), kl_close and early_close_mass."""
    encoded, close_id = encode_traces(lrm_dir, traces, radius)
    reference = at_omega(load_model(lrm_dir, runtime)[0], encoded, close_id)
    return {name: invariance(reference, load_model(path, runtime)[0], encoded, close_id) for name, path in model_dirs.items()}


def family_properties(lrm: dict, itm: dict, sweep: list[dict]) -> dict[str, bool]:
    """The four properties the default family must have, from behaviour metrics (sweep[0] is λ = 0, the LRM):
    lrm: closes `</think>` ≥ 95 %, correct ≥ 90 %, complies ≤ 20 %; itm: complies ≥ 90 %, never opens `<think>`;
    transfer: task arithmetic raises compliance ≥ 20 points at some λ; breaks: a larger λ closes < 80 %."""
    gains = [i for i, r in enumerate(sweep) if r["comply_rate"] - sweep[0]["comply_rate"] >= 0.20]
    return {
        "lrm": lrm["close_rate"] >= 0.95 and lrm["correct_rate"] >= 0.90 and lrm["comply_rate"] <= 0.20,
        "itm": itm["comply_rate"] >= 0.90 and itm["think_rate"] == 0.0,
        "transfer": bool(gains),
        "breaks": bool(gains) and any(r["close_rate"] < 0.80 for r in sweep[gains[0] + 1:]),
    }
