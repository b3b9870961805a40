"""Stage 1 end to end: the projected merge leaves the LRM's computation at Ω_think unchanged for ANY α
that Stage 2 may choose (exactly on the calibration trace, module by module and through the whole model),
and far less changed than task arithmetic at the same λ on held-out traces."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rain_tasks.stage2.alpha import module_scales
from rain_tasks.io.arch import MODULES, read_shape
from rain_tasks.io.checkpoint import Checkpoint, load_tensors, save_tensors
from rain_dev.checks import think_invariance
from rain_tasks.stage1.features import accumulate_features, row_sets
from rain_tasks.merge.engine import DeltaPlan, SingleFile, TensorDir, merge_checkpoint
from rain_tasks.params import FeaturesParams, ProjectionParams
from rain_tasks.stage1.projection import RowStats, load_stats, project, protected_basis
from rain_dev.checks import project_block
from rain_tasks.merge.task_vectors import compute_task_vectors
from rain_tasks.io.artifacts import layer_file
from rain_dev.tiny import make_family, reasoning_rows, write_jsonl

CALIBRATION, HELDOUT = reasoning_rows(20), reasoning_rows(60)[40:]
RADIUS = 3


@pytest.fixture(scope="module")
def merges(tiny_family, tmp_path_factory):
    """Task arithmetic and RAIN without Stage 2 (α = 1) on the same Linear modules at λ = 1,
    projected with 99.9 % and with all of the feature energy protected."""
    root = tmp_path_factory.mktemp("invariance")
    lrm = tiny_family["lrm"]
    compute_task_vectors(tiny_family["base"], tiny_family["itm"], root / "tv")
    accumulate_features(lrm, write_jsonl(root / "cal.jsonl", CALIBRATION), FeaturesParams(neighbour_radius=RADIUS), root / "feat")
    models = {"LRM": lrm, "task_arithmetic": root / "tv"}
    for energy in (0.999, 1.0):
        project(root / "tv", root / "feat", ProjectionParams(energy=energy), root / f"proj{energy}", root / f"report{energy}.parquet")
        models[f"energy {energy}"] = root / f"proj{energy}"
    for name, delta in list(models.items())[1:]:
        merge_checkpoint(lrm, root / name, "rain", {"lam": 1.0}, DeltaPlan(linear=TensorDir(delta)), "1MB")
        models[name] = root / name
    return models, root


def test_projection_keeps_hidden_states_at_omega_on_heldout_traces(tiny_family, merges):
    models, root = merges
    result = think_invariance(tiny_family["lrm"], models, HELDOUT, RADIUS)
    ta, rain = result["task_arithmetic"], result["energy 0.999"]
    assert rain["h_drift"] < 0.2 * ta["h_drift"] and rain["l_think"] < 0.2 * ta["l_think"]  # 5x less, at least
    kept = pd.read_parquet(root / "report0.999.parquet")["norm_ratio"]
    assert kept.mean() > 0.05  # and the projected update is not simply zero


# --- any α: a 6-query / 2-KV-head family (n_rep 3 differs from the KV count), one calibration trace, so every
# row set has fewer Ω rows than its width and the projection keeps most of Δ: nothing here holds vacuously.
BOX = (0.0, 1.5)


@pytest.fixture(scope="module")
def gqa62(tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa62")
    family = make_family(root, hidden=48, heads=6, kv_heads=2, ffn=64, layers=2, seed=3, delta_scale=0.05)
    trace = reasoning_rows(1)
    compute_task_vectors(family["base"], family["itm"], root / "tv")
    accumulate_features(family["lrm"], write_jsonl(root / "cal.jsonl", trace), FeaturesParams(neighbour_radius=2), root / "feat")
    project(root / "tv", root / "feat", ProjectionParams(energy=1.0), root / "proj", root / "report.parquet")
    return family, trace, root


def _random_scales(lrm, seed: int) -> dict[str, torch.Tensor]:
    """Module scales (Stage 2's mapping) of α drawn uniformly in the box per (layer, head)."""
    shape = read_shape(lrm)
    alpha = np.random.default_rng(seed).uniform(*BOX, size=(shape.num_layers, shape.num_heads))
    return module_scales(alpha, shape, Checkpoint(lrm))


def _augmented(t: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    w = t[f"{name}.weight"].double()
    bias = t.get(f"{name}.bias")
    return torch.cat([w, bias.double()[:, None]], 1) if bias is not None else w


def _inputs(stats: dict[str, RowStats], module: str, shape) -> list[tuple[slice, torch.Tensor]]:
    """(output rows, the module's inputs at Ω) per block; o_proj's input is the WHOLE attention output z_t."""
    sets = row_sets(module, shape)
    if module == "o_proj":
        return [(slice(None), torch.cat([stats[name].tensor for _, name in sets], 1))]
    per = {"k_proj": shape.head_dim * shape.num_kv_heads, "v_proj": shape.head_dim * shape.num_kv_heads}.get(module)
    if per is None:
        return [(slice(None), stats[sets[0][1]].tensor)]
    size = per // len(sets)
    return [(slice(g * size, (g + 1) * size), stats[name].tensor) for g, name in sets]


def test_any_alpha_in_the_box_keeps_every_module_at_omega(gqa62):
    family, _, root = gqa62
    shape = read_shape(family["lrm"])
    report = pd.read_parquet(root / "report.parquet")
    assert (report["path"] == "rows").all()  # fewer Ω rows than every width: the protected space is not everything
    assert report["norm_ratio"].mean() > 0.5  # and Δ⊥ keeps most of Δ (measured: about 0.8)
    for seed in range(3):
        scales = _random_scales(family["lrm"], seed)
        for layer in range(shape.num_layers):
            stats = load_stats(layer_file(root / "feat", layer))
            delta, projected = load_tensors(layer_file(root / "tv", layer)), load_tensors(layer_file(root / "proj", layer))
            for module in MODULES:
                name = shape.spec.param_name(layer, module).rsplit(".", 1)[0]
                scale = {k: scales[f"{name}.{k}"].double() for k in ("weight", "bias") if f"{name}.{k}" in scales}
                scaled = {f"{name}.{k}": s * t[f"{name}.{k}"] for k, s in scale.items() for t in [delta]}
                scaled_p = {f"{name}.{k}": s * projected[f"{name}.{k}"] for k, s in scale.items()}
                for rows, x in _inputs(stats, module, shape):
                    before = (_augmented(scaled, name)[rows] @ x.T).norm()
                    after = (_augmented(scaled_p, name)[rows] @ x.T).norm()
                    assert before > 0 and after <= 1e-6 * before, (seed, layer, module, float(after / before))


def test_a_whole_vector_o_proj_projection_does_not_survive_per_head_alpha(gqa62):
    """What the per-head rule fixes: projected against the whole z_t, Δ⊥z = 0 holds at α = 1 only by cancellation."""
    family, _, root = gqa62
    shape = read_shape(family["lrm"])
    stats = load_stats(layer_file(root / "feat", 0))
    (_, z), = _inputs(stats, "o_proj", shape)
    delta = load_tensors(layer_file(root / "tv", 0))[shape.spec.param_name(0, "o_proj")].double()
    whole = project_block(delta, protected_basis(RowStats("rows", z, z.shape[0]), ProjectionParams(energy=1.0)))
    alpha_cols = torch.from_numpy(np.random.default_rng(0).uniform(*BOX, shape.num_heads)).repeat_interleave(shape.head_dim)
    assert (whole @ z.T).norm() < 1e-9 * (delta @ z.T).norm()  # uniform α: invariant
    assert ((alpha_cols * whole) @ z.T).norm() > 0.1 * ((alpha_cols * delta) @ z.T).norm()  # random α: it comes back


def test_random_alpha_merge_keeps_hidden_states_near_omega(gqa62, tmp_path):
    family, trace, root = gqa62
    lrm = family["lrm"]
    save_tensors(tmp_path / "scales.safetensors", _random_scales(lrm, 7), {"kind": "alpha_scales"})
    plans = {"task_arithmetic": DeltaPlan(linear=TensorDir(root / "tv")), "rain_alpha_1": DeltaPlan(linear=TensorDir(root / "proj")),
             "rain": DeltaPlan(linear=TensorDir(root / "proj"), scales=SingleFile(tmp_path / "scales.safetensors"))}
    for name, plan in plans.items():
        merge_checkpoint(lrm, tmp_path / name, "rain", {"lam": 1.0}, plan, "1MB")
    result = think_invariance(lrm, {n: tmp_path / n for n in plans}, trace, 2)
    ta, uniform, rain = (result[n] for n in ("task_arithmetic", "rain_alpha_1", "rain"))
    # Through the whole model the protection is first order (positions outside Ω change and feed later layers'
    # keys and values; k_proj protects the keys holding key_mass of Ω's attention), so not exact: measured
    # h_drift 1.41 (TA), 0.21 (α = 1), 0.15 (random α, mean 0.75). Random α must not bring the update back.
    assert ta["h_drift"] > 0.5
    assert rain["h_drift"] < 0.2 * ta["h_drift"] and rain["l_think"] < 0.2 * ta["l_think"]
    assert rain["h_drift"] < 1.2 * uniform["h_drift"]
