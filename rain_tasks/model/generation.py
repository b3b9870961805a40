"""Batched generation (greedy or sampled), output parsing and behaviour metrics (think format, accuracy, compliance).

Templates differ in who writes `<think>`: Qwen-style templates leave it to the model, DeepSeek-R1-Distill's
ends the generation prompt in `<think>\\n` so the model starts inside the block. `generate` returns the
model's whole turn in both cases (the template's `<think>` put back in front), so parsing, the think rate,
the `</think>` missing rate and the instruction checkers (which read only the answer after `</think>`)
mean the same for both styles.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rain_tasks.evaluate import instructions
from rain_tasks.model.calibration import load_tokenizer
from rain_tasks.io.checkpoint import load_causal_lm
from rain_tasks.params import RuntimeParams
from rain_tasks.model.runtime import input_device

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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


@dataclass(frozen=True)
class ParsedOutput:
    """A generation split into its thinking block and final answer."""

    opened_think: bool
    closed_think: bool
    reasoning: str
    answer: str


def parse_output(text: str) -> ParsedOutput:
    """Split at <think>/</think>; an opened, unclosed block (truncated) has an empty answer."""
    open_at = text.find(THINK_OPEN)
    if open_at < 0:
        return ParsedOutput(False, False, "", text.strip())
    body = text[open_at + len(THINK_OPEN):]
    close_at = body.find(THINK_CLOSE)
    if close_at < 0:
        return ParsedOutput(True, False, body.strip(), "")
    return ParsedOutput(True, True, body[:close_at].strip(),
                        body[close_at + len(THINK_CLOSE):].strip())


def extract_answer_number(answer_text: str) -> str | None:
    """The number N of the first 'answer is N' statement (any case, any wrapping), else None."""
    match = instructions.ANSWER_STATEMENT.search(answer_text)
    return str(int(match.group(1))) if match else None


def behaviour_metrics(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      eval_rows: list[dict], max_new_tokens: int, batch_size: int = 64, sampling: Sampling = GREEDY) -> dict:
    """Behaviour on instruction-eval rows from generations within `max_new_tokens` (rates over all samples).

    think/close: the reply opens `<think>` / closes it within the budget (a truncated thinking
    block counts as missing `</think>`); correct: 'answer is N' after the block is right;
    comply_rate: IFEval prompt-level strict accuracy (every instruction of the prompt followed);
    comply_instruction_rate: instruction-level strict accuracy (over all instructions of all prompts);
    close_correct_rate: the reply closes `</think>` and is correct (the reasoning survived the merge);
    close_correct_comply_rate: share of replies that close `</think>`, are correct and comply, all three at once.
    """
    texts = generate(model, tokenizer, [r["prompt"] for r in eval_rows], max_new_tokens, batch_size, sampling)
    return score_outputs([r for r in eval_rows for _ in range(sampling.num_samples)], texts)


def score_outputs(eval_rows: list[dict], texts: list[str]) -> dict:
    """The behaviour metrics of generations `texts` (one per eval row); see `behaviour_metrics`."""
    per_id: dict[str, list[bool]] = defaultdict(list)
    think = close = correct = comply = close_correct = joint = 0
    for row, text in zip(eval_rows, texts, strict=True):
        parsed = parse_output(text)
        ok = [instructions.check(iid, parsed.answer, kw, row["prompt"])
              for iid, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True)]
        for iid, passed in zip(row["instruction_id_list"], ok):
            per_id[iid].append(passed)
        think += parsed.opened_think
        close += parsed.closed_think
        right = extract_answer_number(parsed.answer) == str(row["answer"])
        correct += right
        close_correct += parsed.closed_think and right
        comply += all(ok)
        joint += parsed.closed_think and right and all(ok)
    n = len(eval_rows)
    followed = [passed for v in per_id.values() for passed in v]
    return {
        "n": n,
        "think_rate": think / n,
        "close_rate": close / n,
        "missing_close_rate": (n - close) / n,
        "correct_rate": correct / n,
        "close_correct_rate": close_correct / n,
        "comply_rate": comply / n,
        "close_correct_comply_rate": joint / n,
        "comply_instruction_rate": sum(followed) / len(followed),
        "comply_by_instruction": {iid: sum(v) / len(v) for iid, v in sorted(per_id.items())},
    }
