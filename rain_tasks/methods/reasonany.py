"""ReasonAny's merge rules (Yang et al., arXiv 2601.05560) on one tensor, given its disjoint masks M_X', M_R'.

Native: θ = θ_B + λ_X M_X' ⊙ Δ_X + λ_R M_R' ⊙ Δ_R (unselected weights stay θ_B); ours (ITM's skill into the LRM):
θ = θ_R + λ_X M_X' ⊙ Δ_I, where M_R only excludes (weights in M_R stay θ_R exactly). The gradient scores, the
masks and the merge-engine method reading them are in rain_tasks.data_aware.reasonany.
"""

from __future__ import annotations

import torch


def merge_native(base: torch.Tensor, delta_x: torch.Tensor, delta_r: torch.Tensor, mask_x: torch.Tensor, mask_r: torch.Tensor,
                 lam_x: float, lam_r: float) -> torch.Tensor:
    """θ_B + λ_X M_X' ⊙ Δ_X + λ_R M_R' ⊙ Δ_R (disjoint masks); θ_B exactly where neither mask holds."""
    if bool((mask_x & mask_r).any()):
        raise ValueError("ReasonAny masks overlap: M_X' and M_R' must be disjoint (compute them with tensor_masks)")
    return torch.where(mask_x, base + lam_x * delta_x, torch.where(mask_r, base + lam_r * delta_r, base))


def merge_into_lrm(lrm: torch.Tensor, delta_i: torch.Tensor, mask_i: torch.Tensor, lam: float) -> torch.Tensor:
    """θ_R + λ M_I' ⊙ Δ_I; θ_R exactly outside M_I' (so on all of M_R)."""
    return torch.where(mask_i, lrm + lam * delta_i, lrm)
