"""LRM-centred linear merges: task arithmetic and RAIN's merge, θ = θ_R + λ·(update from Δ_I)."""

from __future__ import annotations

from torch import Tensor

from rain_tasks.methods.registry import merge_method


@merge_method("task_arithmetic")
def task_arithmetic(lrm: Tensor, delta: Tensor, *, lam: float = 1.0) -> Tensor:
    """θ_R + λ·Δ_I (unweighted: any α scales are ignored)."""
    return lrm + lam * delta


@merge_method("rain", baseline=False)
def rain(lrm: Tensor, delta: Tensor, scale: Tensor | None, *, lam: float = 1.0) -> Tensor:
    """θ_R + λ·α⊙Δ⊥ (α broadcasts against the tensor: rows for q/k/v, columns for o, scalar for MLP)."""
    scaled = delta if scale is None else scale * delta
    return lrm + lam * scaled
