"""Stage 1 features: Ω location, constraint rows against captures and eager attention, both storage paths, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from rain_dev.tiny import CHAT_TEMPLATE, make_family, reasoning_rows, write_jsonl
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from rain_tasks.io.arch import read_shape
from rain_tasks.model.calibration import load_tokenizer, think_token_ids
from rain_tasks.model.capture import LayerCapture, forward_with_hooks
from rain_tasks.io.checkpoint import load_tensors, read_metadata
from rain_tasks.stage1.features import RowAccumulator, accumulate_features, key_positions, layer_chunks, prepare_reasoning_samples
from rain_tasks.params import FeaturesParams
from rain_tasks.io.schemas import load_records
from rain_tasks.io.artifacts import layer_file


def test_omega_sits_on_the_tags_with_and_without_a_template_that_opens_think(tiny_family, tmp_path):
    think_template = CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
    opened = make_family(tmp_path, layers=1, chat_template=think_template)
    records = load_records(tiny_family["reasoning"], "reasoning")
    for model_dir in (tiny_family["lrm"], opened["lrm"]):
        tok = load_tokenizer(model_dir)
        open_id, close_id = think_token_ids(tok)
        samples, skipped = prepare_reasoning_samples(records, tok, FeaturesParams(neighbour_radius=3))
        assert skipped == 0 and len(samples) == len(records)
        for s in samples:
            ids = s.input_ids.tolist()
            o, c = ids.index(open_id), ids.index(close_id)
            assert s.omega == [o, o + 1, o + 2, o + 3, c - 3, c - 2, c - 1, c]


def test_key_positions_take_the_smallest_set_holding_the_mass():
    probs = torch.tensor([[[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]]])  # 1 head, 2 rows
    assert key_positions(probs, 0.5).tolist() == [0, 3]
    assert key_positions(probs, 0.75).tolist() == [0, 1, 3]
    assert key_positions(probs, 1.0).tolist() == [0, 1, 2, 3]


def test_row_accumulator_keeps_rows_below_the_width_then_switches_to_the_gram():
    x = torch.randn(9, 5, dtype=torch.float64)
    acc = RowAccumulator(5)
    acc.add(x[:4])
    kind, t = acc.result()
    assert kind == "rows" and torch.equal(t, x[:4])
    acc.add(x[4:])
    kind, t = acc.result()
    assert kind == "gram" and acc.n == 9
    torch.testing.assert_close(t, x.T @ x)
    forced = RowAccumulator(5, low_rank=False)
    forced.add(x[:2])
    assert forced.result()[0] == "gram"


#: query heads reading each KV head, written out by hand (query head h reads KV head h // n_rep): with 6 query heads
#: over 2 KV heads n_rep = 3 differs from the KV head count, so a g·num_kv_heads slip cannot pass
GROUPS = {4: ([0, 1], [2, 3]), 6: ([0, 1, 2], [3, 4, 5])}


@pytest.fixture(scope="module", params=[4, 6], ids=["4q2kv", "6q2kv"])
def family(request, tiny_family, tmp_path_factory):
    """The shared 4/2-head family, or a 6/2-head one (hidden 48), each with its reasoning rows."""
    if request.param == 4:
        return tiny_family
    root = tmp_path_factory.mktemp("fam6")
    return {**make_family(root, hidden=48, heads=6, kv_heads=2), "reasoning": write_jsonl(root / "r.jsonl", reasoning_rows())}


@pytest.fixture(scope="module")
def one_sample(family, tmp_path_factory):
    """Features of the first reasoning sample on the low-rank and the Gram path."""
    root = tmp_path_factory.mktemp("features")
    params = FeaturesParams(max_samples=1)
    for path in ("rows", "gram"):
        accumulate_features(family["lrm"], family["reasoning"], params, root / path, low_rank=path == "rows")
    return root, params


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)


def test_rows_are_the_constraints_that_method_md_defines(family, one_sample):
    root, params = one_sample
    tok = load_tokenizer(family["lrm"])
    sample = prepare_reasoning_samples(load_records(family["reasoning"], "reasoning")[:1], tok, params)[0][0]
    model = AutoModelForCausalLM.from_pretrained(family["lrm"], dtype=torch.float32, attn_implementation="eager")
    heads = model.config.num_attention_heads
    caps: list[LayerCapture] = []
    forward_with_hooks(model, sample.input_ids, caps.append)
    with torch.no_grad():
        attentions = model(sample.input_ids[None], output_attentions=True).attentions
    om = sample.omega
    for cap in caps:
        feats = load_tensors(layer_file(root / "rows", cap.layer))
        torch.testing.assert_close(feats["rows.q"], _ones(cap.attn_in[om]))  # Qwen2 q has a bias
        heads_out = cap.attn_out[om].double().reshape(len(om), heads, -1)  # o_proj is constrained head by head
        for h in range(heads):  # |Ω| exceeds a head's width 8: the set is kept as its Gram
            assert f"rows.o.h{h}" not in feats and heads_out.shape[0] > heads_out.shape[2]
            torch.testing.assert_close(feats[f"gram.o.h{h}"], heads_out[:, h].T @ heads_out[:, h])
        torch.testing.assert_close(feats["rows.mlp_in"], cap.mlp_in[om].double())
        torch.testing.assert_close(feats["rows.down"], cap.mlp_act[om].double())
        a = attentions[cap.layer][0][:, om].double()  # [heads, |Ω|, T]
        for g, group in enumerate(GROUPS[heads]):
            want = _ones(torch.cat([a[h] @ cap.attn_in.double() for h in group]))
            torch.testing.assert_close(feats[f"rows.v.g{g}"], want, rtol=1e-5, atol=1e-6)
            keys = _ones(cap.attn_in[key_positions(a[group].float(), params.key_mass)])
            gram = load_tensors(layer_file(root / "gram", cap.layer))[f"gram.k.g{g}"]
            torch.testing.assert_close(gram, keys.T @ keys, rtol=1e-5, atol=1e-6)


def test_gram_path_equals_the_rows_path_and_metadata_counts(one_sample, family):
    root, _ = one_sample
    shape = read_shape(family["lrm"])
    for layer in range(shape.num_layers):
        rows, gram = load_tensors(layer_file(root / "rows", layer)), load_tensors(layer_file(root / "gram", layer))
        meta = read_metadata(layer_file(root / "gram", layer))
        counts, dims = json.loads(meta["rows"]), json.loads(meta["dims"])
        assert meta["samples"] == "1" and meta["skipped"] == "0"
        assert set(counts) == {"q", "mlp_in", "down", "k.g0", "k.g1", "v.g0", "v.g1"} | {f"o.h{h}" for h in range(shape.num_heads)}
        for name, n in counts.items():
            g = gram[f"gram.{name}"]
            assert g.shape == (dims[name], dims[name]) and g.dtype == torch.float64
            x = rows.get(f"rows.{name}")
            if x is not None:
                assert x.shape == (n, dims[name])
                torch.testing.assert_close(g, x.T @ x)
    manifest = json.loads((root / "rows" / "manifest.json").read_text())
    assert manifest["shape"]["num_kv_heads"] == 2 and manifest["num_layers"] == shape.num_layers


def test_layer_chunks_under_a_small_budget_give_the_same_features(tiny_family, tmp_path):
    assert layer_chunks([0, 1, 2], per_layer=10, budget=25) == [[0, 1], [2]]
    params = FeaturesParams(max_samples=2)
    accumulate_features(tiny_family["lrm"], tiny_family["reasoning"], params, tmp_path / "a")
    accumulate_features(tiny_family["lrm"], tiny_family["reasoning"], params, tmp_path / "b", memory_budget_bytes=1)
    for layer in range(2):
        a, b = load_tensors(layer_file(tmp_path / "a", layer)), load_tensors(layer_file(tmp_path / "b", layer))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_long_samples_are_skipped_and_counted(tiny_family, tmp_path):
    rows = reasoning_rows(2)
    rows[1]["reasoning"] = " ".join(["step"] * 60)
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    accumulate_features(tiny_family["lrm"], path, FeaturesParams(max_tokens=50), tmp_path / "f")
    assert read_metadata(layer_file(tmp_path / "f", 0))["skipped"] == "1"


def test_refuses_tags_inside_the_reasoning(tiny_family, tmp_path):
    rows = reasoning_rows(2)
    rows[1]["reasoning"] += " </think> 3"
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(ValueError, match="sample 1: .*exactly one <think> and one </think>"):
        accumulate_features(tiny_family["lrm"], path, FeaturesParams(), tmp_path / "f")


def test_refuses_a_tokenizer_without_think_tokens(tiny_family, tmp_path):
    model_dir = shutil.copytree(tiny_family["lrm"], tmp_path / "lrm")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", chat_template=CHAT_TEMPLATE).save_pretrained(model_dir)
    with pytest.raises(ValueError, match="no single token for '<think>'"):
        accumulate_features(model_dir, tiny_family["reasoning"], FeaturesParams(), tmp_path / "f")


def test_refuses_an_unknown_architecture(tiny_family, tmp_path):
    model_dir = shutil.copytree(tiny_family["lrm"], tmp_path / "lrm")
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        accumulate_features(model_dir, tiny_family["reasoning"], FeaturesParams(), tmp_path / "f")
