"""LRM-centred linear merges: task arithmetic and RAIN's merge, θ = θ_R + λ·(update from Δ_I).

Each product is rounded as written and θ_R added last, into the update's own buffer: the same bits as
`lrm + lam * delta` with one fp32 temporary fewer (the merge's peak is a few tensors of the largest size).
"""

from __future__ import annotations

from torch import Tensor

from rain_tasks.methods.registry import merge_method


@merge_method("task_arithmetic", elementwise=True)
def task_arithmetic(lrm: Tensor, delta: Tensor, *, lam: float = 1.0) -> Tensor:
    """θ_R + λ·Δ_I (unweighted: any α scales are ignored)."""
    return (delta * lam).add_(lrm)


@merge_method("rain", baseline=False, elementwise=True)
def rain(lrm: Tensor, delta: Tensor, scale: Tensor | None, *, lam: float = 1.0) -> Tensor:
    """θ_R + λ·α⊙Δ⊥ (α broadcasts against the tensor: rows for q/k/v, columns for o, scalar for MLP)."""
    update = delta * lam if scale is None else (scale * delta).mul_(lam)
    return update.add_(lrm)
