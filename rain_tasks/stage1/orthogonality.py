"""Task-vector orthogonality: principal angles between the top-r singular subspaces of Δ_R and Δ_I.

The paper's key finding is that the LRM's and the ITM's task vectors (Δ_R = θ_R − θ_B,
Δ_I = θ_I − θ_B) occupy nearly orthogonal principal subspaces in every module, which is why
adding Δ_I barely disturbs what Δ_R learned. For each of the seven Linear weights per layer
this module takes the top-r left (output space) and right (input space) singular vectors of
both task vectors and reports the cosines of the principal angles between the two subspaces
(the singular values of U_Rᵀ U_I). For two random r-dimensional subspaces of R^d the mean
squared cosine is r/d, so `random_rms` = √(r/d) is the chance level to compare against; the largest
cosine has no closed form, so `random_max_cosine` draws it (the chance level of `module_geometry`).

Checkpoints are read one tensor at a time; top-r subspaces come from a seeded randomized
SVD (Halko, Martinsson & Tropp 2011) so the stage stays cheap on 7B-scale modules.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from rain_tasks.io.arch import MODULES, layer_of, module_of
from rain_tasks.methods.ops import tensor_seed
from rain_tasks.io.checkpoint import check_compatible, Checkpoint
from rain_tasks.io.artifacts import atomic_path
from rain_tasks.params import OrthogonalityParams
from rain_tasks.io.plots import heatmap
from rain_tasks.io.schemas import ORTHOGONALITY_SCHEMA

log = logging.getLogger(__name__)


def top_singular_subspaces(
    a: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal top-`rank` left [m, r] and right [n, r] singular vectors of `a` [m, n], and all its approximate singular values.

    Randomized range finder with `power_iters` subspace iterations on `rank + oversample`
    Gaussian probes (exact when that covers min(m, n)); `rank` is capped at min(m, n).
    """
    m, n = a.shape
    width = min(rank + oversample, m, n)
    probes = torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=a.dtype)
    basis = torch.linalg.qr(a @ probes).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    r = min(rank, m, n)
    return (basis @ u_small)[:, :r], vh[:r].T, s


def principal_cosines(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(u) and span(v) (orthonormal columns), descending, in [0, 1]."""
    return torch.linalg.svdvals(u.T @ v).clamp(0.0, 1.0)


def _energy(s: torch.Tensor, a: torch.Tensor, r: int) -> float:
    """Share of ‖a‖²_F carried by its top-r singular values."""
    total = torch.linalg.vector_norm(a, dtype=torch.float64).item() ** 2
    return float(s[:r].double().pow(2).sum()) / total if total > 0 else 0.0


def module_rows(name: str, delta_r: torch.Tensor, delta_i: torch.Tensor, p: OrthogonalityParams) -> list[dict]:
    """The table rows (left and right side) of one module's pair of task vectors."""
    seed = tensor_seed(p.seed, name)  # the same probes for Δ_R and Δ_I: identical inputs give identical subspaces
    u_r, v_r, s_r = top_singular_subspaces(delta_r, p.rank, p.oversample, p.power_iters, seed)
    u_i, v_i, s_i = top_singular_subspaces(delta_i, p.rank, p.oversample, p.power_iters, seed)
    r = u_r.shape[1]
    common = {"layer": layer_of(name), "module": module_of(name), "rank": r,
              "energy_r": _energy(s_r, delta_r, r), "energy_i": _energy(s_i, delta_i, r)}
    rows = []
    for side, a, b in (("left", u_r, u_i), ("right", v_r, v_i)):
        cos = principal_cosines(a, b).double()
        dim = a.shape[0]
        rows.append({**common, "side": side, "dim": dim, "cos_max": float(cos.max()), "cos_mean": float(cos.mean()),
                     "cos_rms": float(cos.pow(2).mean().sqrt()), "random_rms": math.sqrt(r / dim)})
    return rows


def orthogonality_table(base_dir: str | Path, itm_dir: str | Path, lrm_dir: str | Path, p: OrthogonalityParams) -> pd.DataFrame:
    """One validated row per (layer, module, side) over every 2-D Linear weight, streamed tensor by tensor."""
    base, itm, lrm = Checkpoint(base_dir), Checkpoint(itm_dir), Checkpoint(lrm_dir)
    check_compatible(base, itm)
    check_compatible(base, lrm)
    names = sorted((n for n in base.names() if module_of(n) is not None and len(base.shape(n)) == 2),
                   key=lambda n: (layer_of(n), MODULES.index(module_of(n))))
    rows = []
    for name in tqdm(names, desc="orthogonality", unit="module"):
        theta_b = base.get(name).float()
        rows += module_rows(name, lrm.get(name).float() - theta_b, itm.get(name).float() - theta_b, p)
    columns = ["layer", "module", "side", "dim", "rank", "cos_max", "cos_mean", "cos_rms", "random_rms", "energy_r", "energy_i"]
    table = pd.DataFrame(rows, columns=columns)
    return ORTHOGONALITY_SCHEMA.validate(table.astype({"layer": "int64", "dim": "int64", "rank": "int64"}))


def random_max_cosine(dim: int, rank: int, draws: int = 200, seed: int = 0) -> float:
    """Mean largest principal cosine between two random `rank`-dimensional subspaces of R^dim (seeded draws)."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        a, b = (torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))[0] for _ in range(2))
        values.append(float(principal_cosines(a, b).max()))
    return sum(values) / len(values)


def module_geometry(table: pd.DataFrame) -> list[dict]:
    """Per module (over layers and both sides) of an orthogonality table: the largest and the median largest
    principal cosine, beside the largest chance level of random subspaces of the same sizes."""
    chance = {(d, r): random_max_cosine(d, r) for d, r in set(zip(table["dim"], table["rank"]))}
    table = table.assign(random_max=[chance[(d, r)] for d, r in zip(table["dim"], table["rank"])])
    grouped = table.groupby("module", sort=False).agg(cos_max=("cos_max", "max"), cos_median=("cos_max", "median"),
                                                      random_max=("random_max", "max"))
    return [{"module": m, **{k: float(v) for k, v in row.items()}} for m, row in grouped.iterrows()]


def write_orthogonality(base_dir: str | Path, itm_dir: str | Path, lrm_dir: str | Path, p: OrthogonalityParams,
                        out_csv: str | Path, out_png: str | Path) -> pd.DataFrame:
    """Compute the table and write it atomically as CSV (`dvc plots` data) and as a heatmap PNG
    (the report's figure: largest cosine per layer and module:side, e.g. 'q:L' for q_proj's left subspace); return it."""
    table = orthogonality_table(base_dir, itm_dir, lrm_dir, p)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    cells = table.assign(module=table["module"].str.removesuffix("_proj") + ":" + table["side"].str[0].str.upper())
    heatmap(cells, "layer", "module", "cos_max", out_png,
            f"max cos of principal angles, top-{p.rank} subspaces of Δ_R vs Δ_I", vmin=0.0, vmax=1.0)
    log.info("orthogonality: %d modules, median cos_max %.3f (chance rms %.3f)", len(table) // 2,
             table["cos_max"].median(), table["random_rms"].median())
    return table
