"""The baseline merges' math on single tensors: TIES, DARE and SLERP.

Pure functions of fp32 tensors, registered as merge methods in `rain_tasks.merge.engine` so the
baselines run in the same streaming engine as RAIN. Definitions follow the papers and
mergekit 0.1.5 (where they differ, the difference is named in the docstring):

- TIES (Yadav et al. 2023): trim each task vector to its top-`density` magnitudes, elect a
  sign per entry as the sign of the weighted sum (the side with more summed magnitude),
  and average only the entries that agree with it (disjoint mean).
- DARE (Yu et al. 2024): drop each entry with probability p and rescale survivors by
  1/(1−p), so the expectation is unchanged. mergekit 0.1.5 instead rescales to keep the
  L1 norm; both are unbiased up to O(1/√n). The mask is drawn from a generator seeded by
  (seed, tensor name, task-vector index): bit-identical across runs and processing orders.
- SLERP: spherical interpolation between two whole tensors (flattened), falling back to
  linear interpolation when they are nearly colinear (|cos| > dot_threshold) or one is ~0.
"""

from __future__ import annotations

import hashlib
import math

import torch


def tensor_seed(seed: int, name: str, index: int = 0) -> int:
    """A 63-bit seed from (seed, tensor name, index): per-tensor random streams independent of processing order."""
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def trim_top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, ⌊density·n⌋) largest-magnitude entries of `delta`, zero the rest (ties by index)."""
    if density >= 1.0:
        return delta
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def dare_drop(delta: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Drop each entry with probability `p` (mask from a generator seeded with `seed`), rescale the rest by 1/(1−p)."""
    if p == 0.0:
        return delta
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=gen) >= p
    return torch.where(keep, delta / (1.0 - p), torch.zeros_like(delta))


def elect_sign_mask(deltas: torch.Tensor) -> torch.Tensor:
    """For stacked task vectors [n, ...]: True where an entry is nonzero and shares the sign of the sum over n (0 counts as +)."""
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    return deltas.sign() == majority


def combine_task_vectors(deltas: torch.Tensor, weights: torch.Tensor, *, consensus: bool, normalize: bool) -> torch.Tensor:
    """Merge stacked task vectors [n, ...] with per-vector `weights` [n].

    consensus: keep only entries agreeing with the elected sign (TIES); normalize: divide each
    entry by the summed weight of the entries kept there (the disjoint mean; 1 where none kept).
    """
    w = weights.reshape(-1, *([1] * (deltas.dim() - 1))).to(deltas.dtype)
    weighted = deltas * w
    mask = elect_sign_mask(weighted) if consensus else torch.ones_like(weighted, dtype=torch.bool)
    merged = torch.where(mask, weighted, 0.0).sum(dim=0)
    if not normalize:
        return merged
    divisor = torch.where(mask, w.expand_as(weighted), 0.0).sum(dim=0)
    return merged / torch.where(divisor == 0, 1.0, divisor)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1) treating each whole tensor as one vector.

    sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1 with cos Ω = ⟨v0, v1⟩/(‖v0‖‖v1‖) (reductions in fp64);
    linear (1−t)·v0 + t·v1 when |cos Ω| > dot_threshold or a norm is below eps, where the
    spherical formula is ill-conditioned.
    """
    na = torch.linalg.vector_norm(v0, dtype=torch.float64).item()
    nb = torch.linalg.vector_norm(v1, dtype=torch.float64).item()
    dot = 1.0 if min(na, nb) < eps else (v0 * v1).sum(dtype=torch.float64).item() / (na * nb)
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > dot_threshold:
        c0, c1 = 1.0 - t, t
    else:
        omega = math.acos(dot)
        c0, c1 = math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return c0 * v0 + c1 * v1
