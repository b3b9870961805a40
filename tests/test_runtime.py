"""Device, precision, offload and batching of the model-running stages: each path against the plain float32 one.

The tiny family runs features → projection → attention_stats → alpha under a `runtime` section and
the artifacts are compared with the plain path (float32, one sample per forward, no device map).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rain_tasks.stage2.alpha import solve_alpha
from rain_tasks.stage2.attention import attention_stats
from rain_tasks.model.capture import token_batches
from rain_tasks.io.checkpoint import load_tensors
from rain_tasks.model.runtime import forward_dtype, load_causal_lm
from rain_tasks.stage1.features import accumulate_features
from rain_tasks.params import AlphaParams, AttentionParams, FeaturesParams, ProjectionParams, RuntimeParams
from rain_tasks.stage1.projection import project
from rain_tasks.io.artifacts import layer_file

PLAIN = RuntimeParams(device="cpu", dtype="float32", batch_tokens=16)  # one sample per forward
ALPHA = AlphaParams(scale="relative", box_hi=1.02)  # α around 1 (mean prior); a tight box so some heads sit on it


def _chain(family: dict[str, Path], task_vectors: Path, out: Path, runtime: RuntimeParams, *, stop_after_stats: bool = False) -> dict:
    """Run Stage 1 and Stage 2 on the tiny family under `runtime`; return what each stage wrote."""
    features = out / "features"
    accumulate_features(family["lrm"], family["reasoning"], FeaturesParams(), features, runtime=runtime)
    projected = out / "projected"
    project(task_vectors, features, ProjectionParams(energy=0.9), projected, out / "projection.parquet")
    attention_stats(family["lrm"], projected, family["instruction"], AttentionParams(mode="recompute"), out / "stats.parquet",
                    out / "report.json", runtime=runtime)
    result = {"features": features, "projection": pd.read_parquet(out / "projection.parquet"),
              "stats": pd.read_parquet(out / "stats.parquet")}
    if not stop_after_stats:
        solve_alpha(out / "stats.parquet", family["lrm"], ALPHA, 1.0, out / "alpha.parquet", out / "scales.safetensors")
        result["alpha"] = pd.read_parquet(out / "alpha.parquet")
    return result


@pytest.fixture(scope="module")
def plain(tiny_family, tiny_task_vectors, tmp_path_factory) -> dict:
    return _chain(tiny_family, tiny_task_vectors, tmp_path_factory.mktemp("plain"), PLAIN)


def _features_close(a: Path, b: Path, layers: int, rtol: float, atol: float) -> None:
    for layer in range(layers):
        x, y = load_tensors(layer_file(a, layer)), load_tensors(layer_file(b, layer))
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == torch.float64  # statistics accumulate in float64 whatever the forward dtype
            torch.testing.assert_close(x[key], y[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"layer {layer} {key}: {m}")


def _verdicts(alpha: pd.DataFrame, box: AlphaParams) -> pd.DataFrame:
    """Per head: up- or down-weighted against the mean, and whether it sits on a box bound."""
    a = alpha["alpha"]
    return pd.DataFrame({"up": a > a.mean(), "lo": a <= box.box_lo, "hi": a >= box.box_hi})


def test_bfloat16_forward_keeps_ranks_alpha_and_verdicts(tiny_family, tiny_task_vectors, plain, tmp_path):
    bf16 = _chain(tiny_family, tiny_task_vectors, tmp_path, RuntimeParams(device="cpu", dtype="bfloat16"))
    assert forward_dtype(tiny_family["lrm"], RuntimeParams(device="cpu", dtype="bfloat16")) == torch.bfloat16
    assert load_causal_lm(tiny_family["lrm"], RuntimeParams(device="cpu")).dtype == torch.float32  # auto on the CPU
    # Stage 1: the same protected rank in every module
    pd.testing.assert_series_equal(bf16["projection"]["rank_kept"], plain["projection"]["rank_kept"])
    # Stage 2: α per head (relative scale, mean 1) within 2e-3 and the same verdicts per head
    alpha = plain["alpha"]["alpha"].to_numpy()
    assert alpha.std() > 1e-2 and _verdicts(plain["alpha"], ALPHA)["hi"].any()  # the heads differ and the box binds
    diff = np.abs(bf16["alpha"]["alpha"].to_numpy() - alpha)
    assert diff.max() < 2e-3, f"bf16 α differs from float32 by up to {diff.max():.5f}"
    pd.testing.assert_frame_equal(_verdicts(bf16["alpha"], ALPHA), _verdicts(plain["alpha"], ALPHA))
    # but bf16 really ran: the statistics are not bit-identical
    assert not np.array_equal(bf16["stats"]["a0"].to_numpy(), plain["stats"]["a0"].to_numpy())


def test_batched_forward_matches_one_sample_per_pass(tiny_family, tiny_task_vectors, plain, tmp_path):
    runtime = RuntimeParams(device="cpu", dtype="float32", batch_tokens=4096)
    batched = _chain(tiny_family, tiny_task_vectors, tmp_path, runtime, stop_after_stats=True)
    _features_close(batched["features"], plain["features"], 2, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(batched["stats"][["a0", "a1", "u0", "u1"]], plain["stats"][["a0", "a1", "u0", "u1"]], rtol=1e-5, atol=1e-8)


def test_offloaded_device_map_matches_plain(tiny_family, tiny_task_vectors, plain, tmp_path):
    model_bytes = sum(p.numel() * 4 for p in load_causal_lm(tiny_family["lrm"]).parameters())
    budget = str(model_bytes // 4)  # a quarter of the model: the rest lives on disk
    runtime = RuntimeParams(device="cpu", dtype="float32", device_map="auto", max_memory={"cpu": budget},
                            offload_folder=str(tmp_path / "offload"), batch_tokens=16)
    model = load_causal_lm(tiny_family["lrm"], runtime)
    assert any(p.device.type == "meta" for p in model.parameters()), "nothing was offloaded"
    offloaded = _chain(tiny_family, tiny_task_vectors, tmp_path, runtime, stop_after_stats=True)
    _features_close(offloaded["features"], plain["features"], 2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(offloaded["stats"][["a0", "a1", "u0", "u1"]], plain["stats"][["a0", "a1", "u0", "u1"]], rtol=1e-10)


def test_token_batches_keep_order_and_budget():
    assert token_batches([3, 3, 3, 10, 2], 9) == [[0, 1, 2], [3], [4]]
    assert token_batches([5, 1, 1], 10) == [[0, 1], [2]]


@pytest.mark.parametrize("bad", [{"device": "gpu"}, {"device": "cuda:x"}, {"max_memory": {"cpu": "1GB"}},
                                 {"device_map": "auto", "max_memory": {"gpu0": "1GB"}}])
def test_runtime_params_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        RuntimeParams(**bad)
