"""Behaviour of generated replies: the thinking block parsed out, the answer checked, the instructions checked.

Replies are whole turns (rain_tasks.model.generation puts a template-written `<think>` back in front), so the
think rate, the `</think>` missing rate and the instruction checkers (which read only the answer after
`</think>`) mean the same for Qwen-style and DeepSeek-R1-style templates.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rain_tasks.evaluate import instructions
from rain_tasks.model.calibration import THINK_CLOSE, THINK_OPEN
from rain_tasks.model.generation import GREEDY, Sampling, generate


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
