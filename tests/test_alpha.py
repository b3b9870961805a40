"""Stage 2 α: closed form vs a numerical solver, the box, variants, GQA mapping to module scales."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest
import torch
from rain_dev.tiny import make_family

from rain_tasks.stage2.alpha import closed_form_alpha, reduce_terms, sample_grid, sample_terms, solve_alpha, solve_heads, summary_markdown
from rain_dev.checks import solve_box_qp
from rain_tasks.io.arch import MODULES, read_shape
from rain_tasks.io.checkpoint import Checkpoint, load_tensors
from rain_tasks.params import AlphaParams, Params
from rain_tasks.io.schemas import STATS_SCHEMA, alpha_schema


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


def _stats(layers: int, heads: int, n: int = 10, seed: int = 0, curvature: bool = True) -> pd.DataFrame:
    """A per-sample statistics table (STATS_SCHEMA) of random attention masses."""
    rng = np.random.default_rng(seed)
    sample, layer, head = (a.ravel().astype(np.int64) for a in np.indices((n, layers, heads)))
    cols = {c: rng.uniform(0, 1, sample.size) for c in ("a0", "a1", "a2", "u0", "u1", "u2")}
    if not curvature:
        cols["a2"] = cols["u2"] = np.full(sample.size, np.nan)
    return pd.DataFrame({"sample": sample, "layer": layer, "head": head, **cols})


def _one_head(rows: list[tuple[float, ...]]) -> pd.DataFrame:
    """Per-sample table of a single (layer 0, head 0) from (a0, a1, a2, u0, u1, u2) per sample."""
    table = pd.DataFrame(rows, columns=["a0", "a1", "a2", "u0", "u1", "u2"])
    return table.assign(sample=np.arange(len(rows), dtype=np.int64), layer=np.int64(0), head=np.int64(0))


def _terms(stats: pd.DataFrame, params: AlphaParams, prior: float = 1.0):
    return reduce_terms(*sample_terms(sample_grid(stats), params, prior), params)


def test_variants_use_the_documented_terms():
    """Hand-derived values: two samples of one head."""
    s = _one_head([(0.2, 0.5, 0.6, 0.1, 0.3, 0.3), (0.4, 0.5, 0.5, 0.1, 0.1, 0.2)])
    p = dict(rho=0.5, lambda_h=2.0, mu=0.25)
    # two_pass: g = Σ(Δa − ½Δu) = (0.3 − 0.1) + (0.1 − 0) = 0.3;  H = 2·2 + ¼·(0.3 + 0.1) = 4.1
    # anchor_only: g = Σ(a0 − ½u0) = 0.15 + 0.35 = 0.5;  H = 4 + ¼·0.2 = 4.05;  post_only: g = 0.35 + 0.45, H = 4.1
    expect = {"two_pass": (0.3, 4.1), "anchor_only": (0.5, 4.05), "post_only": (0.8, 4.1)}
    for variant, want in expect.items():
        g, h, _, _ = _terms(s, AlphaParams(variant=variant, **p))
        np.testing.assert_allclose([g[0], h[0]], want, rtol=1e-12)
    # curvature, p = 1: J = a − ½u per pass: sample 1 (0.15, 0.35, 0.45), sample 2 (0.35, 0.45, 0.4)
    # g_x = (−3J0 + 4J1 − J2)/2 = 0.25, 0.175;  H_x = −(J2 − 2J1 + J0) + ¼·u1 = 0.1 + 0.075, 0.15 + 0.025 -> means
    g, h, g_se, _ = _terms(s, AlphaParams(variant="curvature", **p))
    np.testing.assert_allclose([g[0], h[0]], [0.2125, 0.175], rtol=1e-12)
    np.testing.assert_allclose(g_se[0], np.std([0.25, 0.175], ddof=1) / np.sqrt(2), rtol=1e-12)
    # the same statistics measured at half the step (p = 0.5): slope and curvature per unit step double / quadruple
    g_half, h_half, _, _ = _terms(s, AlphaParams(variant="curvature", **p), prior=0.5)
    np.testing.assert_allclose([g_half[0], h_half[0] - 0.25 * 0.2], [2 * 0.2125, 4 * (0.175 - 0.25 * 0.2)], rtol=1e-12)


def test_curvature_alpha_is_the_step_that_maximises_a_quadratic_objective():
    """Statistics generated from J(t) = c + g·t − ½h·t² give back g and h exactly, and α = (g + ℓ₂p)/(h + ℓ₂)."""
    g_true, h_true, p = 0.3, 0.4, 1.0
    j = [0.2 + g_true * t - 0.5 * h_true * t**2 for t in (0.0, p, 2 * p)]
    s = _one_head([(j[0], j[1], j[2], 0.0, 0.0, 0.0)] * 3)
    params = AlphaParams(variant="curvature", mu=0.0, min_t=0.0)
    g, h, _, _ = _terms(s, params, p)
    np.testing.assert_allclose([g[0], h[0]], [g_true, h_true], atol=1e-12)
    alpha, _ = solve_heads(g, h, np.zeros(1), params, p)
    assert alpha[0] == pytest.approx((0.3 + 0.1) / (0.4 + 0.1))


def test_noise_heads_keep_the_prior_and_convex_objectives_take_a_bound():
    g, h, se = np.array([0.5, 0.05, 0.5, 0.5]), np.array([0.2, 0.2, -0.5, -0.5]), np.array([0.1, 0.1, 0.1, 0.1])
    params = AlphaParams(min_t=2.0, l2=0.1)
    alpha, significant = solve_heads(g, h, se, params, 1.0)
    assert significant.tolist() == [True, False, True, True]
    assert alpha[1] == 1.0  # |g| < 2 SE: no measurable gain, the prior
    assert alpha[0] == pytest.approx(min((0.5 + 0.1) / 0.3, 1.5))
    # H + ℓ₂ < 0: gα − ½Hα² − ½ℓ₂(α − 1)² is convex; at 0: −0.05, at 1.5: 0.75 + 0.5625 − 0.0125 -> 1.5
    assert alpha[2] == 1.5
    alpha_neg, _ = solve_heads(-g, h, se, params, 1.0)  # with the gain reversed: at 0: −0.05, at 1.5: −0.75 + … -> 0
    assert alpha_neg[2] == 0.0


@pytest.fixture(scope="module", params=[(4, 2), (6, 2)], ids=["4q2kv", "6q2kv"])
def family(request, tmp_path_factory) -> Path:
    heads, kv = request.param
    return make_family(tmp_path_factory.mktemp(f"fam{heads}"), heads=heads, kv_heads=kv, hidden=8 * heads)["lrm"]


def test_solve_alpha_tables_and_gqa_scales(family, tmp_path):
    shape = read_shape(family)
    stats = STATS_SCHEMA.validate(_stats(shape.num_layers, shape.num_heads))
    stats.to_parquet(tmp_path / "stats.parquet", index=False)
    params = AlphaParams(min_t=0.0)  # random statistics: α spreads across the box
    out = solve_alpha(tmp_path / "stats.parquet", family, params, 1.0, tmp_path / "alpha.parquet", tmp_path / "scales.safetensors", tmp_path / "plot.csv")
    table = pd.read_parquet(out)
    assert list(table.columns) == ["layer", "head", "kv_group", "a0", "a1", "a2", "u0", "u1", "u2", "g", "g_se", "H",
                                   "significant", "alpha_solved", "alpha"]
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
    groups = {4: [[0, 1], [2, 3]], 6: [[0, 1, 2], [3, 4, 5]]}[shape.num_heads]  # query heads per KV head, by hand
    for l in range(shape.num_layers):
        a = torch.tensor(alpha[l], dtype=torch.float32)
        group = torch.stack([a[heads].mean() for heads in groups])
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
    stats = _stats(2, 4, curvature=False)
    first, second = (stats["layer"] == 0) & (stats["head"] == 0), (stats["layer"] == 0) & (stats["head"] == 1)
    stats.loc[first, ["a0", "a1", "u0", "u1"]] = [0.0, 1.0, 0.0, 0.0]  # strong gain: upper bound
    stats.loc[second, ["a0", "a1", "u0", "u1"]] = [1.0, 0.0, 0.0, 1.0]  # strong loss: lower bound
    stats.to_parquet(tmp_path / "stats.parquet", index=False)
    params = AlphaParams(variant="two_pass", lambda_h=0.0, mu=0.0, box_lo=0.2, box_hi=1.2)
    out = solve_alpha(tmp_path / "stats.parquet", tiny_family["lrm"], params, 1.0, tmp_path / "a.parquet", tmp_path / "s.safetensors")
    table = pd.read_parquet(out)
    assert table["alpha"].iloc[0] == 1.2 and table["alpha"].iloc[1] == 0.2
    assert table["alpha"].between(0.2, 1.2).all()
    table.loc[2, "alpha"] = 1.3
    with pytest.raises(pa.errors.SchemaError):
        alpha_schema(0.2, 1.2).validate(table)


def test_curvature_variant_refuses_statistics_without_the_third_pass(tiny_family, tmp_path):
    _stats(2, 4, curvature=False).to_parquet(tmp_path / "stats.parquet", index=False)
    with pytest.raises(ValueError, match="curvature_pass"):
        solve_alpha(tmp_path / "stats.parquet", tiny_family["lrm"], AlphaParams(), 1.0, tmp_path / "a.parquet", tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="curvature_pass"):  # and params.yaml saying so is refused when it is parsed
        Params.model_validate({"alpha": {"variant": "curvature"}, "attention": {"curvature_pass": False}})


def test_controls_keep_the_mean_and_split_half_reliability_is_reported(tiny_family, tmp_path):
    """Uniform and permuted α have the same mean as α; statistics with a real per-head signal give a high
    split-half Spearman, pure noise does not."""
    shape = read_shape(tiny_family["lrm"])
    rng = np.random.default_rng(3)
    signal = rng.uniform(-0.2, 0.2, shape.num_layers * shape.num_heads)  # each head's own slope along D
    stats = _stats(shape.num_layers, shape.num_heads, n=40, seed=1)
    per_head = np.tile(signal, 40)
    stats["a0"], stats["u0"], stats["u1"], stats["u2"] = 0.4, 0.0, 0.0, 0.0
    stats["a1"] = 0.4 + per_head + rng.normal(0, 0.02, len(stats))
    stats["a2"] = 0.4 + 2 * per_head + rng.normal(0, 0.02, len(stats))
    stats[["a1", "a2"]] = stats[["a1", "a2"]].clip(0, 1)
    stats.to_parquet(tmp_path / "stats.parquet", index=False)
    params = AlphaParams(min_t=0.0, box_lo=-5.0, box_hi=5.0)
    solve_alpha(tmp_path / "stats.parquet", tiny_family["lrm"], params, 1.0, tmp_path / "a.parquet", tmp_path / "s.safetensors",
                out_metrics=tmp_path / "alpha.json")
    metrics = json.loads((tmp_path / "alpha.json").read_text())
    assert metrics["split_half_spearman"] > 0.9 and metrics["n_samples"] == 40
    alpha = pd.read_parquet(tmp_path / "a.parquet")["alpha"].to_numpy()
    uniform, permuted = load_tensors(tmp_path / "s_uniform.safetensors"), load_tensors(tmp_path / "s_permuted.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(uniform[q], torch.tensor(alpha.mean(), dtype=torch.float32))
    every = torch.cat([permuted[f"model.layers.{l}.self_attn.q_proj.weight"][:: shape.head_dim, 0] for l in range(shape.num_layers)])
    np.testing.assert_allclose(np.sort(every.numpy()), np.sort(alpha), rtol=1e-6)  # the same values, other heads
    assert not np.allclose(every.numpy(), alpha)
    noise = _stats(shape.num_layers, shape.num_heads, n=40, seed=2)
    noise.to_parquet(tmp_path / "noise.parquet", index=False)
    solve_alpha(tmp_path / "noise.parquet", tiny_family["lrm"], params, 1.0, tmp_path / "b.parquet", tmp_path / "t.safetensors",
                out_metrics=tmp_path / "noise.json")
    assert json.loads((tmp_path / "noise.json").read_text())["split_half_spearman"] < 0.6


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
        params = AlphaParams(variant="two_pass", scale=scale, box_hi=100.0)
        out = solve_alpha(tmp_path / "stats.parquet", tiny_family["lrm"], params, 0.8, tmp_path / f"{scale}.parquet", tmp_path / f"{scale}.safetensors")
        tables[scale] = pd.read_parquet(out)
    solved = tables["absolute"]["alpha"].to_numpy()
    np.testing.assert_array_equal(tables["relative"]["alpha_solved"].to_numpy(), solved)
    rel = tables["relative"]["alpha"].to_numpy()
    assert rel.mean() == pytest.approx(0.8) and solved.std() > 0
    np.testing.assert_allclose(rel, solved * (0.8 / solved.mean()), rtol=1e-12)


def test_relative_scale_refuses_all_zero_alpha(tiny_family, tmp_path):
    stats = _stats(2, 4, curvature=False)
    stats[["a1", "u0"]] = 0.0  # every head loses instruction attention: α clipped to 0 everywhere
    stats.to_parquet(tmp_path / "stats.parquet", index=False)
    with pytest.raises(ValueError, match="every solved α is at or below 0"):
        solve_alpha(tmp_path / "stats.parquet", tiny_family["lrm"], AlphaParams(variant="two_pass", scale="relative", l2=1e-9, min_t=0.0), 1.0,
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
