"""Stage 2 α: closed form vs a numerical solver, the box, variants, GQA mapping to module scales."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest
import torch
from tiny import make_family

from rain_tasks.alpha import closed_form_alpha, objective_terms, solve_alpha, solve_box_qp, summary_markdown
from rain_tasks.arch import MODULES, read_shape
from rain_tasks.checkpoint import Checkpoint, load_tensors
from rain_tasks.params import AlphaParams
from rain_tasks.schemas import STATS_SCHEMA, alpha_schema


def _objective(alpha, curvature, g, params: AlphaParams, prior: float) -> float:
    """The maximised objective gᵀα − ½αᵀHα − ½ℓ₂‖α−p‖² − ℓ₁‖α−p‖₁."""
    d = alpha - prior
    return g @ alpha - 0.5 * alpha @ curvature @ alpha - 0.5 * params.l2 * d @ d - params.l1 * np.abs(d).sum()


@pytest.mark.parametrize("l1", [0.0, 0.4])
@pytest.mark.parametrize("prior", [1.0, 2.0])
def test_closed_form_matches_numerical_solver_on_diagonal(l1, prior):
    rng = np.random.default_rng(0)
    g = rng.normal(0, 3, 40)
    h = rng.uniform(0, 4, 40)
    params = AlphaParams(l1=l1, l2=0.3)
    closed = closed_form_alpha(g, h, params, prior)
    numeric = solve_box_qp(np.diag(h), g, params, prior)
    np.testing.assert_allclose(closed, numeric, atol=1e-6)
    assert (closed == params.box_lo).any() and (closed == params.box_hi).any() and ((closed > 0) & (closed < 1.5)).any()


def test_l2_only_closed_form_is_the_stated_formula():
    g, h = np.array([0.2, -5.0, 9.0]), np.array([1.0, 2.0, 0.5])
    params = AlphaParams()
    np.testing.assert_allclose(closed_form_alpha(g, h, params, 1.0), np.clip((g + 0.1) / (h + 0.1), 0.0, 1.5))


def test_box_qp_with_nondiagonal_curvature_is_optimal():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(6, 6))
    curvature, g = m @ m.T, rng.normal(0, 4, 6)
    params = AlphaParams(l1=0.2)
    best = solve_box_qp(curvature, g, params, 1.0)
    assert ((best >= 0) & (best <= 1.5)).all()
    rivals = rng.uniform(0, 1.5, size=(2000, 6))
    top = _objective(best, curvature, g, params, 1.0)
    assert all(_objective(r, curvature, g, params, 1.0) <= top + 1e-9 for r in rivals)
    for i in range(6):  # no coordinate move inside the box improves it
        for step in (-1e-4, 1e-4):
            moved = best.copy()
            moved[i] = np.clip(moved[i] + step, 0, 1.5)
            assert _objective(moved, curvature, g, params, 1.0) <= top + 1e-12


def _stats(layers: int, heads: int, n: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    size = layers * heads
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(layers), heads).astype(np.int64),
            "head": np.tile(np.arange(heads), layers).astype(np.int64),
            **{c: rng.uniform(0, n, size) for c in ("a0", "a1", "u0", "u1")},
            "n_samples": np.full(size, n, dtype=np.int64),
        }
    )


def test_variants_use_the_documented_terms():
    s = pd.DataFrame({"layer": [0], "head": [0], "a0": [2.0], "a1": [5.0], "u0": [1.0], "u1": [3.0], "n_samples": [4]})
    p = dict(rho=0.5, lambda_h=2.0, mu=0.25)
    expect = {"two_pass": (3.0 - 0.5 * 2.0, 8 + 0.75), "anchor_only": (2.0 - 0.5, 8 + 0.25), "post_only": (5.0 - 1.5, 8 + 0.75)}
    for variant, (g, h) in expect.items():
        got = objective_terms(s, AlphaParams(variant=variant, **p))
        np.testing.assert_allclose([got[0][0], got[1][0]], [g, h])


@pytest.fixture(scope="module", params=[(4, 2), (6, 2)], ids=["4q2kv", "6q2kv"])
def family(request, tmp_path_factory) -> Path:
    heads, kv = request.param
    return make_family(tmp_path_factory.mktemp(f"fam{heads}"), heads=heads, kv_heads=kv, hidden=8 * heads)["lrm"]


def test_solve_alpha_tables_and_gqa_scales(family, tmp_path):
    shape = read_shape(family)
    stats = STATS_SCHEMA.validate(_stats(shape.num_layers, shape.num_heads))
    stats.to_parquet(tmp_path / "stats.parquet", index=False)
    params = AlphaParams(lambda_h=0.05, mu=0.05)  # weak curvature: α spreads across the box
    out = solve_alpha(tmp_path / "stats.parquet", family, params, 1.0, tmp_path / "alpha.parquet", tmp_path / "scales.safetensors", tmp_path / "plot.csv")
    table = pd.read_parquet(out)
    assert list(table.columns) == ["layer", "head", "kv_group", "a0", "a1", "u0", "u1", "g", "H", "alpha_solved", "alpha"]
    assert (table["kv_group"] == table["head"] // shape.n_rep).all()
    alpha = table["alpha"].to_numpy().reshape(shape.num_layers, shape.num_heads)
    assert alpha.std() > 0.05 and ((alpha >= 0) & (alpha <= 1.5)).all()
    plot = pd.read_csv(tmp_path / "plot.csv")
    assert list(plot.columns) == ["layer", "head", "unit", "alpha"] and len(plot) == alpha.size

    scales, ckpt, hd = load_tensors(tmp_path / "scales.safetensors"), Checkpoint(family), shape.head_dim
    merged = {n for n in ckpt.names() if any(f".{m}." in n for m in MODULES)}
    assert set(scales) == merged
    for name, s in scales.items():
        assert s.dtype == torch.float32
        assert torch.broadcast_shapes(s.shape, ckpt.shape(name)) == torch.Size(ckpt.shape(name))
    for l in range(shape.num_layers):
        a = torch.tensor(alpha[l], dtype=torch.float32)
        group = torch.stack([a[g * shape.n_rep : (g + 1) * shape.n_rep].mean() for g in range(shape.num_kv_heads)])
        p = f"model.layers.{l}."
        assert scales[p + "self_attn.q_proj.weight"].shape == (shape.num_heads * hd, 1)
        torch.testing.assert_close(scales[p + "self_attn.q_proj.weight"][::hd, 0], a)
        torch.testing.assert_close(scales[p + "self_attn.q_proj.bias"], a.repeat_interleave(hd))
        torch.testing.assert_close(scales[p + "self_attn.o_proj.weight"], a.repeat_interleave(hd)[None])
        for m in ("k_proj", "v_proj"):  # mean of the group's query heads, once per KV row
            assert scales[p + f"self_attn.{m}.weight"].shape == (shape.num_kv_heads * hd, 1)
            torch.testing.assert_close(scales[p + f"self_attn.{m}.weight"][:, 0], group.repeat_interleave(hd))
            torch.testing.assert_close(scales[p + f"self_attn.{m}.bias"], group.repeat_interleave(hd))
        for m in ("gate_proj", "up_proj", "down_proj"):
            torch.testing.assert_close(scales[p + f"mlp.{m}.weight"], a.mean().reshape(1, 1))


def test_box_is_respected_and_enforced_by_schema(tiny_family, tmp_path):
    stats = _stats(2, 4)
    stats.loc[0, ["a0", "a1", "u0", "u1"]] = [0.0, 10.0, 0.0, 0.0]  # strong gain: upper bound
    stats.loc[1, ["a0", "a1", "u0", "u1"]] = [10.0, 0.0, 0.0, 10.0]  # strong loss: lower bound
    stats.to_parquet(tmp_path / "stats.parquet", index=False)
    params = AlphaParams(lambda_h=0.0, mu=0.0, box_lo=0.2, box_hi=1.2)
    out = solve_alpha(tmp_path / "stats.parquet", tiny_family["lrm"], params, 1.0, tmp_path / "a.parquet", tmp_path / "s.safetensors")
    table = pd.read_parquet(out)
    assert table["alpha"].iloc[0] == 1.2 and table["alpha"].iloc[1] == 0.2
    assert table["alpha"].between(0.2, 1.2).all()
    table.loc[2, "alpha"] = 1.3
    with pytest.raises(pa.errors.SchemaError):
        alpha_schema(0.2, 1.2).validate(table)


def test_stats_for_another_model_are_refused(tiny_family, tmp_path):
    _stats(3, 4).to_parquet(tmp_path / "stats.parquet", index=False)
    with pytest.raises(ValueError, match="statistics cover"):
        solve_alpha(tmp_path / "stats.parquet", tiny_family["lrm"], AlphaParams(), 1.0, tmp_path / "a.parquet", tmp_path / "s.safetensors")


def test_stats_schema_refuses_duplicates_and_holes():
    stats = _stats(2, 4)
    with pytest.raises(pa.errors.SchemaError):
        STATS_SCHEMA.validate(pd.concat([stats, stats.iloc[:1]], ignore_index=True))
    with pytest.raises(pa.errors.SchemaError):
        STATS_SCHEMA.validate(stats.drop(index=3))


def test_relative_scale_keeps_proportions_at_mean_prior(tiny_family, tmp_path):
    """scale=relative: same ratios between heads as the solved α, mean = prior (before clipping), α_solved kept."""
    shape = read_shape(tiny_family["lrm"])
    _stats(shape.num_layers, shape.num_heads).to_parquet(tmp_path / "stats.parquet", index=False)
    tables = {}
    for scale in ("absolute", "relative"):
        params = AlphaParams(scale=scale, box_hi=100.0)
        out = solve_alpha(tmp_path / "stats.parquet", tiny_family["lrm"], params, 0.8, tmp_path / f"{scale}.parquet", tmp_path / f"{scale}.safetensors")
        tables[scale] = pd.read_parquet(out)
    solved = tables["absolute"]["alpha"].to_numpy()
    np.testing.assert_array_equal(tables["relative"]["alpha_solved"].to_numpy(), solved)
    rel = tables["relative"]["alpha"].to_numpy()
    assert rel.mean() == pytest.approx(0.8) and solved.std() > 0
    np.testing.assert_allclose(rel, solved * (0.8 / solved.mean()), rtol=1e-12)


def test_relative_scale_refuses_all_zero_alpha(tiny_family, tmp_path):
    stats = _stats(2, 4)
    stats[["a1", "u0"]] = 0.0  # every head loses instruction attention: α clipped to 0 everywhere
    stats.to_parquet(tmp_path / "stats.parquet", index=False)
    with pytest.raises(ValueError, match="every solved α is at or below 0"):
        solve_alpha(tmp_path / "stats.parquet", tiny_family["lrm"], AlphaParams(scale="relative", l2=1e-9), 1.0,
                    tmp_path / "a.parquet", tmp_path / "s.safetensors")
    assert not (tmp_path / "a.parquet").exists()


def test_heatmap_png_and_report_section(tiny_family, tmp_path):
    """The α heatmap is a real PNG, byte-identical on a rerun; the report section names every layer and embeds it."""
    shape = read_shape(tiny_family["lrm"])
    _stats(shape.num_layers, shape.num_heads).to_parquet(tmp_path / "stats.parquet", index=False)
    params = AlphaParams()
    pngs = []
    for run in range(2):
        out = solve_alpha(tmp_path / "stats.parquet", tiny_family["lrm"], params, 1.0, tmp_path / "a.parquet",
                          tmp_path / "s.safetensors", tmp_path / "plot.csv", tmp_path / f"heat{run}.png")
        pngs.append((tmp_path / f"heat{run}.png").read_bytes())
    assert pngs[0][:8] == b"\x89PNG\r\n\x1a\n" and pngs[0] == pngs[1]
    text = summary_markdown(pd.read_parquet(out), params, "heat0.png")
    assert "![α heatmap](heat0.png)" in text
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()] == [
        str(l) for l in range(shape.num_layers)
    ]
