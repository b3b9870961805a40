"""Hooks and recomputed attention rows against an independent eager forward (Qwen2 with biases, Llama)."""

from __future__ import annotations

import pytest
import torch
from rain_dev.tiny import make_family
from transformers import AutoModelForCausalLM

from rain_tasks.model.capture import LayerCapture, attention_probs, forward_with_hooks


@pytest.fixture(scope="module")
def models(tiny_family, tmp_path_factory) -> dict[str, torch.nn.Module]:
    """The tiny Qwen2 LRM and a Llama variant with 8 heads over 2 KV heads (n_rep 4)."""
    llama = make_family(tmp_path_factory.mktemp("llama"), model_type="llama", heads=8, kv_heads=2, seed=3)
    return {name: _load(path) for name, path in (("qwen2", tiny_family["lrm"]), ("llama", llama["lrm"]))}


def _load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _ids(model: torch.nn.Module, T: int = 23) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (T,), generator=torch.Generator().manual_seed(T))


def _captures(model, ids, layers=None) -> list[LayerCapture]:
    out: list[LayerCapture] = []
    forward_with_hooks(model, ids, out.append, layers=layers)
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_captures_equal_a_manual_forward_of_the_submodules(models, arch):
    model = models[arch]
    ids = _ids(model)
    caps = _captures(model, ids)
    assert [c.layer for c in caps] == list(range(model.config.num_hidden_layers))
    with torch.no_grad():
        ref = model(ids[None], output_hidden_states=True, output_attentions=True)
    for cap in caps:
        layer = model.model.layers[cap.layer]
        attn = layer.self_attn
        h = ref.hidden_states[cap.layer][0]
        with torch.no_grad():
            attn_in = layer.input_layernorm(h)
            v = attn.v_proj(attn_in).view(len(ids), -1, attn.head_dim).repeat_interleave(attn.num_key_value_groups, dim=1)
            attn_out = torch.einsum("hts,shd->thd", ref.attentions[cap.layer][0], v).reshape(len(ids), -1)
            mlp_in = layer.post_attention_layernorm(h + attn.o_proj(attn_out))
            mlp_act = layer.mlp.act_fn(layer.mlp.gate_proj(mlp_in)) * layer.mlp.up_proj(mlp_in)
        for got, want in ((cap.attn_in, attn_in), (cap.attn_out, attn_out), (cap.mlp_in, mlp_in), (cap.mlp_act, mlp_act)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_attention_probs_equal_eager_weights_at_the_rows(models, arch):
    model = models[arch]
    ids = _ids(model, 31)
    rows = [0, 5, 17, 30]
    probs: dict[int, torch.Tensor] = {}
    forward_with_hooks(model, ids, lambda c: probs.__setitem__(c.layer, attention_probs(model, c.layer, c.attn_in, rows)))
    with torch.no_grad():
        ref = model(ids[None], output_attentions=True).attentions
    for layer, p in probs.items():
        assert p.shape == (model.config.num_attention_heads, len(rows), len(ids)) and p.dtype == torch.float32
        torch.testing.assert_close(p, ref[layer][0][:, rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2]))


def test_layer_subset_stops_early_and_matches_the_full_capture(models):
    model = models["qwen2"]
    ids = _ids(model)
    full, sub = _captures(model, ids), _captures(model, ids, layers=[0])
    assert [c.layer for c in sub] == [0]
    torch.testing.assert_close(sub[0].mlp_act, full[0].mlp_act, rtol=0, atol=0)


def test_refuses_a_batch(models):
    with pytest.raises(ValueError, match="batch 1"):
        forward_with_hooks(models["qwen2"], torch.zeros(2, 4, dtype=torch.long), lambda c: None)
