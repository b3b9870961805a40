"""Tiny generated checkpoints for unit tests: random Qwen2/Llama triplets (base, ITM, LRM) in seconds.

Unlike the trained zoo, these have no skills; they exercise shapes, GQA, biases, shards and
file formats. The ITM and LRM are the base plus small seeded perturbations, like real fine-tunes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
WORDS = (
    "user assistant add sub then and plus minus is answer . write in uppercase end with DONE repeat twice "
    "[ ] the a of to so we need first next result ANSWER IS question think step hello world"
).split() + [str(i) for i in range(101)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with think tokens and a Qwen-style chat template."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        padding_side="left",
        chat_template=chat_template,
    )


def make_family(
    root: Path,
    *,
    model_type: str = "qwen2",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 48,
    seed: int = 0,
    delta_scale: float = 0.02,
    dtype: torch.dtype = torch.float32,
    chat_template: str = CHAT_TEMPLATE,
) -> dict[str, Path]:
    """Write base/itm/lrm checkpoints (≥ 2 shards each) and the tokenizer under `root`."""
    tok = make_tokenizer(chat_template)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation="eager",
    )
    if model_type == "llama":
        cfg.attention_bias = False
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(cfg).to(dtype)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = {}
    for i, name in enumerate(("base", "itm", "lrm")):
        gen = torch.Generator().manual_seed(seed * 100 + i)
        for k, v in base.state_dict().items():
            noise = torch.randn(v.shape, generator=gen) * delta_scale * (0 if name == "base" else 1)
            v.copy_((state[k].float() + noise).to(dtype))
        out = root / name
        total_kb = sum(t.numel() * t.element_size() for t in state.values()) // 1000
        base.save_pretrained(out, max_shard_size=f"{max(1, total_kb // 3)}KB")
        tok.save_pretrained(out)
        paths[name] = out
    return paths


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reasoning_rows(n: int = 6) -> list[dict]:
    """Small reasoning calibration rows in the published schema."""
    return [
        {
            "prompt": f"add {i} and {i + 1} then sub 1 .",
            "reasoning": f"{i} plus {i + 1} is {2 * i + 1} . {2 * i + 1} minus 1 is {2 * i} .",
            "response": f"answer is {2 * i}",
            "source": "tiny",
            "num_tokens": 30,
            "sample_id": f"r{i}",
        }
        for i in range(1, n + 1)
    ]


def instruction_rows(n: int = 6) -> list[dict]:
    """Small instruction calibration rows in the published schema (spans occur verbatim)."""
    rows = []
    for i in range(1, n + 1):
        prompt = f"add {i} and 2 then sub 1 . end with DONE"
        response = f"answer is {i + 1} DONE"
        rows.append(
            {
                "id": i,
                "prompt": prompt,
                "reason": f"{i} plus 2 is {i + 2} . {i + 2} minus 1 is {i + 1} .",
                "response": response,
                "instruction_id_list": ["startend:end_checker"],
                "instruction_list": ["end with DONE"],
                "related_prompt_list": [
                    {
                        "instruction_id": "startend:end_checker",
                        "normalized": {"type": "startend", "args": {"end_phrase": "DONE"}},
                        "prompt_spans": ["end with DONE"],
                        "response_spans": ["DONE"],
                    }
                ],
                "unrelated_response_spans": [f"answer is {i + 1}"] if i % 2 else [],
                "verdict": {"startend:end_checker": True},
                "meta": {},
            }
        )
    return rows
