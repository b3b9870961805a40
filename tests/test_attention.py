"""Stage 2 attention statistics: span mapping, brute-force agreement, eager == recompute, both passes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from rain_dev.tiny import instruction_rows, make_tokenizer, write_jsonl

from rain_tasks.io.arch import module_of, read_shape
from rain_tasks.stage2.attention import (
    SampleSpans,
    add_update,
    attention_stats,
    eager_sample_stats,
    load_lrm,
    map_sample_spans,
    pick_mode,
    recompute_sample_stats,
)
from rain_tasks.model.calibration import load_tokenizer, render_sample
from rain_tasks.io.checkpoint import load_tensors, save_tensors
from rain_tasks.params import AttentionParams, Params, RuntimeParams
from rain_tasks.merge.task_vectors import compute_task_vectors
from rain_tasks.io.artifacts import MANIFEST, NON_LAYER, layer_file


def _row(prompt: str, response: str, related: list[tuple[list[str], list[str]]], unrelated: list[str]) -> dict:
    """An instruction-set row in the published format."""
    return {
        "id": 0,
        "prompt": prompt,
        "reason": "we need first the answer .",
        "response": response,
        "instruction_id_list": [f"i{k}" for k in range(len(related))],
        "related_prompt_list": [
            {"instruction_id": f"i{k}", "prompt_spans": p, "response_spans": r} for k, (p, r) in enumerate(related)
        ],
        "unrelated_response_spans": unrelated,
    }


def _words(r, positions) -> list[str]:
    return [r.text[r.offsets[p][0] : r.offsets[p][1]] for p in positions]


def test_span_mapping_every_occurrence_and_unmapped_counts():
    tok = make_tokenizer()
    row = _row(
        prompt="end with DONE then write in uppercase . end with DONE",
        response="hello DONE world DONE ANSWER IS 3",
        related=[(["end with DONE", "repeat twice"], ["DONE"]), (["write in uppercase"], ["question"])],
        unrelated=["hello", "world", "step"],
    )
    r = render_sample(tok, row["prompt"], row["reason"], row["response"])
    spans = map_sample_spans(r, row)
    assert spans.unmapped == {"prompt_spans": 1, "response_spans": 1, "unrelated_response_spans": 1}
    assert spans.unusable_instructions == 1  # the second instruction's response span never occurs
    [(i_k, r_k)] = spans.pairs
    assert _words(r, i_k) == ["end", "with", "DONE"] * 2  # both occurrences, prompt region only
    assert _words(r, r_k) == ["DONE", "DONE"]  # the response region only, not the prompt's DONE
    assert min(r_k) >= r.think_close
    assert _words(r, spans.instruction) == ["end", "with", "DONE", "write", "in", "uppercase", "end", "with", "DONE"]
    assert _words(r, spans.unrelated) == ["hello", "world"]
    assert spans.query_rows == sorted(set(r_k) | set(spans.unrelated))


def _brute_force(attentions, spans: SampleSpans) -> tuple[np.ndarray, np.ndarray]:
    """a, u [layers, heads] by explicit loops over full attention matrices."""
    L, H = len(attentions), attentions[0].shape[1]
    a, u = np.zeros((L, H)), np.zeros((L, H))
    for l, att in enumerate(attentions):
        for h in range(H):
            A = att[0, h].double()
            per_instruction = [np.mean([sum(A[i, j].item() for j in i_k) for i in r_k]) for i_k, r_k in spans.pairs]
            a[l, h] = np.mean(per_instruction)
            if spans.unrelated:
                u[l, h] = np.mean([sum(A[i, j].item() for j in spans.instruction) for i in spans.unrelated])
    return a, u


def _sample(tiny_family, row: dict):
    tok = load_tokenizer(tiny_family["lrm"])
    r = render_sample(tok, row["prompt"], row["reason"], row["response"])
    return torch.tensor([r.input_ids]), map_sample_spans(r, row)


@pytest.fixture(scope="module")
def lrm(tiny_family):
    return load_lrm(tiny_family["lrm"])


@pytest.mark.parametrize("row", [instruction_rows(2)[0], instruction_rows(2)[1]], ids=["with_U", "without_U"])
def test_eager_and_recompute_match_brute_force(tiny_family, lrm, row):
    ids, spans = _sample(tiny_family, row)
    with torch.no_grad():
        lrm.set_attn_implementation("eager")
        full = lrm(ids, output_attentions=True).attentions
    a_ref, u_ref = _brute_force(full, spans)
    assert a_ref.min() > 0 and (u_ref.min() > 0 if spans.unrelated else not u_ref.any())
    with torch.no_grad():
        for fn in (eager_sample_stats, recompute_sample_stats):
            a, u = fn(lrm, ids, spans)
            np.testing.assert_allclose(a.numpy(), a_ref, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(u.numpy(), u_ref, rtol=1e-5, atol=1e-7)


def test_eager_path_refuses_missing_attention_weights():
    fake = SimpleNamespace(set_attn_implementation=lambda _: None, base_model=lambda **_: SimpleNamespace(attentions=()),
                           get_input_embeddings=lambda: SimpleNamespace(weight=torch.zeros(1)))
    spans = SampleSpans(pairs=(((0,), (1,)),), instruction=(0,), unrelated=(), unmapped={}, unusable_instructions=0)
    with pytest.raises(RuntimeError, match="no attention weights"):
        eager_sample_stats(fake, torch.tensor([[1, 2]]), spans)


def test_auto_mode_switches_to_recompute_for_long_texts(tiny_family):
    shape = read_shape(tiny_family["lrm"])
    assert pick_mode("auto", shape, 64) == "eager"
    assert pick_mode("auto", shape, 8192) == "recompute"
    assert pick_mode("eager", shape, 8192) == "eager"


def _manual_reference(tiny_family, deltas: Path, step: float, rows: list[dict], every_tensor: bool) -> tuple[np.ndarray, np.ndarray]:
    """a, u per sample [samples, layers, heads] from an independently patched model (state dict + step·Δ, on the
    Linear modules or on every tensor) and brute-force loops."""
    model = load_lrm(tiny_family["lrm"])
    state = model.state_dict()
    files = [layer_file(deltas, l) for l in range(read_shape(tiny_family["lrm"]).num_layers)] + [deltas / NON_LAYER]
    for path in files:
        for name, delta in load_tensors(path).items():
            if every_tensor or module_of(name) is not None:
                state[name] += step * delta
    model.load_state_dict(state)
    out = []
    for row in rows:
        ids, spans = _sample(tiny_family, row)
        with torch.no_grad():
            out.append(_brute_force(model(ids, output_attentions=True).attentions, spans))
    return np.stack([a for a, _ in out]), np.stack([u for _, u in out])


def test_attention_stats_passes_follow_the_merge_update_and_paths_agree(tiny_family, tmp_path):
    """Passes at θ_R + t·λ·D, t = 0, p, 2p; under scope 'all' D also carries Δ_I of norms and embeddings."""
    projected = tmp_path / "projected"
    compute_task_vectors(tiny_family["base"], tiny_family["itm"], projected)  # same keys as Δ⊥, plus norms
    long_row = {**instruction_rows(1)[0], "id": 99, "reason": " ".join(["step"] * 200)}
    bad_row = {**instruction_rows(1)[0], "id": 98, "unrelated_response_spans": ["question"]}
    rows = instruction_rows(4) + [long_row, bad_row]
    path = write_jsonl(tmp_path / "instruction.jsonl", rows)
    tables = {}
    for mode in ("eager", "recompute"):
        params = AttentionParams(prior=0.5, max_tokens=128, mode=mode)
        out = attention_stats(tiny_family["lrm"], projected, path, params, tmp_path / mode / "stats.parquet",
                              tmp_path / mode / "report.json", lam=2.0, other_dir=projected)
        tables[mode] = pd.read_parquet(out)
        report = json.loads((tmp_path / mode / "report.json").read_text())
        assert report["samples_read"] == 6 and report["samples_used"] == 5 and report["skipped_too_long"] == 1
        assert report["unmapped_spans"] == {"prompt_spans": 0, "response_spans": 0, "unrelated_response_spans": 1}
        assert report["unmapped_per_sample"] == [{"id": "98", "prompt_spans": 0, "response_spans": 0, "unrelated_response_spans": 1}]
        assert report["paths"] == [{mode: 5}] * 3 and report["step"] == 1.0 and report["scope"] == "all"
        assert any(n.endswith("layernorm.weight") for n in report["ignored_projected_tensors"])
    eager, recompute = tables["eager"], tables["recompute"]
    assert list(eager.columns) == ["sample", "layer", "head", "a0", "a1", "a2", "u0", "u1", "u2"]
    assert len(eager) == 5 * 2 * 4
    pd.testing.assert_frame_equal(eager, recompute, rtol=1e-6, atol=1e-9)
    assert (eager["a1"] - eager["a0"]).abs().max() > 1e-6  # pass 1 really ran on a different model
    used = rows[:4] + [bad_row]
    for k in (1, 2):  # λ·p = 1: pass k at θ_R + k·Δ on every tensor
        a, u = _manual_reference(tiny_family, projected, float(k), used, every_tensor=True)
        np.testing.assert_allclose(eager[f"a{k}"].to_numpy(), a.ravel(), rtol=1e-5)
        np.testing.assert_allclose(eager[f"u{k}"].to_numpy(), u.ravel(), rtol=1e-5, atol=1e-9)
    linear_only = attention_stats(tiny_family["lrm"], projected, path, AttentionParams(prior=0.5, max_tokens=128, curvature_pass=False),
                                  tmp_path / "lin.parquet", tmp_path / "lin.json")
    table = pd.read_parquet(linear_only)
    assert table["a2"].isna().all()  # no curvature pass
    a, _ = _manual_reference(tiny_family, projected, 0.5, used, every_tensor=False)
    np.testing.assert_allclose(table["a1"].to_numpy(), a.ravel(), rtol=1e-5)


def test_add_update_requires_every_merged_tensor(tiny_family, lrm, tmp_path):
    shape = read_shape(tiny_family["lrm"])
    params = dict(lrm.named_parameters())
    for l in range(shape.num_layers):
        names = [n for n in params if module_of(n) is not None and n.startswith(f"model.layers.{l}.") and not n.endswith("down_proj.weight")]
        save_tensors(layer_file(tmp_path, l), {n: torch.zeros_like(params[n]) for n in names})
    with pytest.raises(FileNotFoundError, match="manifest"):
        add_update(lrm, tmp_path, shape, 1.0)
    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match="down_proj"):
        add_update(lrm, tmp_path, shape, 1.0)


def test_spans_map_to_the_same_text_whether_or_not_the_template_opens_think():
    from rain_dev.tiny import CHAT_TEMPLATE

    r1 = CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
    for row in instruction_rows(3):
        mapped = []
        for template in (CHAT_TEMPLATE, r1):
            tok = make_tokenizer(template)
            r = render_sample(tok, row["prompt"], row["reason"], row["response"])
            assert r.text.count("<think>") == 1  # an R1 template's own <think> is not doubled
            spans = map_sample_spans(r, row)
            words = lambda positions: [r.input_ids[p] for p in positions]  # noqa: E731 - token ids, position-free
            mapped.append(([(words(i), words(k)) for i, k in spans.pairs], words(spans.instruction), words(spans.unrelated)))
        assert mapped[0] == mapped[1] and mapped[0][0]


def test_bf16_passes_recompute_in_fp32_and_track_the_fp32_statistics(tiny_family, tmp_path):
    """bf16 forward passes: auto takes the recompute path (fp32 softmax), so every attention mass stays ≤ 1 within the
    schema's bound, and the statistics follow the fp32 ones to bf16's precision; eager is refused before any pass."""
    projected = tmp_path / "projected"
    compute_task_vectors(tiny_family["base"], tiny_family["itm"], projected)
    path = write_jsonl(tmp_path / "instruction.jsonl", instruction_rows(6))
    tables = {}
    for dtype in ("float32", "bfloat16"):
        runtime = RuntimeParams(device="cpu", dtype=dtype)
        out = attention_stats(tiny_family["lrm"], projected, path, AttentionParams(prior=0.5, max_tokens=128),
                              tmp_path / dtype / "stats.parquet", tmp_path / dtype / "report.json", lam=2.0, runtime=runtime)
        tables[dtype] = pd.read_parquet(out)
        paths = json.loads((tmp_path / dtype / "report.json").read_text())["paths"]
        assert paths == [{"eager" if dtype == "float32" else "recompute": 6}] * 3
    fp32, bf16 = tables["float32"], tables["bfloat16"]
    cols = ["a0", "a1", "a2", "u0", "u1", "u2"]
    assert (bf16[cols].to_numpy() <= 1 + 1e-6).all()
    gap = np.abs(bf16[cols].to_numpy() - fp32[cols].to_numpy())
    assert 0 < gap.max() < 1e-3  # bf16 weights and activations (2⁻⁸ relative), not the fp32 model
    step = (fp32["a1"] - fp32["a0"]).to_numpy()  # what α reads: the change along the update
    assert np.corrcoef(step, (bf16["a1"] - bf16["a0"]).to_numpy())[0, 1] > 0.999
    with pytest.raises(ValueError, match="eager"):
        attention_stats(tiny_family["lrm"], projected, path, AttentionParams(mode="eager"), tmp_path / "e.parquet",
                        tmp_path / "e.json", runtime=RuntimeParams(device="cpu", dtype="bfloat16"))
    assert not (tmp_path / "e.parquet").exists()
    with pytest.raises(ValueError, match="attention.mode 'eager'"):  # and params.yaml saying so, when it is parsed
        Params.model_validate({"runtime": {"dtype": "bfloat16"}, "attention": {"mode": "eager"}})
    assert pick_mode("auto", read_shape(tiny_family["lrm"]), 64, dtype=torch.bfloat16) == "recompute"
