"""ReasonAny: gradient scores against a manual autograd loop, exact global thresholds, disjoint masks, the merge rules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rain_dev.tiny import instruction_rows, make_tokenizer, reasoning_rows
from rain_tasks.data_aware.reasonany import (
    DOMAIN,
    REASONING,
    SWEEPS,
    ReasonAnyParams,
    ScoreDir,
    accumulate_gradient_scores,
    bottom_threshold,
    compute_masks,
    kth_smallest,
    reasonany_method,
    sample_ids,
    score_sweep,
    sweep_sequences,
    tensor_masks,
    top_threshold,
    write_tensor_dir,
)
from rain_tasks.io.checkpoint import Checkpoint, load_tensors
from rain_tasks.io.schemas import load_records
from rain_tasks.merge.engine import DeltaPlan, TensorDir, merge_checkpoint
from rain_tasks.methods import METHODS, TensorInputs
from rain_tasks.methods.reasonany import merge_into_lrm, merge_native
from rain_tasks.model.calibration import load_tokenizer

GEN = torch.Generator().manual_seed(0)


def _load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _samples(family, rows, n: int = 3) -> list[torch.Tensor]:
    tok = load_tokenizer(family["base"])
    return [sample_ids(tok, r, 512) for r in rows[:n]]


def test_scores_equal_a_manual_per_sample_autograd_loop(tiny_family, tmp_path):
    samples = _samples(tiny_family, reasoning_rows()) + _samples(tiny_family, instruction_rows(), 2)
    model = _load(tiny_family["base"])
    got = accumulate_gradient_scores(model, samples, accumulate_on="cpu")
    assert all(p.grad is None for p in model.parameters())  # every grad was freed once added
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ids in samples:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids[None], labels=ids[None]).loss.backward()
        for n, p in model.named_parameters():
            want[n] += p.grad.abs() / len(samples)
    assert sorted(got) == sorted(want) and "model.embed_tokens.weight" in got  # tied lm_head: one tensor
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-9)
    manifest = score_sweep(tiny_family["base"], samples, ReasonAnyParams(saliency="snip"), tmp_path / "snip")
    snip = ScoreDir(manifest.parent)
    again = score_sweep(tiny_family["base"], samples, ReasonAnyParams(saliency="snip"), tmp_path / "again")
    for f in sorted(manifest.parent.glob("*.safetensors")):
        assert f.read_bytes() == (again.parent / f.name).read_bytes()  # bit-identical reruns
    ckpt = Checkpoint(tiny_family["base"])
    for n in want:
        torch.testing.assert_close(snip.get(n), want[n] * ckpt.get(n).abs(), rtol=1e-5, atol=1e-9)


def test_sample_text_is_prompt_eos_response():
    tok = make_tokenizer()
    ids = sample_ids(tok, {"prompt": "add 1 and 2", "response": "answer is 3"}, 512)
    assert tok.convert_ids_to_tokens(ids.tolist()) == ["add", "1", "and", "2", "<|im_end|>", "answer", "is", "3"]
    think = sample_ids(tok, {"prompt": "add", "reasoning": "so", "response": "3"}, 512)
    assert tok.convert_ids_to_tokens(think.tolist()) == ["add", "<|im_end|>", "<think>", "so", "</think>", "3"]
    assert len(sample_ids(tok, {"prompt": "a a a a a", "response": "a a a"}, 4)) == 4
    rows = reasoning_rows(5)
    seqs = sweep_sequences(tok, rows, ReasonAnyParams(max_samples=3, max_tokens=6))
    assert len(seqs) == 3 and all(len(s) == 6 for s in seqs) and torch.equal(seqs[1], sample_ids(tok, rows[1], 6))


def _parts(values: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(values.split(sizes))


@pytest.mark.parametrize("bins,max_exact", [(4, 10), (64, 50), (4096, 10**9)])
def test_kth_smallest_is_exact_with_ties_and_zeros(bins, max_exact):
    values = torch.cat([torch.rand(700, generator=GEN) ** 4, torch.zeros(200), torch.full((50,), 0.25), torch.rand(50, generator=GEN)])
    values = values[torch.randperm(values.numel(), generator=GEN)]
    parts = _parts(values, [300, 1, 449, 250])
    ordered = values.sort().values
    for k in (1, 150, 200, 201, 333, 620, 777, 999, 1000):
        got = kth_smallest(lambda: iter(parts), k, bins, max_exact)
        assert got == float(ordered[k - 1]), k
        q = torch.quantile(values.double(), (k - 1) / (values.numel() - 1), interpolation="lower")
        assert got == float(q)  # the same order statistic as torch.quantile's 'lower' rule
    with pytest.raises(ValueError, match="outside"):
        kth_smallest(lambda: iter(parts), 1001)


def test_top_and_bottom_sets_have_floor_pn_elements_without_ties():
    values = torch.randn(997, generator=GEN).abs()
    parts = _parts(values, [500, 497])
    for p in (0.0, 0.01, 0.05, 0.5, 1.0):
        k = math.floor(p * values.numel())
        tau = top_threshold(lambda: iter(parts), values.numel(), p, 8, 20)
        tau_b = bottom_threshold(lambda: iter(parts), values.numel(), p, 8, 20)
        assert int((values >= tau).sum()) == k and int((values <= tau_b).sum()) == k


def _score_dirs(tmp_path, shapes: dict[str, tuple[int, ...]], offsets: dict[str, dict[str, float]] | None = None) -> dict[str, object]:
    """Four random sweeps over the same tensors (positive scores, no ties, plus per sweep and tensor `offsets`)."""
    dirs = {}
    for i, key in enumerate(SWEEPS):
        g = torch.Generator().manual_seed(10 + i)
        shift = (offsets or {}).get(key, {})
        tensors = {n: torch.rand(s, generator=g) + 1e-3 + shift.get(n, 0.0) for n, s in shapes.items()}
        write_tensor_dir(tensors, tmp_path / key, {"kind": "grad_scores"})
        dirs[key] = tmp_path / key
    return dirs


SHAPES = {"model.embed_tokens.weight": (20, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
          "model.layers.0.self_attn.q_proj.bias": (8,), "model.layers.1.mlp.down_proj.weight": (8, 12),
          "model.norm.weight": (8,)}


@pytest.mark.parametrize("granularity", ["element", "tensor"])
def test_masks_are_disjoint_and_follow_the_global_thresholds(tmp_path, granularity):
    dirs = _score_dirs(tmp_path, SHAPES)
    params = ReasonAnyParams(p_domain=0.3, p_reasoning=0.4, granularity=granularity, bins=4, max_exact=16)
    manifest = compute_masks(dirs, params, tmp_path / "masks")
    meta = json.loads(manifest.read_text())
    scores = {key: load_all(dirs[key]) for key in SWEEPS}
    flat = {key: torch.cat([scores[key][n].reshape(-1) for n in sorted(SHAPES)]) for key in SWEEPS}
    n_all = flat[DOMAIN].numel()
    thresholds = json.loads(meta["thresholds"])
    for key in SWEEPS:  # exact order statistics of the pooled scores
        k = math.floor((params.p_domain if key.startswith(DOMAIN) else params.p_reasoning) * n_all)
        want = flat[key].sort(descending=key.startswith(DOMAIN)).values[k - 1]
        assert thresholds[key] == float(want), key
    dom, rea = load_all(tmp_path / "masks" / DOMAIN), load_all(tmp_path / "masks" / REASONING)
    assert sorted(dom) == sorted(SHAPES)
    for n, shape in SHAPES.items():
        m_x, m_r = dom[n].expand(shape), rea[n].expand(shape)
        assert not bool((m_x & m_r).any())
        top = (scores[DOMAIN][n] >= thresholds[DOMAIN]) & (scores["domain_base"][n] >= thresholds["domain_base"])
        bot = (scores[REASONING][n] <= thresholds[REASONING]) & (scores["reasoning_base"][n] <= thresholds["reasoning_base"])
        if granularity == "tensor":
            assert dom[n].dim() == 0
            tx = bool((scores[DOMAIN][n] >= thresholds[DOMAIN]).any()) and bool((scores["domain_base"][n] >= thresholds["domain_base"]).any())
            tr = bool((scores[REASONING][n] <= thresholds[REASONING]).any()) and bool((scores["reasoning_base"][n] <= thresholds["reasoning_base"]).any())
            assert bool(dom[n]) == (tx and not tr) and bool(rea[n]) == (tr and not tx)
        else:
            assert torch.equal(m_x, top & ~bot) and torch.equal(m_r, bot & ~top)
    linear = compute_masks(dirs, params.model_copy(update={"scope": "linear"}), tmp_path / "linear")
    assert sorted(load_all(linear.parent / DOMAIN)) == sorted(n for n in SHAPES if ".layers." in n and "proj" in n)


def load_all(directory) -> dict[str, torch.Tensor]:
    return {n: t for f in sorted(directory.glob("*.safetensors")) for n, t in load_tensors(f).items()}


def test_sweeps_that_disagree_are_refused_before_any_pass(tmp_path):
    dirs = _score_dirs(tmp_path, SHAPES)
    write_tensor_dir({"model.norm.weight": torch.ones(8)}, tmp_path / "other", {})
    with pytest.raises(ValueError, match="reasoning_base"):
        compute_masks({**dirs, "reasoning_base": tmp_path / "other"}, ReasonAnyParams(), tmp_path / "m")
    with pytest.raises(ValueError, match="missing"):
        compute_masks({DOMAIN: dirs[DOMAIN]}, ReasonAnyParams(), tmp_path / "m")


def _triplet(shape=(6, 5)):
    base = torch.randn(shape, generator=GEN)
    return base, base + 0.1 * torch.randn(shape, generator=GEN), 0.1 * torch.randn(shape, generator=GEN)  # θ_B, θ_R, Δ_I


def test_merged_minus_base_is_lambda_delta_on_the_masks_and_zero_elsewhere():
    base, lrm, delta_i = _triplet()
    scores = {k: torch.rand(base.shape, generator=GEN) for k in SWEEPS}
    params = ReasonAnyParams(p_domain=0.3, p_reasoning=0.3, granularity="element")
    m_x, m_r = tensor_masks(scores, {DOMAIN: 0.5, "domain_base": 0.4, REASONING: 0.5, "reasoning_base": 0.6}, params)
    assert m_x.any() and m_r.any() and not (m_x & m_r).any()
    out = merge_native(base, delta_i, lrm - base, m_x, m_r, 0.7, 1.3)
    torch.testing.assert_close((out - base)[m_x], 0.7 * delta_i[m_x], rtol=0, atol=1e-6)
    torch.testing.assert_close((out - base)[m_r], 1.3 * (lrm - base)[m_r], rtol=0, atol=1e-6)
    assert torch.equal(out[~(m_x | m_r)], base[~(m_x | m_r)])
    ours = merge_into_lrm(lrm, delta_i, m_x, 0.7)
    assert torch.equal(ours[~m_x], lrm[~m_x]) and torch.equal(ours[m_r], lrm[m_r])  # M_R stays θ_R exactly
    torch.testing.assert_close((ours - lrm)[m_x], 0.7 * delta_i[m_x], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="disjoint"):
        merge_native(base, delta_i, lrm - base, m_x, m_x, 1.0, 1.0)


def test_p_r_one_p_x_zero_lambda_one_returns_the_lrm(tmp_path):
    dirs = _score_dirs(tmp_path, SHAPES)
    compute_masks(dirs, ReasonAnyParams(p_domain=0.0, p_reasoning=1.0, granularity="element"), tmp_path / "masks")
    native = reasonany_method(tmp_path / "masks", "native")
    ours = reasonany_method(tmp_path / "masks", "lrm")
    p = {"lam_domain": 1.0, "lam_reasoning": 1.0}
    for name, shape in SHAPES.items():
        base, lrm, delta_i = _triplet(shape)
        x = TensorInputs(name, lrm, delta_i, None, base)
        torch.testing.assert_close(native(x, p), lrm, rtol=0, atol=1e-6)
        assert torch.equal(ours(x, p), lrm)  # every weight is in M_R: θ_R exactly
    with pytest.raises(ValueError, match="base checkpoint"):
        native(TensorInputs("model.norm.weight", lrm, delta_i, None, None), p)


def test_tensor_granularity_merges_whole_tensors_in_both_directions(tmp_path):
    q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    high = {n: 0.0 if n == down else 1.0 for n in SHAPES}  # the reasoning sweeps' lowest scores all lie in down_proj
    offsets = {DOMAIN: {q: 1.0}, "domain_base": {q: 1.0}, REASONING: high, "reasoning_base": high}
    dirs = _score_dirs(tmp_path, SHAPES, offsets)
    params = ReasonAnyParams(p_domain=0.1, p_reasoning=0.1, granularity="tensor")
    compute_masks(dirs, params, tmp_path / "masks")
    dom, rea = load_all(tmp_path / "masks" / DOMAIN), load_all(tmp_path / "masks" / REASONING)
    assert {n for n, m in dom.items() if bool(m)} == {q} and {n for n, m in rea.items() if bool(m)} == {down}
    p = {"lam_domain": 0.5, "lam_reasoning": 2.0}
    native, ours = reasonany_method(tmp_path / "masks", "native"), reasonany_method(tmp_path / "masks", "lrm")
    for name, shape in SHAPES.items():
        base, lrm, delta_i = _triplet(shape)
        x = TensorInputs(name, lrm, delta_i, None, base)
        want = base + 0.5 * delta_i if bool(dom[name]) else base + 2.0 * (lrm - base) if bool(rea[name]) else base
        torch.testing.assert_close(native(x, p), want, rtol=0, atol=1e-6)
        assert torch.equal(ours(x, p), lrm + 0.5 * delta_i if bool(dom[name]) else lrm)


def test_tiny_family_end_to_end_through_the_merge_engine(tiny_family, tiny_task_vectors, tmp_path, monkeypatch):
    """Four real sweeps, element masks, and the native merge streamed by the engine: merged − base = Δ on the masks."""
    params = ReasonAnyParams(p_domain=0.05, p_reasoning=0.05, granularity="element", bins=16, max_exact=1000)
    tok = load_tokenizer(tiny_family["base"])
    data = {key: sweep_sequences(tok, load_records(tiny_family[key], key), params) for key in ("instruction", "reasoning")}
    dirs = {key: score_sweep(tiny_family[model], data[dataset], params, tmp_path / key).parent
            for key, (model, dataset) in SWEEPS.items()}
    compute_masks(dirs, params, tmp_path / "masks")
    method = reasonany_method(tmp_path / "masks", "native")
    assert method.needs_base and not reasonany_method(tmp_path / "masks", "lrm").needs_base
    assert list(method.params.model_fields) == ["lam_domain", "lam_reasoning"] and method.doc.startswith("θ_B")
    monkeypatch.setitem(METHODS, "reasonany", method)
    plan = DeltaPlan(TensorDir(tiny_task_vectors), TensorDir(tiny_task_vectors), base=Checkpoint(tiny_family["base"]))
    merge_checkpoint(tiny_family["lrm"], tmp_path / "merged", "reasonany", {"lam_domain": 1.0, "lam_reasoning": 1.0}, plan)
    out, base, itm, lrm = (Checkpoint(p) for p in (tmp_path / "merged", tiny_family["base"], tiny_family["itm"], tiny_family["lrm"]))
    dom, rea = load_all(tmp_path / "masks" / DOMAIN), load_all(tmp_path / "masks" / REASONING)
    assert sum(int(m.sum()) for m in dom.values()) > 0 and sum(int(m.sum()) for m in rea.values()) > 0
    for name in base.names():
        b, got = base.get(name), out.get(name)
        m_x, m_r = dom[name], rea[name]
        torch.testing.assert_close((got - b)[m_x], (itm.get(name) - b)[m_x], rtol=0, atol=1e-6)
        torch.testing.assert_close((got - b)[m_r], (lrm.get(name) - b)[m_r], rtol=0, atol=1e-6)
        assert torch.equal(got[~(m_x | m_r)], b[~(m_x | m_r)]), name
