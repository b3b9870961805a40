"""AIM: exact column scaling, the ω = 1 identity, and the anchor statistic against a manual per-block forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rain_tasks.data_aware.aim import (
    INPUT_OF,
    AimParams,
    calibration_blocks,
    channel_mean_abs,
    collect_channel_stats,
    load_relaxations,
    rendered_token_lists,
)
from rain_tasks.io.arch import MODULES, read_shape
from rain_tasks.io.checkpoint import Checkpoint, read_metadata
from rain_tasks.io.schemas import load_records
from rain_tasks.merge.engine import DeltaPlan, TensorDir, merge_checkpoint
from rain_tasks.methods import METHODS, TensorInputs
from rain_tasks.methods.aim import aim_wrap, relax, relaxation
from rain_tasks.model.calibration import load_tokenizer, render_sample

T = torch.tensor
Q = "model.layers.0.self_attn.q_proj.weight"


def test_relaxation_and_column_scaling_by_hand():
    a = T([1.0, 2.0, 4.0], dtype=torch.float64)
    r = relaxation(a, 0.5)  # s = (0.25, 0.5, 1) -> r = 1 − 0.5·s
    assert torch.equal(r, T([0.875, 0.75, 0.5]))
    anchor = T([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    merged = T([[3.0, 2.0, -1.0], [4.0, 1.0, 4.5]])
    out = relax(merged, anchor, r)
    assert torch.equal(out, T([[2.75, 2.0, 1.0], [3.5, 0.5, 4.25]]))  # anchor + r_j·(merged − anchor)[:, j]


def test_ranges_the_busiest_channel_gets_omega_and_omega_one_is_the_identity():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(17, generator=gen, dtype=torch.float64) + 0.1
    for omega in (0.0, 0.2, 0.6):
        r = relaxation(a, omega)
        assert float(r[a.argmax()]) == pytest.approx(omega, abs=1e-7)
        assert bool(((r >= omega - 1e-7) & (r <= 1.0)).all())
    merged, anchor = torch.randn(5, 17, generator=gen), torch.randn(5, 17, generator=gen)
    assert torch.equal(relax(merged, anchor, relaxation(a, 1.0)), merged)
    cols = relax(merged, anchor, relaxation(a, 0.3)) - anchor
    torch.testing.assert_close(cols, (merged - anchor) * relaxation(a, 0.3), rtol=0, atol=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="all zero"):
        relaxation(torch.zeros(4, dtype=torch.float64), 0.4)
    with pytest.raises(ValueError, match="do not agree"):
        relax(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(4))
    with pytest.raises(ValueError, match="aim.modules"):
        AimParams(modules=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="fewer than one block"):
        calibration_blocks([[1, 2, 3]], 8)


def test_blocks_concatenate_and_drop_the_tail():
    blocks = calibration_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert [b.tolist() for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [b.tolist() for b in calibration_blocks([[1, 2], [], [3]], None)] == [[1, 2], [3]]


def _ties_inputs(family, name: str) -> TensorInputs:
    base, itm, lrm = (Checkpoint(family[k]).get(name).float() for k in ("base", "itm", "lrm"))
    return TensorInputs(name, lrm, itm - base, None, base)


def test_aim_ties_wraps_ties_column_by_column(tiny_family):
    ties, p = METHODS["ties"], {"density": 0.5, "weights": [1.0, 1.0], "lam": 1.0}
    x = _ties_inputs(tiny_family, Q)
    a = torch.linspace(0.5, 3.0, x.lrm.shape[1], dtype=torch.float64)
    merged = ties(x, p)
    assert torch.equal(aim_wrap(ties, {Q: relaxation(a, 1.0)}, "base")(x, p), merged)
    out = aim_wrap(ties, {Q: relaxation(a, 0.4)}, "base")(x, p)
    r = relaxation(a, 0.4)
    torch.testing.assert_close(out - x.base, (merged - x.base) * r, rtol=0, atol=1e-6)
    ours = aim_wrap(ties, {Q: r}, "lrm")(x, p)  # anchored on θ_R instead
    torch.testing.assert_close(ours - x.lrm, (merged - x.lrm) * r, rtol=0, atol=1e-6)
    emb = "model.embed_tokens.weight"  # not covered: the wrapped method's tensor as it is
    xe = _ties_inputs(tiny_family, emb)
    assert torch.equal(aim_wrap(ties, {Q: r}, "base")(xe, p), ties(xe, p))
    with pytest.raises(ValueError, match="needs the base"):
        aim_wrap(METHODS["task_arithmetic"], {Q: r}, "base")(TensorInputs(Q, x.lrm, x.delta, None, None), {"lam": 1.0})


def _manual_stats(model, blocks) -> dict[tuple[int, str], torch.Tensor]:
    """Σ_blocks mean_t |x| per (layer, module) from pre-hooks on the Linear modules themselves, one block at a time."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer, decoder in enumerate(model.model.layers):
        for m in MODULES:
            mod = decoder.get_submodule(("self_attn." if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + m)

            def hook(_mod, args, key=(layer, m)):
                v = args[0][0].abs().double().mean(0)
                out[key] = out[key] + v if key in out else v

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in blocks:
            model(b[None])
    for h in handles:
        h.remove()
    return out


def test_statistic_equals_a_manual_per_block_forward(tiny_family, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_family["lrm"], dtype=torch.float32, attn_implementation="eager").eval()
    texts = _texts()
    blocks = calibration_blocks(texts, None)  # unequal lengths: the batched capture pads them
    manual = _manual_stats(model, blocks)
    got = channel_mean_abs(model, blocks, batch_tokens=64)
    for (layer, m), want in manual.items():
        torch.testing.assert_close(got[(layer, INPUT_OF[m])], want, rtol=1e-5, atol=1e-7)
    params = AimParams(anchor="lrm", modules=("q_proj", "down_proj"), block_tokens=None)
    path = collect_channel_stats(tiny_family["lrm"], texts, params, tmp_path / "aim.safetensors")
    r = load_relaxations(path, params.omega)
    shape = read_shape(tiny_family["lrm"])
    assert sorted(r) == sorted(shape.spec.param_name(layer, m) for layer in range(shape.num_layers) for m in params.modules)
    want = relaxation(manual[(1, "down_proj")], params.omega)
    torch.testing.assert_close(r[shape.spec.param_name(1, "down_proj")], want, rtol=1e-6, atol=1e-7)
    assert read_metadata(path)["blocks"] == "4"
    records = load_records(tiny_family["reasoning"], "reasoning")
    lists = rendered_token_lists(tiny_family["lrm"], records)
    tok = load_tokenizer(tiny_family["lrm"])
    assert lists[2] == render_sample(tok, records[2]["prompt"], records[2]["reasoning"], records[2]["response"]).input_ids
    again = collect_channel_stats(tiny_family["lrm"], texts, params, tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()  # deterministic artifact
    other_omega = params.model_copy(update={"omega": 0.9})
    same = collect_channel_stats(tiny_family["lrm"], texts, other_omega, tmp_path / "omega.safetensors")
    assert same.read_bytes() == path.read_bytes()  # ω acts at the merge only: one statistic serves a sweep over ω


def test_aim_ties_streams_through_the_merge_engine(tiny_family, tiny_task_vectors, tmp_path, monkeypatch):
    """The wrapper registered as a method: covered weights relaxed column by column towards θ_B, the rest TIES's."""
    stats = collect_channel_stats(tiny_family["base"], _texts(), AimParams(block_tokens=8), tmp_path / "aim.safetensors")
    r = load_relaxations(stats, 0.4)
    aim_ties = aim_wrap(METHODS["ties"], r, "base")
    assert aim_ties.needs_base and aim_ties.params is METHODS["ties"].params and aim_ties.doc.startswith("AIM")
    assert not aim_wrap(METHODS["task_arithmetic"], r, "lrm").needs_base  # anchored on θ_R: the base is never loaded
    monkeypatch.setitem(METHODS, "aim_ties", aim_ties)
    plan = DeltaPlan(TensorDir(tiny_task_vectors), TensorDir(tiny_task_vectors), base=Checkpoint(tiny_family["base"]))
    p = {"density": 0.5, "weights": [1.0, 1.0], "lam": 1.0}
    for method in ("ties", "aim_ties"):
        merge_checkpoint(tiny_family["lrm"], tmp_path / method, method, p, plan)
    ties, aim, base = (Checkpoint(d) for d in (tmp_path / "ties", tmp_path / "aim_ties", tiny_family["base"]))
    assert len(r) == 7 * read_shape(tiny_family["base"]).num_layers
    for name in base.names():
        if name in r:
            torch.testing.assert_close(aim.get(name) - base.get(name), (ties.get(name) - base.get(name)) * r[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(aim.get(name), ties.get(name)), name


def _texts() -> list[list[int]]:
    """Random token lists for the tiny vocabulary."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (n,), generator=gen).tolist() for n in (9, 14, 5, 11)]
