"""The streaming merge engine against its definition, tensor by tensor, on tiny sharded checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rain_tasks.io.arch import module_of
from rain_tasks.io.checkpoint import INDEX_NAME, Checkpoint, Difference, ShardWriter, save_tensors
from rain_tasks.merge import engine
from rain_tasks.merge.engine import DeltaPlan, SingleFile, TensorDir, merge_checkpoint
from rain_tasks.merge.task_vectors import compute_task_vectors


@pytest.fixture(scope="module")
def task_vectors(tiny_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("tv")
    compute_task_vectors(tiny_family["base"], tiny_family["itm"], out)
    return out


def test_task_vectors_are_itm_minus_base(tiny_family, task_vectors):
    base, itm, tv = Checkpoint(tiny_family["base"]), Checkpoint(tiny_family["itm"]), TensorDir(task_vectors)
    for name in base.names():
        assert torch.equal(tv.get(name), itm.get(name).float() - base.get(name).float()), name


def _random_scales(lrm: Checkpoint, path, seed: int = 0) -> None:
    """α-like scales broadcasting against each Linear tensor (rows for q/k/v, columns for o, scalar for MLP)."""
    g = torch.Generator().manual_seed(seed)
    scales = {}
    for name in lrm.names():
        module, shape = module_of(name), lrm.shape(name)
        if module is None:
            continue
        if module in ("q_proj", "k_proj", "v_proj"):
            s = (shape[0], 1) if name.endswith("weight") else (shape[0],)
        elif module == "o_proj":
            s = (1, shape[1]) if name.endswith("weight") else (1,)
        else:
            s = (1, 1) if name.endswith("weight") else (1,)
        scales[name] = torch.rand(s, generator=g) * 1.5
    save_tensors(path, scales)


@pytest.mark.parametrize("row_block_bytes", [None, 300], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("scope", ["linear", "all"])
def test_rain_merge_equals_definition(tiny_family, task_vectors, tmp_path, scope, row_block_bytes, monkeypatch):
    """θ_merged = θ_R + λ·α⊙Δ on merged modules; other tensors copied (linear) or + λΔ (all); the same bits when the
    elementwise method runs a block of rows at a time (300 bytes: one to a few rows per block here)."""
    if row_block_bytes is not None:
        monkeypatch.setattr(engine, "ROW_BLOCK_BYTES", row_block_bytes)
        assert engine.row_blocks((64, 64), row_block_bytes) == [slice(i, i + 1) for i in range(64)]
        assert len(engine.row_blocks((256,), row_block_bytes)) == 4  # a bias: 75 rows per block
    lrm = Checkpoint(tiny_family["lrm"])
    _random_scales(lrm, tmp_path / "scales.safetensors")
    plan = DeltaPlan(
        linear=TensorDir(task_vectors),
        other=TensorDir(task_vectors) if scope == "all" else None,
        scales=SingleFile(tmp_path / "scales.safetensors"),
    )
    out = tmp_path / "merged"
    shards = merge_checkpoint(tiny_family["lrm"], out, "rain", {"lam": 0.7}, plan, max_shard_size=20_000)
    assert len(shards) >= 2 and (out / INDEX_NAME).is_file()
    merged, tv, sc = Checkpoint(out), TensorDir(task_vectors), SingleFile(tmp_path / "scales.safetensors")
    assert merged.names() == lrm.names()
    for name in lrm.names():
        theta = lrm.get(name).float()
        if module_of(name) is not None:
            expected = theta + 0.7 * (sc.get(name) * tv.get(name))
        elif scope == "all":
            expected = theta + 0.7 * tv.get(name)
        else:
            expected = theta
        assert torch.equal(merged.get(name), expected.to(lrm.get(name).dtype)), name
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_family["lrm"] / "config.json").read_text())


def test_merge_is_bit_identical_across_runs(tiny_family, task_vectors, tmp_path):
    plan = DeltaPlan(linear=TensorDir(task_vectors))
    for name in ("a", "b"):
        merge_checkpoint(tiny_family["lrm"], tmp_path / name, "task_arithmetic", {"lam": 1.0}, plan, max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_failed_merge_leaves_no_output(tiny_family, tmp_path):
    """An error mid-merge (here: a Δ of the wrong shape) leaves no model directory behind."""
    bad = tmp_path / "bad"
    lrm = Checkpoint(tiny_family["lrm"])
    layer0 = {n: torch.zeros(3, 3) for n in lrm.layer_names(0) if module_of(n)}
    save_tensors(bad / "layer_000.safetensors", layer0)
    with pytest.raises(RuntimeError):
        merge_checkpoint(tiny_family["lrm"], tmp_path / "out", "rain", {"lam": 1.0}, DeltaPlan(linear=TensorDir(bad)))
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_unknown_method_refused(tiny_family, tmp_path):
    with pytest.raises(ValueError, match="unknown merge method 'tiez'"):
        merge_checkpoint(tiny_family["lrm"], tmp_path / "o", "tiez", {}, DeltaPlan(linear=TensorDir(tmp_path)))


def test_merge_from_itm_and_base_on_the_fly_equals_the_task_vector_merge(tiny_family, task_vectors, tmp_path):
    """Δ = θ_I − θ_B computed per tensor (Difference) gives the same bytes as reading the stored fp32 Δ."""
    on_the_fly = Difference(Checkpoint(tiny_family["itm"]), Checkpoint(tiny_family["base"]))
    plans = {"stored": DeltaPlan(linear=TensorDir(task_vectors), other=TensorDir(task_vectors)),
             "direct": DeltaPlan(linear=on_the_fly, other=on_the_fly)}
    for name, plan in plans.items():
        merge_checkpoint(tiny_family["lrm"], tmp_path / name, "task_arithmetic", {"lam": 0.7}, plan, max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "stored").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "direct").iterdir())
    for f in files:
        assert (tmp_path / "stored" / f).read_bytes() == (tmp_path / "direct" / f).read_bytes(), f


def test_a_failed_write_behind_is_raised_not_lost(tmp_path):
    """The shard writer writes on a thread: a write that fails (its shard removed under it) surfaces as an error."""
    layout = [("a", torch.float32, (4,)), ("b", torch.float32, (4,))]
    with pytest.raises(FileNotFoundError):
        with ShardWriter(tmp_path / "out", 1_000, layout) as writer:
            (tmp_path / "out" / "part-00000.safetensors").unlink()
            writer.add("a", torch.ones(4))
            writer.add("b", torch.ones(4))
            writer.close()
