"""SAGE-style sanitization Δ' = Δ(I + βC_r)⁻¹: its closed form, both limits, and the tiny family's Stage 1 features."""

from __future__ import annotations

import json

import pytest
import torch

from rain_dev.checks import project_block
from rain_tasks.io.arch import MODULES, ModelShape, read_shape
from rain_tasks.io.artifacts import layer_file
from rain_tasks.io.checkpoint import load_tensors, read_metadata
from rain_tasks.params import FeaturesParams, ProjectionParams
from rain_tasks.stage1.features import accumulate_features, row_set_dims, row_set_modules
from rain_tasks.stage1.projection import RowStats, load_stats, project_layer, protected_basis
from rain_tasks.stage1.sage import SageParams, sage_basis, sanitize, sanitize_layer

BETAS = (0.0, 0.5, 3.0, 40.0, 1e3)


def _stats(n: int, d: int, kind: str, seed: int = 0) -> RowStats:
    """Rows with a decaying spectrum, as features have, given as rows or as their Gram."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return RowStats(kind, x if kind == "rows" else x.T @ x, n)


def _c_r(stats: RowStats, params: SageParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, σ̃, C_r) built independently of sage_basis: RAIN's basis and the eigenvalues of G/n."""
    vals, vecs = stats.spectrum()
    u = protected_basis(stats, params.retained()).u
    sig = vals[: u.shape[1]] / vals[0]
    return u, sig, (u * sig) @ u.T


@pytest.mark.parametrize("kind,n", [("gram", 60), ("rows", 12)])
def test_closed_form_directions_and_stationarity(kind, n):
    stats = _stats(n, 30, kind)
    delta = torch.randn(7, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for beta in BETAS[1:]:
        params = SageParams(beta=beta, energy=0.95)
        u, sig, c_r = _c_r(stats, params)
        out = project_block(delta, sage_basis(stats, params))
        torch.testing.assert_close(out @ u, (delta @ u) / (1 + beta * sig), rtol=1e-10, atol=1e-12)
        v = torch.randn(30, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        v = v - u @ (u.T @ v)  # directions outside span(U_r) are kept
        torch.testing.assert_close(out @ v, delta @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close((out - delta) + beta * out @ c_r, torch.zeros_like(delta), rtol=0, atol=1e-10)
        torch.testing.assert_close(out, torch.linalg.solve(torch.eye(30, dtype=torch.float64) + beta * c_r, delta.T).T,
                                   rtol=1e-9, atol=1e-12)  # = Δ(I + βC_r)⁻¹ (C_r symmetric)


def test_bias_shrinks_monotonically_and_the_limits():
    stats = _stats(80, 24, "gram", seed=3)
    delta = torch.randn(5, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    bias = [stats.quad(project_block(delta, sage_basis(stats, SageParams(beta=b, energy=0.99)))) for b in BETAS]
    assert all(later < earlier for earlier, later in zip(bias, bias[1:])), bias
    assert torch.equal(project_block(delta, sage_basis(stats, SageParams(beta=0.0))), delta)
    hard = project_block(delta, protected_basis(stats, ProjectionParams(energy=0.99)))
    soft = project_block(delta, sage_basis(stats, SageParams(beta=1e12, energy=0.99)))
    assert (soft - hard).norm() <= 1e-6 * hard.norm()


@pytest.fixture(scope="module")
def features(tiny_family, tmp_path_factory):
    """Stage 1 features of the tiny LRM at Ω_think (Grams and low-rank rows, as the features stage writes them)."""
    out = tmp_path_factory.mktemp("sage_features")
    accumulate_features(tiny_family["lrm"], tiny_family["reasoning"], FeaturesParams(), out)
    return out


def test_tiny_family_limits_match_task_arithmetic_and_rain(tiny_family, tiny_task_vectors, features):
    shape = read_shape(tiny_family["lrm"])
    for layer in range(shape.num_layers):
        delta, stats = load_tensors(layer_file(tiny_task_vectors, layer)), load_stats(layer_file(features, layer))
        zero, _ = sanitize_layer(delta, stats, shape, layer, SageParams(beta=0.0))
        assert all(torch.equal(zero[k], delta[k]) for k in zero)
        rain, _ = project_layer(delta, stats, shape, layer, ProjectionParams(energy=0.9))
        soft, _ = sanitize_layer(delta, stats, shape, layer, SageParams(beta=1e12, energy=0.9))
        assert sorted(soft) == sorted(rain)
        for k in rain:
            assert (soft[k] - rain[k]).norm() <= 1e-6 * rain[k].norm() + 1e-12, k
        ratios = [sanitize_layer(delta, stats, shape, layer, SageParams(beta=b, energy=0.9))[1] for b in BETAS]
        for rows in zip(*ratios):  # per block, the bias on the calibration rows falls as β grows
            values = [r["residual_calib"] for r in rows]
            assert values[0] == pytest.approx(1.0) and all(b < a for a, b in zip(values, values[1:])), (rows[0], values)


def test_sanitize_writes_projection_layout_deterministically(tiny_family, tiny_task_vectors, features, tmp_path):
    params = SageParams(beta=10.0)
    manifest = sanitize(tiny_task_vectors, features, params, tmp_path / "a")
    sanitize(tiny_task_vectors, features, params, tmp_path / "b")
    shape = read_shape(tiny_family["lrm"])
    for layer in range(shape.num_layers):
        a, b = layer_file(tmp_path / "a", layer), layer_file(tmp_path / "b", layer)
        assert a.read_bytes() == b.read_bytes()
        names = {shape.spec.param_name(layer, m) for m in MODULES}
        assert names <= set(load_tensors(a))
        assert json.loads(read_metadata(a)["report"]) == json.loads(read_metadata(b)["report"])
    assert json.loads(manifest.read_text())["params_json"]["method"] == "sage"
    assert (tmp_path / "a.parquet").is_file()
    before = layer_file(tmp_path / "a", 0).stat().st_mtime_ns
    sanitize(tiny_task_vectors, features, params, tmp_path / "a")  # current layers are kept
    assert layer_file(tmp_path / "a", 0).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="beta"):
        SageParams(beta=-1.0)


def test_o_proj_bias_is_damped_as_the_constant_direction():
    """A Llama layer with attention biases (o_proj too): o_proj's bias shrinks by 1/(1 + β), 0 at RAIN's limit."""
    shape = ModelShape("llama", 1, 8, 12, 2, 1, 4)
    spec = shape.spec
    biases = {name: module in ("q_proj", "k_proj", "v_proj") for name, module in row_set_modules(shape).items()}
    g = torch.Generator().manual_seed(5)
    stats = {name: RowStats("gram", (x := torch.randn(20, d, generator=g, dtype=torch.float64)).T @ x, 20)
             for name, d in row_set_dims(shape, biases).items()}
    sizes = {"q_proj": (8, 8), "k_proj": (4, 8), "v_proj": (4, 8), "o_proj": (8, 8), "gate_proj": (12, 8), "up_proj": (12, 8),
             "down_proj": (8, 12)}
    delta = {spec.param_name(0, m): torch.randn(s, generator=g) for m, s in sizes.items()}
    delta |= {spec.param_name(0, m, "bias"): torch.randn(sizes[m][0], generator=g) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    o_bias = spec.param_name(0, "o_proj", "bias")
    for beta in (0.0, 3.0):
        out, _ = sanitize_layer(delta, stats, shape, 0, SageParams(beta=beta))
        torch.testing.assert_close(out[o_bias], delta[o_bias] / (1 + beta))
    rain, _ = project_layer(delta, stats, shape, 0, ProjectionParams(energy=0.99))
    soft, _ = sanitize_layer(delta, stats, shape, 0, SageParams(beta=1e12, energy=0.99))
    for k in rain:
        assert (soft[k] - rain[k]).norm() <= 1e-6 * delta[k].norm(), k


def test_projection_method_sage_is_the_alternative_stage_1(tiny_family, tiny_task_vectors, features, tmp_path):
    """`projection.method: sage` writes SAGE's Δ' where Stage 1 writes Δ⊥ (the same tensors as sanitize), with a
    projection report that passes its schema; β = 0 leaves Δ and a huge β is the null-space projection."""
    from rain_tasks.stage1.projection import write_report

    shape = read_shape(tiny_family["lrm"])
    for layer in range(shape.num_layers):
        delta, stats = load_tensors(layer_file(tiny_task_vectors, layer)), load_stats(layer_file(features, layer))
        for beta in (0.0, 10.0, 1e12):
            stage1, rows = project_layer(delta, stats, shape, layer, ProjectionParams(energy=0.9, method="sage", beta=beta))
            sage, _ = sanitize_layer(delta, stats, shape, layer, SageParams(beta=beta, energy=0.9))
            assert sorted(stage1) == sorted(sage) and all(torch.equal(stage1[k], sage[k]) for k in sage)
            write_report(rows, tmp_path / f"{layer}_{beta}.parquet")
        rain, _ = project_layer(delta, stats, shape, layer, ProjectionParams(energy=0.9))
        for k in rain:
            assert (stage1[k] - rain[k]).norm() <= 1e-6 * rain[k].norm() + 1e-12, k
    with pytest.raises(ValueError, match="ridge"):
        ProjectionParams(method="sage", ridge=0.1)
