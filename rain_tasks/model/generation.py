"""Batched generation (greedy or sampled) of single-turn chat replies; rain_tasks.evaluate.behaviour scores them.

Templates differ in who writes `<think>`: Qwen-style templates leave it to the model, DeepSeek-R1-Distill's
ends the generation prompt in `<think>\\n` so the model starts inside the block. `generate` returns the
model's whole turn in both cases (the template's `<think>` put back in front), so parsing, the think rate,
the `</think>` missing rate and the instruction checkers (which read only the answer after `</think>`)
mean the same for both styles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rain_tasks.model.calibration import THINK_OPEN, load_tokenizer
from rain_tasks.model.runtime import input_device, load_causal_lm
from rain_tasks.params import RuntimeParams



def load_model(path: str | Path, runtime: RuntimeParams | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local checkpoint with eager attention on `runtime`'s device and dtype, in eval mode, with its tokenizer."""
    return load_causal_lm(path, runtime), load_tokenizer(path)


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn: greedy (temperature 0) or sampled with top-p, `num_samples` replies per prompt."""

    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0

    def generate_kwargs(self) -> dict:
        """Keyword arguments of `model.generate` for this sampling."""
        if self.temperature <= 0:
            return {"do_sample": False, "num_return_sequences": self.num_samples}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "num_return_sequences": self.num_samples}


GREEDY = Sampling()


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """A single-turn chat prompt with the generation prompt (which an R1-style template ends in `<think>`)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def opens_think(prompt_text: str) -> bool:
    """True when the template opened the thinking block itself (DeepSeek-R1-Distill: the prompt ends in `<think>\\n`)."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


def whole_turn(prompt_text: str, continuation: str) -> str:
    """The model's turn as scored: the continuation, behind the `<think>` the template wrote if it opened the block."""
    return f"{THINK_OPEN}\n{continuation}" if opens_think(prompt_text) else continuation


@torch.no_grad()
def generate_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                 batch_size: int = 64, sampling: Sampling = GREEDY, reply_prefix: str = "") -> list[tuple[list[int], list[int]]]:
    """Replies to single-turn chat prompts (left padding, batched on the model's device): per reply, prompt-major with
    `sampling.num_samples` per prompt, the rendered prompt's ids and the generated ids up to the first stop token.

    `reply_prefix` is written at the start of every assistant reply (e.g. an empty, closed thinking block) and only
    the continuation after it is generated.
    """
    stop_ids = model.generation_config.eos_token_id
    stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids]) - {None}
    device = input_device(model)
    outputs: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(prompts), batch_size):
        texts = [chat_prompt(tokenizer, p) + reply_prefix for p in prompts[start:start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
        torch.manual_seed(sampling.seed + start)  # sampled replies are reproducible batch by batch
        generated = model.generate(
            **enc, max_new_tokens=max_new_tokens, **sampling.generate_kwargs(),
            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop_ids) or None,
        )
        rendered = [[t for t, m in zip(ids, mask) if m]
                    for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())]
        for n, row in enumerate(generated[:, enc["input_ids"].shape[1]:].tolist()):
            ids = []
            for tok in row:
                if tok in stop_ids:
                    break
                ids.append(tok)
            outputs.append((rendered[n // sampling.num_samples], ids))
    return outputs


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
             batch_size: int = 64, sampling: Sampling = GREEDY, reply_prefix: str = "") -> list[str]:
    """Replies as text (`generate_ids`), keeping <think> tags visible. Where the template opened the thinking block
    itself, the reply is prefixed with that `<think>`, so every reply reads as the model's whole turn whichever
    template style produced it (after `reply_prefix`, only the continuation)."""
    texts = [chat_prompt(tokenizer, p) + reply_prefix for p in prompts]
    replies = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, sampling, reply_prefix)
    return [whole_turn(texts[n // sampling.num_samples],
                       tokenizer.decode([t for t in ids if t != tokenizer.pad_token_id], skip_special_tokens=False))
            for n, (_, ids) in enumerate(replies)]
