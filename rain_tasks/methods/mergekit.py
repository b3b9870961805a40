"""TIES, DARE and SLERP as mergekit defines them with base_model = θ_B (the tensor math is in rain_tasks.methods.ops).

TIES and DARE merge the two task vectors Δ_R = θ_R − θ_B and Δ_I = θ_I − θ_B and add the result to θ_B;
SLERP interpolates θ_R ↔ θ_I = θ_B + Δ_I.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from rain_tasks.methods import ops
from rain_tasks.methods.registry import merge_method

Weights = tuple[float, float]  # (w_R, w_I)


def _merge_task_vectors(base: Tensor, sparsified: Tensor, weights: Weights, lam: float, consensus: bool,
                        normalize: bool) -> Tensor:
    """θ_B + λ·combine(w_R·Δ̃_R, w_I·Δ̃_I) as mergekit's generalized task arithmetic (with base_model = θ_B)."""
    w = torch.tensor(weights, dtype=sparsified.dtype)
    return base + lam * ops.combine_task_vectors(sparsified, w, consensus=consensus, normalize=normalize)


@merge_method("ties")
def ties(lrm: Tensor, delta: Tensor, base: Tensor, *, density: Annotated[float, Field(gt=0.0, le=1.0)] = 0.2,
         weights: Weights = (1.0, 1.0), lam: float = 1.0) -> Tensor:
    """θ_B + λ·TIES(Δ_R, Δ_I): trim each to its top `density` magnitudes, elect signs, disjoint weighted mean."""
    trimmed = torch.stack([ops.trim_top_magnitude(d, density) for d in torch.stack([lrm - base, delta])])
    return _merge_task_vectors(base, trimmed, weights, lam, consensus=True, normalize=True)


@merge_method("dare")
def dare(name: str, lrm: Tensor, delta: Tensor, base: Tensor, *, drop: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5,
         seed: int = 0, combine: Literal["linear", "ties"] = "linear", weights: Weights = (1.0, 1.0),
         lam: float = 1.0) -> Tensor:
    """θ_B + λ·merge of DARE(Δ_R), DARE(Δ_I): drop with probability `drop` (seeded per tensor), rescale 1/(1−drop).

    combine 'linear' sums them (mergekit dare_linear); 'ties' sums only the entries agreeing
    with the elected sign (mergekit dare_ties, which does not divide by the agreeing weight).
    """
    deltas = torch.stack([lrm - base, delta])
    seeds = [ops.tensor_seed(seed, name, i) for i in range(len(deltas))]
    dropped = torch.stack([ops.dare_drop(d, drop, s) for d, s in zip(deltas, seeds)])
    return _merge_task_vectors(base, dropped, weights, lam, consensus=combine == "ties", normalize=False)


@merge_method("slerp")
def slerp(lrm: Tensor, delta: Tensor, base: Tensor, *, t: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5,
          dot_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9995) -> Tensor:
    """Per-tensor SLERP θ_R (t=0) ↔ θ_I = θ_B + Δ_I (t=1), linear where the two are nearly colinear."""
    return ops.slerp(t, lrm, base + delta, dot_threshold)
