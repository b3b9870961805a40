"""Principal angles between task-vector subspaces: known geometry, chance level, and the tiny family streamed."""

from __future__ import annotations

import math

import pandas as pd
import pandera.pandas as pa
import pytest
import torch

from rain_tasks.io.arch import MODULES, read_shape
from rain_tasks.stage1.orthogonality import (module_geometry, module_rows, orthogonality_table, principal_cosines,
                                             random_max_cosine, top_singular_subspaces)
from rain_tasks.params import ModelsParams, OrthogonalityParams, Params
from rain_tasks.io.schemas import ORTHOGONALITY_SCHEMA
from rain_tasks.pipeline.stages import ORTHO_CSV, ORTHO_PNG
from rain_tasks.pipeline.runner import run_stage

P = OrthogonalityParams(rank=4, oversample=4, power_iters=2, seed=0)
NAME = "model.layers.3.mlp.up_proj.weight"


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed))).Q


def _low_rank(u: torch.Tensor, v: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """u diag(scales) vᵀ: a matrix whose top singular subspaces are span(u) and span(v)."""
    return u @ torch.diag(torch.tensor(scales)) @ v.T


def test_top_subspaces_match_the_exact_svd_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(120, 80, generator=g) @ torch.diag(0.7 ** torch.arange(80.0)) @ torch.linalg.qr(torch.randn(80, 80, generator=g)).Q
    u, v, s = top_singular_subspaces(a, 4, 4, 2, seed=0)
    exact_u, exact_s, exact_vh = torch.linalg.svd(a, full_matrices=False)
    assert u.shape == (120, 4) and v.shape == (80, 4)
    assert torch.allclose(principal_cosines(u, exact_u[:, :4]), torch.ones(4), atol=1e-4)
    assert torch.allclose(principal_cosines(v, exact_vh[:4].T), torch.ones(4), atol=1e-4)
    assert torch.allclose(s[:4], exact_s[:4], rtol=1e-4)


def test_identical_subspaces_give_cosines_one_and_orthogonal_give_zero():
    q = _orthonormal(64, 8, seed=0)  # two mutually orthogonal 4-dim subspaces of the output space
    v1, v2 = _orthonormal(48, 4, seed=1), _orthonormal(48, 4, seed=2)
    delta_r = _low_rank(q[:, :4], v1, [4.0, 3.0, 2.0, 1.0])
    same_left = _low_rank(q[:, :4], v2, [1.0, 5.0, 0.5, 2.0])  # same column space, other singular values and rows
    orthogonal_left = _low_rank(q[:, 4:], v1, [4.0, 3.0, 2.0, 1.0])  # orthogonal column space, same row space
    left, right = module_rows(NAME, delta_r, same_left, P)
    assert (left["side"], left["dim"], left["rank"]) == ("left", 64, 4) and (right["side"], right["dim"]) == ("right", 48)
    assert left["cos_max"] == pytest.approx(1.0, abs=1e-5) and left["cos_mean"] == pytest.approx(1.0, abs=1e-5)
    assert left["energy_r"] == pytest.approx(1.0, abs=1e-5)  # rank-4 matrices: the top 4 hold all the energy
    left, right = module_rows(NAME, delta_r, orthogonal_left, P)
    assert left["cos_max"] == pytest.approx(0.0, abs=1e-5)
    assert right["cos_mean"] == pytest.approx(1.0, abs=1e-5)


def test_random_pair_is_near_chance_sqrt_r_over_d():
    d, r = 256, 8
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g)
    for row in module_rows(NAME, a, b, OrthogonalityParams(rank=r)):
        assert row["random_rms"] == pytest.approx(math.sqrt(r / d))
        assert 0.6 < row["cos_rms"] / row["random_rms"] < 1.4, row  # sd of the ratio is about 0.09 at r = 8
        assert row["cos_max"] < 0.6


def test_random_max_cosine_is_the_chance_level_of_the_largest_cosine():
    """Above the rms chance √(r/d) and growing with r; exactly 1 once 2r > d (two such subspaces must intersect)."""
    small, large = random_max_cosine(128, 4, draws=50), random_max_cosine(128, 16, draws=50)
    assert math.sqrt(4 / 128) < small < large < 1.0
    assert random_max_cosine(10, 6, draws=5) == pytest.approx(1.0, abs=1e-9)


def test_module_geometry_summarises_each_module_against_chance(tiny_family):
    table = orthogonality_table(tiny_family["base"], tiny_family["itm"], tiny_family["lrm"], P)
    rows = module_geometry(table)
    assert [r["module"] for r in rows] == list(MODULES)
    for r in rows:
        cos = table.loc[table["module"] == r["module"], "cos_max"]
        assert r["cos_max"] == pytest.approx(cos.max()) and r["cos_median"] == pytest.approx(cos.median())
        assert 0.0 < r["random_max"] < 1.0


def test_rank_is_capped_at_the_smaller_dimension():
    g = torch.Generator().manual_seed(4)
    left, right = module_rows(NAME, torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g), OrthogonalityParams(rank=8))
    assert left["rank"] == right["rank"] == 3
    assert right["cos_max"] == pytest.approx(1.0, abs=1e-5)  # both span all of R^3


def test_tiny_family_table_is_validated_and_near_chance(tiny_family):
    table = orthogonality_table(tiny_family["base"], tiny_family["itm"], tiny_family["lrm"], P)
    layers = read_shape(tiny_family["base"]).num_layers
    assert len(table) == layers * len(MODULES) * 2
    assert list(table["module"][:14:2]) == list(MODULES)
    ORTHOGONALITY_SCHEMA.validate(table)
    # the tiny family's Δ_R and Δ_I are independent noise: their subspaces are at chance level, no closer
    ratio = table["cos_rms"] / table["random_rms"]
    assert ratio.between(0.4, 1.6).all() and table["cos_max"].lt(0.99).all()


def test_identical_task_vectors_give_cosines_one_on_the_tiny_family(tiny_family):
    table = orthogonality_table(tiny_family["base"], tiny_family["lrm"], tiny_family["lrm"], P)
    assert table["cos_mean"].min() > 1 - 1e-4


def test_stage_writes_the_csv_and_the_schema_refuses_bad_cosines(tiny_family, tmp_path):
    models = ModelsParams(**{k: str(tiny_family[k]) for k in ("base", "itm", "lrm")})
    run_stage("orthogonality", Params(models=models, orthogonality=P), tmp_path)
    table = pd.read_csv(tmp_path / ORTHO_CSV)
    ORTHOGONALITY_SCHEMA.validate(table)
    assert (tmp_path / ORTHO_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = table.copy()
    bad.loc[0, "cos_max"] = 1.5
    with pytest.raises(pa.errors.SchemaError):
        ORTHOGONALITY_SCHEMA.validate(bad)
