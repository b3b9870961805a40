"""Batched greedy generation, output parsing and behaviour metrics (think format, accuracy, compliance)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rain_tasks import instructions
from rain_tasks.calibration import load_tokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def load_model(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local checkpoint with eager attention (attention weights available), in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    tokenizer = load_tokenizer(path)
    return model.eval(), tokenizer


@torch.no_grad()
def generate_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                 max_new_tokens: int, batch_size: int = 64) -> list[tuple[list[int], list[int]]]:
    """Greedy continuations of single-turn chat prompts (left padding): per prompt, its rendered ids and the
    generated ids up to (not including) the first stop token."""
    stop_ids = model.generation_config.eos_token_id
    stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids]) - {None}
    outputs: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True)
                 for p in prompts[start:start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False)
        generated = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop_ids) or None,
        )
        width = enc["input_ids"].shape[1]
        for mask, prompt, row in zip(enc["attention_mask"].tolist(), enc["input_ids"].tolist(), generated[:, width:].tolist()):
            ids = []
            for tok in row:
                if tok in stop_ids:
                    break
                ids.append(tok)
            outputs.append(([t for t, m in zip(prompt, mask) if m], ids))
    return outputs


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuations of single-turn chat prompts as text; keeps <think> tags visible."""
    return [tokenizer.decode([t for t in ids if t != tokenizer.pad_token_id], skip_special_tokens=False)
            for _, ids in generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size)]


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
                      eval_rows: list[dict], max_new_tokens: int, batch_size: int = 64) -> dict:
    """Behaviour on instruction-eval rows from greedy generations within `max_new_tokens`.

    think/close: the reply opens `<think>` / closes it within the budget (a truncated thinking
    block counts as missing `</think>`); correct: 'answer is N' after the block is right;
    comply_rate: IFEval prompt-level strict accuracy (every instruction of the prompt followed);
    comply_instruction_rate: instruction-level strict accuracy (over all instructions of all prompts).
    """
    texts = generate(model, tokenizer, [r["prompt"] for r in eval_rows], max_new_tokens, batch_size)
    return score_outputs(eval_rows, texts)


def score_outputs(eval_rows: list[dict], texts: list[str]) -> dict:
    """The behaviour metrics of generations `texts` (one per eval row); see `behaviour_metrics`."""
    per_id: dict[str, list[bool]] = defaultdict(list)
    think = close = correct = comply = 0
    for row, text in zip(eval_rows, texts, strict=True):
        parsed = parse_output(text)
        ok = [instructions.check(iid, parsed.answer, kw, row["prompt"])
              for iid, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True)]
        for iid, passed in zip(row["instruction_id_list"], ok):
            per_id[iid].append(passed)
        think += parsed.opened_think
        close += parsed.closed_think
        correct += extract_answer_number(parsed.answer) == str(row["answer"])
        comply += all(ok)
    n = len(eval_rows)
    followed = [passed for v in per_id.values() for passed in v]
    return {
        "n": n,
        "think_rate": think / n,
        "close_rate": close / n,
        "missing_close_rate": (n - close) / n,
        "correct_rate": correct / n,
        "comply_rate": comply / n,
        "comply_instruction_rate": sum(followed) / len(followed),
        "comply_by_instruction": {iid: sum(v) / len(v) for iid, v in sorted(per_id.items())},
    }
