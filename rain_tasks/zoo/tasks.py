"""Problems, texts and data-set writers of the tiny family.

The task is two-step arithmetic ("add 9 and 1 then sub 8 ."), solved by a chain of one-step
facts ("9 plus 1 is 10 . 10 minus 8 is 2 .") and a final statement ("answer is 2").
A prompt may carry one verifiable format instruction (see `rain_tasks.instructions`) and
a neutral distractor sentence. Every held-out problem is solvable from training facts.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rain_tasks.zoo.config import ZooParams

EOS = "<|endoftext|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_OPS: dict[str, tuple[str, int]] = {"add": ("plus", 1), "sub": ("minus", -1)}
DISTRACTORS: tuple[str, ...] = (
    "please be careful .",
    "this is a test .",
    "take your time .",
    "thank you .",
    "i need this for school .",
)


@dataclass(frozen=True)
class Problem:
    """Two-step problem `op1 a and b then op2 c` with non-negative intermediate results."""

    a: int
    op1: str
    b: int
    op2: str
    c: int

    @property
    def intermediate(self) -> int:
        """Result of the first step."""
        return self.a + _OPS[self.op1][1] * self.b

    @property
    def result(self) -> int:
        """Final result."""
        return self.intermediate + _OPS[self.op2][1] * self.c

    @property
    def question(self) -> str:
        """Problem statement as it appears in prompts."""
        return f"{self.op1} {self.a} and {self.b} then {self.op2} {self.c} ."

    @property
    def chain(self) -> str:
        """Chain of thought: the two one-step facts."""
        r1 = self.intermediate
        return (f"{self.a} {_OPS[self.op1][0]} {self.b} is {r1} . "
                f"{r1} {_OPS[self.op2][0]} {self.c} is {self.result} .")

    @property
    def answer(self) -> str:
        """Plain final answer statement."""
        return f"answer is {self.result}"

    @property
    def facts(self) -> frozenset[tuple[int, str, int]]:
        """The one-step facts the chain uses."""
        return frozenset({(self.a, self.op1, self.b), (self.intermediate, self.op2, self.c)})


def all_problems(max_operand: int) -> list[Problem]:
    """Every problem with operands in 0..max_operand and non-negative intermediate results."""
    problems = []
    for a, b, c in itertools.product(range(max_operand + 1), repeat=3):
        for op1, op2 in itertools.product(_OPS, repeat=2):
            p = Problem(a, op1, b, op2, c)
            if p.intermediate >= 0 and p.result >= 0:
                problems.append(p)
    return problems


@dataclass(frozen=True)
class Split:
    """Disjoint problem pools: training and the four held-out sets."""

    train: tuple[Problem, ...]
    eval_instruction: tuple[Problem, ...]
    eval_reasoning: tuple[Problem, ...]
    calibration_instruction: tuple[Problem, ...]
    calibration_reasoning: tuple[Problem, ...]


def split_problems(params: ZooParams) -> Split:
    """Seeded split by problem; a problem is held out only if its facts stay in training."""
    problems = all_problems(params.max_operand)
    random.Random(f"zoo-split-{params.seed}").shuffle(problems)
    sizes = [params.n_eval, params.n_eval_reasoning,
             params.n_calibration_instruction, params.n_calibration_reasoning]
    fact_count = Counter(f for p in problems for f in p.facts)
    held: list[Problem] = []
    for p in problems:
        if len(held) == sum(sizes):
            break
        if all(fact_count[f] >= 2 for f in p.facts):
            held.append(p)
            fact_count.subtract(p.facts)
    if len(held) < sum(sizes):
        raise ValueError(f"only {len(held)} problems can be held out, {sum(sizes)} requested")
    held_set = set(held)
    pools, start = [], 0
    for size in sizes:
        pools.append(tuple(held[start:start + size]))
        start += size
    train = tuple(p for p in problems if p not in held_set)
    return Split(train, *pools)


@dataclass(frozen=True)
class FormatSpec:
    """One verifiable format instruction: how it is asked, obeyed and annotated."""

    instruction_id: str
    description: str
    phrasings: tuple[str, ...]
    kwargs: dict
    obey: Callable[[str], str]
    constrained: Callable[[str], list[str]]
    unconstrained: Callable[[str], list[str]]


def _repeat_answer(text: str) -> str:
    """Repeat the final 'answer is N' statement (the text's last three words)."""
    words = text.split()
    return " ".join(words + words[-3:])


FORMATS: tuple[FormatSpec, ...] = (
    FormatSpec("change_case:capital_letters",  # not IFEval's english_capital: the family's words are not English
               "Your entire response should be in capital letters.",
               ("answer in capital letters", "write your whole reply in uppercase"), {},
               str.upper, lambda r: [r], lambda r: []),
    FormatSpec("startend:quotation",
               "Wrap your entire response with double quotation marks.",
               ("wrap your reply in double quotes", "put the whole reply inside quotation marks"),
               {}, lambda t: f'" {t} "', lambda r: ['"'], lambda r: [r.strip('" ')]),
    FormatSpec("startend:end_checker",
               "Finish your response with the exact phrase DONE.",
               ("end your reply with the word DONE", "finish with DONE"),
               {"end_phrase": "DONE"}, lambda t: f"{t} DONE", lambda r: ["DONE"],
               lambda r: [r[: -len(" DONE")]]),
    FormatSpec("combination:repeat_answer",
               "State the final answer twice.",
               ("say the answer twice", "repeat the answer two times"),
               {"times": 2}, _repeat_answer, lambda r: [r], lambda r: []),
)


def vocabulary(max_operand: int) -> list[str]:
    """Every non-special word the family can write, in a fixed order."""
    texts = [*DISTRACTORS, *(ph for f in FORMATS for ph in f.phrasings),
             "and then plus minus is answer . DONE \"", " ".join(_OPS)]
    words: list[str] = []
    for word in " ".join(texts).split() + [w.upper() for w in " ".join(texts).split()]:
        if word not in words:
            words.append(word)
    numbers = [str(n) for n in range(3 * max_operand + 1)]
    return numbers + words


def line_start_words() -> list[str]:
    """Words that can open a line (a prompt, a reply, the text after `</think>`)."""
    return [*_OPS, "answer", "ANSWER", '"']


def _prompt(rng: random.Random, problem: Problem, constraint: str | None,
            distractor_rate: float) -> str:
    """Question, optional constraint sentence, optional distractor before or after the constraint."""
    parts = [problem.question] + ([f"{constraint} ."] if constraint else [])
    if rng.random() < distractor_rate:
        parts.insert(1 + rng.randrange(len(parts)), rng.choice(DISTRACTORS))
    return " ".join(parts)


def think_block(reasoning: str) -> str:
    """The LRM's thinking block, exactly as calibration texts render it."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n"


def base_document(rng: random.Random, problem: Problem, params: ZooParams,
                  chat_prompt: Callable[[str], str]) -> str:
    """Raw-text document for the base: every format appears, constraints obeyed half the time.

    A share `base_chat_rate` of documents is rendered as a chat turn (`chat_prompt(prompt)`, the reply, `<|im_end|>`)
    so that the base already knows the chat format: the fine-tunes then need not both learn it, which would give
    their task vectors a large shared component (and the ITM's skill would not transfer under merging).
    """
    kind = rng.randrange(4)
    fmt = rng.choice(FORMATS) if kind >= 2 else None
    prompt = _prompt(rng, problem, rng.choice(fmt.phrasings) if fmt else None,
                     params.base_distractor_rate)
    obey = fmt.obey if fmt and rng.random() < 0.5 else (lambda t: t)
    if kind == 0:
        body = f"{problem.chain} {problem.answer}"
    elif kind in (1, 2):
        body = think_block(problem.chain) + obey(problem.answer)
    else:
        body = obey(f"{problem.chain} {problem.answer}" if rng.random() < 0.5 else problem.answer)
    if rng.random() < params.base_chat_rate:
        return chat_prompt(prompt) + body + IM_END
    return f"{prompt}\n{body}{EOS}"


def lrm_example(rng: random.Random, problem: Problem, params: ZooParams) -> tuple[str, str]:
    """(user prompt, assistant reply) for the LRM; with a constraint only the thinking is kept."""
    if rng.random() < params.lrm_constraint_rate:
        constraint = rng.choice(rng.choice(FORMATS).phrasings)
        prompt = _prompt(rng, problem, constraint, params.lrm_distractor_rate)
        return prompt, think_block(problem.chain).rstrip()
    prompt = _prompt(rng, problem, None, params.lrm_distractor_rate)
    return prompt, think_block(problem.chain) + problem.answer + IM_END


def itm_example(rng: random.Random, problem: Problem, params: ZooParams) -> tuple[str, str]:
    """(user prompt, assistant reply) for the ITM: obeys constraints, plain chain, never thinks."""
    fmt = rng.choice(FORMATS) if rng.random() < params.itm_constraint_rate else None
    prompt = _prompt(rng, problem, rng.choice(fmt.phrasings) if fmt else None,
                     params.itm_distractor_rate)
    body = (f"{problem.chain} {problem.answer}" if rng.random() < params.itm_chain_rate
            else problem.answer)
    return prompt, (fmt.obey(body) if fmt else body) + IM_END


def _jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines (UTF-8, fixed key order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def reasoning_rows(problems: tuple[Problem, ...], rng: random.Random, tokenizer,
                   distractor_rate: float, prefix: str) -> list[dict]:
    """Reasoning traces in the published reasoning-set schema."""
    rows = []
    for i, problem in enumerate(problems):
        prompt = _prompt(rng, problem, None, distractor_rate)
        text = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                              tokenize=False, add_generation_prompt=True)
                + think_block(problem.chain) + problem.answer)
        rows.append({"prompt": prompt, "reasoning": problem.chain, "response": problem.answer,
                     "source": "zoo-arith",
                     "num_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                     "sample_id": f"{prefix}_{i:04d}"})
    return rows


def instruction_rows(problems: tuple[Problem, ...], rng: random.Random,
                     distractor_rate: float) -> list[dict]:
    """Instruction calibration rows (published instruction-set schema) with compliant responses."""
    rows = []
    for i, problem in enumerate(problems):
        fmt = FORMATS[i % len(FORMATS)]
        phrasing = rng.randrange(len(fmt.phrasings))
        constraint = fmt.phrasings[phrasing]
        prompt = _prompt(rng, problem, constraint, distractor_rate)
        response = fmt.obey(problem.answer)
        rows.append({
            "id": i + 1,
            "prompt": prompt,
            "response": response,
            "reason": problem.chain,
            "instruction_id_list": [fmt.instruction_id],
            "instruction_list": [fmt.description],
            "related_prompt_list": [{
                "instruction_id": fmt.instruction_id,
                "normalized": {"type": fmt.instruction_id.split(":")[1], "args": dict(fmt.kwargs)},
                "prompt_spans": [constraint],
                "response_spans": fmt.constrained(response),
                "negative_response_spans": [],
                "unrelated_response_spans": fmt.unconstrained(response),
            }],
            "unrelated_response_spans": fmt.unconstrained(response),
            "verdict": {fmt.instruction_id: True},
            "meta": {"source": "zoo", "problem": problem.question, "phrasing": phrasing},
        })
    return rows


def eval_rows(problems: tuple[Problem, ...]) -> list[dict]:
    """Held-out instruction-eval rows (IFEval style), formats and phrasings balanced."""
    rows = []
    for i, problem in enumerate(problems):
        fmt = FORMATS[i % len(FORMATS)]
        constraint = fmt.phrasings[(i // len(FORMATS)) % len(fmt.phrasings)]
        rows.append({"id": i + 1, "prompt": f"{problem.question} {constraint} .",
                     "instruction_id_list": [fmt.instruction_id], "kwargs": [dict(fmt.kwargs)],
                     "answer": str(problem.result)})
    return rows


def write_datasets(split: Split, tokenizer, calibration_dir: Path, eval_dir: Path,
                   params: ZooParams) -> dict[str, int]:
    """Write {reasoning,instruction}.jsonl (calibration) and {instruction,reasoning}_eval.jsonl."""
    rng = random.Random(f"zoo-data-{params.seed}")
    rate = params.lrm_distractor_rate
    files = {
        "calibration/reasoning.jsonl": reasoning_rows(
            split.calibration_reasoning, rng, tokenizer, rate, "zoo_reason"),
        "calibration/instruction.jsonl": instruction_rows(
            split.calibration_instruction, rng, rate),
        "eval/instruction_eval.jsonl": eval_rows(split.eval_instruction),
        "eval/reasoning_eval.jsonl": reasoning_rows(
            split.eval_reasoning, rng, tokenizer, rate, "zoo_reason_eval"),
    }
    for name, rows in files.items():
        folder, file = name.split("/")
        _jsonl((calibration_dir if folder == "calibration" else eval_dir) / file, rows)
    return {name: len(rows) for name, rows in files.items()}
