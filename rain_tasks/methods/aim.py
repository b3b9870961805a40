"""AIM (Nobari et al., arXiv 2502.02421): relax any merged model towards an anchor where the anchor's inputs are large.

Per merged Linear module with anchor inputs X (rows = tokens of calibration blocks):
  a_j = Σ_blocks mean_t |X_tj|   (the anchor statistic: rain_tasks.data_aware.aim)
  s_j = a_j / max_j a_j,  r_j = 1 − (1 − ω)·s_j ∈ [ω, 1]
  W_out = W_A + (W_M − W_A)·diag(r)   (column j of the merged delta scaled by r_j)
The formulas are the authors' code's (the paper body was not read). Source setting: anchor θ_B on Pile text
cut into 512-token blocks (AIM-TIES = TIES wrapped); ours: anchor θ_R on the reasoning calibration set.

Inferred here (METHODS-MORE §1 g): only the seven merged Linear modules are covered (the code also relaxes norms
and lm_head); a Linear bias is an output-side term with no input channel, so it keeps the merged value; ω = 1
and channels with r_j = 1 return the merged tensor bit for bit.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from rain_tasks.methods.registry import TENSOR_INPUTS, Method


def relaxation(a: torch.Tensor, omega: float) -> torch.Tensor:
    """r = 1 − (1 − ω)·a/max(a) in float32: the factor of each input channel's column of the merged delta."""
    top = float(a.max()) if a.numel() else 0.0
    if not top > 0.0:
        raise ValueError("AIM statistic is all zero (or empty): no input channel was active on the calibration blocks")
    return (1.0 - (1.0 - omega) * (a.to(torch.float64) / top)).to(torch.float32)


def relax(merged: torch.Tensor, anchor: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W_A + (W_M − W_A)·diag(r) on a weight [out, in] (r over columns); the merged value itself where r = 1."""
    if merged.shape != anchor.shape or merged.shape[-1] != r.shape[0]:
        raise ValueError(f"AIM: merged {tuple(merged.shape)}, anchor {tuple(anchor.shape)} and r {tuple(r.shape)} do not agree")
    return torch.where(r == 1.0, merged, anchor + (merged - anchor) * r)


def aim_wrap(inner: Method, relaxations: dict[str, torch.Tensor], anchor: Literal["base", "lrm"]) -> Method:
    """The merge method `inner` relaxed towards θ_B (anchor base) or θ_R (anchor lrm) on the covered weights.

    The wrapper takes `inner`'s params and reads its tensors plus the tensor name and the anchor (θ_B: the engine
    loads the base checkpoint for it); weights without an r are `inner`'s as they are."""
    inputs = tuple(k for k in TENSOR_INPUTS if k in inner.inputs or k in ("name", anchor))

    def method(**kw: Any) -> torch.Tensor:
        """AIM: the inner method's merged tensor, its covered weights relaxed column by column towards the anchor."""
        merged = inner.fn(**{k: kw[k] for k in inner.inputs}, **{k: kw[k] for k in inner.params.model_fields})
        r = relaxations.get(kw["name"])
        return merged if r is None else relax(merged, kw[anchor], r)

    return Method(f"aim_{inner.name}", method, inputs, inner.params, inner.baseline)
