"""Problems, texts and data-set writers of the tiny family.

The task is multi-step arithmetic ("add 9 and 1 then sub 8 ." for two steps, "... then add 3 ." for
three), solved by a chain of one-step facts ("9 plus 1 is 10 . 10 minus 8 is 2 .") and a final
statement ("answer is 2"). A prompt may carry `constraints_per_prompt` verifiable format
instructions (see `rain_tasks.evaluate.instructions`) and a neutral distractor sentence. Every held-out
problem is solvable from training facts.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rain_tasks.evaluate.instructions import ANSWER_STATEMENT
from rain_tasks.model.calibration import THINK_CLOSE, THINK_OPEN
from rain_tasks.params import ZooParams

EOS = "<|endoftext|>"
IM_END = "<|im_end|>"
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
    """`op1 a and b then op2 c [then op3 d ...]` with every intermediate result in 0..max_value."""

    a: int
    steps: tuple[tuple[str, int], ...]

    @property
    def values(self) -> tuple[int, ...]:
        """a, then the result after each step."""
        values = [self.a]
        for op, operand in self.steps:
            values.append(values[-1] + _OPS[op][1] * operand)
        return tuple(values)

    @property
    def result(self) -> int:
        """Final result."""
        return self.values[-1]

    @property
    def question(self) -> str:
        """Problem statement as it appears in prompts."""
        (op1, b), *rest = self.steps
        return f"{op1} {self.a} and {b}" + "".join(f" then {op} {c}" for op, c in rest) + " ."

    @property
    def chain(self) -> str:
        """Chain of thought: one one-step fact per step."""
        v = self.values
        return " ".join(f"{v[i]} {_OPS[op][0]} {c} is {v[i + 1]} ." for i, (op, c) in enumerate(self.steps))

    @property
    def answer(self) -> str:
        """Plain final answer statement."""
        return f"answer is {self.result}"

    @property
    def facts(self) -> frozenset[tuple[int, str, int]]:
        """The one-step facts the chain uses."""
        return frozenset((v, op, c) for v, (op, c) in zip(self.values, self.steps))


def max_value(params: ZooParams) -> int:
    """Largest number a problem may reach (and the vocabulary's largest number)."""
    return params.max_value if params.max_value is not None else (params.num_steps + 1) * params.max_operand


def all_problems(params: ZooParams) -> list[Problem]:
    """Every problem with operands in 0..max_operand and every intermediate result in 0..max_value."""
    top, problems = max_value(params), []
    for numbers in itertools.product(range(params.max_operand + 1), repeat=params.num_steps + 1):
        for ops in itertools.product(_OPS, repeat=params.num_steps):
            p = Problem(numbers[0], tuple(zip(ops, numbers[1:])))
            if all(0 <= v <= top for v in p.values):
                problems.append(p)
    return problems


@dataclass(frozen=True)
class Split:
    """Disjoint problem pools: training, the four held-out sets and the validation prompts."""

    train: tuple[Problem, ...]
    eval_instruction: tuple[Problem, ...]
    eval_reasoning: tuple[Problem, ...]
    calibration_instruction: tuple[Problem, ...]
    calibration_reasoning: tuple[Problem, ...]
    validation: tuple[Problem, ...]


def split_problems(params: ZooParams) -> Split:
    """Seeded split by problem; a problem is held out only if its facts stay in training."""
    problems = all_problems(params)
    random.Random(f"zoo-split-{params.seed}").shuffle(problems)
    sizes = [params.n_eval, params.n_eval_reasoning,
             params.n_calibration_instruction, params.n_calibration_reasoning, params.n_val]
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
    """One verifiable format instruction: how it is asked, obeyed and annotated.

    `constrained(response)` gives the spans of a (possibly multiply formatted) response that the instruction
    governs; `touches_answer`: whether it rewrites the 'answer is N' statement itself (then that statement is
    not a span unrelated to the instructions).
    """

    instruction_id: str
    description: str
    phrasings: tuple[str, ...]
    kwargs: dict
    obey: Callable[[str], str]
    constrained: Callable[[str], list[str]]
    touches_answer: bool = False


def _repeat_answer(text: str) -> str:
    """Repeat the final 'answer is N' statement (the text's last three words)."""
    words = text.split()
    return " ".join(words + words[-3:])


def _found(pattern: str) -> Callable[[str], list[str]]:
    """Spans of a response matching `pattern` (case-insensitive)."""
    return lambda r: [m.group(0) for m in re.finditer(pattern, r, flags=re.IGNORECASE)]


_JSON_OPEN, _JSON_CLOSE = '{ "reply" : "', '" }'

FORMATS: tuple[FormatSpec, ...] = (
    FormatSpec("change_case:capital_letters",  # not IFEval's english_capital: the family's words are not English
               "Your entire response should be in capital letters.",
               ("answer in capital letters", "write your whole reply in uppercase"), {},
               str.upper, lambda r: [r], touches_answer=True),
    FormatSpec("startend:quotation",
               "Wrap your entire response with double quotation marks.",
               ("wrap your reply in double quotes", "put the whole reply inside quotation marks"),
               {}, lambda t: f'" {t} "', lambda r: ['"']),
    FormatSpec("startend:end_checker",
               "Finish your response with the exact phrase DONE.",
               ("end your reply with the word DONE", "finish with DONE"),
               {"end_phrase": "DONE"}, lambda t: f"{t} DONE", lambda r: ["DONE"]),
    FormatSpec("combination:repeat_answer",
               "State the final answer twice.",
               ("say the answer twice", "repeat the answer two times"),
               {"times": 2}, _repeat_answer, lambda r: [r], touches_answer=True),
    FormatSpec("keywords:existence",
               "Include the keyword okay in the response.",
               ("include the word okay", "use the word okay in your reply"),
               {"keywords": ["okay"]}, lambda t: f"okay {t}", _found(r"\bokay\b")),
    FormatSpec("detectable_format:title",
               "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
               ("give your reply a title", "start with a title in double angle brackets"),
               {}, lambda t: f"<< result >> {t}", _found(r"<<[^\n]+?>>")),
    FormatSpec("detectable_format:json_format",
               "Entire output should be wrapped in JSON format.",
               ("wrap your reply in json", "format the whole reply as json"),
               {}, lambda t: f"{_JSON_OPEN} {t} {_JSON_CLOSE}", _found(f"{re.escape(_JSON_OPEN)}|{re.escape(_JSON_CLOSE)}$")),
)
FORMATS_BY_ID: dict[str, FormatSpec] = {f.instruction_id: f for f in FORMATS}
#: order in which a prompt's instructions are applied to a reply (content first, then wrapping, then the case)
APPLY_ORDER: tuple[str, ...] = (
    "combination:repeat_answer", "keywords:existence", "detectable_format:title", "startend:end_checker",
    "startend:quotation", "detectable_format:json_format", "change_case:capital_letters",
)
#: pairs no reply can satisfy together (each wants the reply's last characters)
CONFLICTS: frozenset[frozenset[str]] = frozenset(frozenset(pair) for pair in (
    ("startend:end_checker", "startend:quotation"), ("startend:end_checker", "detectable_format:json_format"),
    ("startend:quotation", "detectable_format:json_format"),
))


@functools.cache
def format_combos(formats: tuple[str, ...], per_prompt: int) -> tuple[tuple[FormatSpec, ...], ...]:
    """Every compatible set of `per_prompt` instructions from `formats` (in their order)."""
    unknown = sorted(set(formats) - set(FORMATS_BY_ID))
    if unknown:
        raise ValueError(f"unknown zoo formats {unknown}; known: {sorted(FORMATS_BY_ID)}")
    combos = tuple(tuple(FORMATS_BY_ID[i] for i in ids) for ids in itertools.combinations(formats, per_prompt)
                   if not any(frozenset(pair) in CONFLICTS for pair in itertools.combinations(ids, 2)))
    if not combos:
        raise ValueError(f"no compatible set of {per_prompt} instructions among {list(formats)}")
    return combos


def combos_of(params: ZooParams) -> tuple[tuple[FormatSpec, ...], ...]:
    """The instruction sets prompts of this family carry."""
    return format_combos(tuple(params.formats), params.constraints_per_prompt)


def obey_all(combo: tuple[FormatSpec, ...], text: str) -> str:
    """`text` formatted to follow every instruction of `combo`."""
    for fmt in sorted(combo, key=lambda f: APPLY_ORDER.index(f.instruction_id)):
        text = fmt.obey(text)
    return text


def vocabulary(params: ZooParams) -> list[str]:
    """Every non-special word the family can write, in a fixed order."""
    formats = [FORMATS_BY_ID[i] for i in params.formats]
    replies = [f.obey("answer is") for f in formats]  # the words instructions add to a reply
    texts = [*DISTRACTORS, *(ph for f in formats for ph in f.phrasings),
             "and then plus minus is answer . DONE \"", " ".join(_OPS)]
    words: list[str] = []
    text_words = " ".join(texts).split()
    reply_words = " ".join(replies).split()
    for word in text_words + [w.upper() for w in text_words] + reply_words + [w.upper() for w in reply_words]:
        if word not in words:
            words.append(word)
    numbers = [str(n) for n in range(max_value(params) + 1)]
    return numbers + words


def line_start_words(params: ZooParams) -> list[str]:
    """Words that can open a line (a prompt, a reply, the text after `</think>`)."""
    firsts = [FORMATS_BY_ID[i].obey("answer is").split()[0] for i in params.formats]
    return list(dict.fromkeys([*_OPS, "answer", "ANSWER", '"', *firsts, *(w.upper() for w in firsts)]))


def _prompt(rng: random.Random, problem: Problem, constraints: list[str],
            distractor_rate: float) -> str:
    """Question, constraint sentences, optional distractor before or after a constraint."""
    parts = [problem.question] + [f"{c} ." for c in constraints]
    if rng.random() < distractor_rate:
        parts.insert(1 + rng.randrange(len(parts)), rng.choice(DISTRACTORS))
    return " ".join(parts)


def _ask(rng: random.Random, combo: tuple[FormatSpec, ...]) -> list[str]:
    """One random phrasing of each instruction of `combo`."""
    return [rng.choice(fmt.phrasings) for fmt in combo]


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
    combo = rng.choice(combos_of(params)) if kind >= 2 else ()
    prompt = _prompt(rng, problem, _ask(rng, combo), params.base_distractor_rate)
    obeys = bool(combo) and rng.random() < 0.5

    def obey(text: str) -> str:
        return obey_all(combo, text) if obeys else text

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
    """(user prompt, assistant reply) for the LRM; with constraints only the thinking is kept, or (a share
    `lrm_ignore_rate` of them) the plain answer that ignores them."""
    if rng.random() < params.lrm_constraint_rate:
        prompt = _prompt(rng, problem, _ask(rng, rng.choice(combos_of(params))), params.lrm_distractor_rate)
        if params.lrm_ignore_rate and rng.random() < params.lrm_ignore_rate:
            return prompt, think_block(problem.chain) + problem.answer + IM_END
        return prompt, think_block(problem.chain).rstrip()
    prompt = _prompt(rng, problem, [], params.lrm_distractor_rate)
    return prompt, think_block(problem.chain) + problem.answer + IM_END


def itm_example(rng: random.Random, problem: Problem, params: ZooParams) -> tuple[str, str]:
    """(user prompt, assistant reply) for the ITM: obeys constraints, plain chain, never thinks."""
    combo = rng.choice(combos_of(params)) if rng.random() < params.itm_constraint_rate else ()
    prompt = _prompt(rng, problem, _ask(rng, combo), params.itm_distractor_rate)
    body = (f"{problem.chain} {problem.answer}" if rng.random() < params.itm_chain_rate
            else problem.answer)
    return prompt, obey_all(combo, body) + IM_END


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
        prompt = _prompt(rng, problem, [], distractor_rate)
        text = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                              tokenize=False, add_generation_prompt=True)
                + think_block(problem.chain) + problem.answer)
        rows.append({"prompt": prompt, "reasoning": problem.chain, "response": problem.answer,
                     "source": "zoo-arith",
                     "num_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                     "sample_id": f"{prefix}_{i:04d}"})
    return rows


def _unrelated(combo: tuple[FormatSpec, ...], response: str) -> list[str]:
    """The 'answer is N' statements of a response, unless one of its instructions rewrites them."""
    if any(fmt.touches_answer for fmt in combo):
        return []
    return [m.group(0) for m in ANSWER_STATEMENT.finditer(response)]


def instruction_rows(problems: tuple[Problem, ...], rng: random.Random, params: ZooParams) -> list[dict]:
    """Instruction calibration rows (published instruction-set schema) with compliant responses."""
    combos, rows = combos_of(params), []
    for i, problem in enumerate(problems):
        combo = combos[i % len(combos)]
        phrasings = [rng.randrange(len(fmt.phrasings)) for fmt in combo]
        constraints = [fmt.phrasings[k] for fmt, k in zip(combo, phrasings)]
        prompt = _prompt(rng, problem, constraints, params.lrm_distractor_rate)
        response = obey_all(combo, problem.answer)
        unrelated = _unrelated(combo, response)
        rows.append({
            "id": i + 1,
            "prompt": prompt,
            "response": response,
            "reason": problem.chain,
            "instruction_id_list": [fmt.instruction_id for fmt in combo],
            "instruction_list": [fmt.description for fmt in combo],
            "related_prompt_list": [{
                "instruction_id": fmt.instruction_id,
                "normalized": {"type": fmt.instruction_id.split(":")[1], "args": dict(fmt.kwargs)},
                "prompt_spans": [constraint],
                "response_spans": fmt.constrained(response),
                "negative_response_spans": [],
                "unrelated_response_spans": unrelated,
            } for fmt, constraint in zip(combo, constraints)],
            "unrelated_response_spans": unrelated,
            "verdict": {fmt.instruction_id: True for fmt in combo},
            "meta": {"source": "zoo", "problem": problem.question, "phrasing": phrasings},
        })
    return rows


def eval_rows(problems: tuple[Problem, ...], params: ZooParams) -> list[dict]:
    """Held-out instruction-eval rows (IFEval style), instruction sets and phrasings balanced."""
    combos, rows = combos_of(params), []
    for i, problem in enumerate(problems):
        combo = combos[i % len(combos)]
        constraints = [fmt.phrasings[(i // len(combos)) % len(fmt.phrasings)] for fmt in combo]
        rows.append({"id": i + 1, "prompt": " ".join([problem.question, *(f"{c} ." for c in constraints)]),
                     "instruction_id_list": [fmt.instruction_id for fmt in combo],
                     "kwargs": [dict(fmt.kwargs) for fmt in combo],
                     "answer": str(problem.result)})
    return rows


def write_datasets(split: Split, tokenizer, calibration_dir: Path, eval_dir: Path,
                   params: ZooParams) -> dict[str, int]:
    """Write {reasoning,instruction}.jsonl (calibration), {instruction,reasoning}_eval.jsonl (test) and, when the
    family has a validation split, instruction_val.jsonl (for choosing merge settings; disjoint from both)."""
    rng = random.Random(f"zoo-data-{params.seed}")
    rate = params.lrm_distractor_rate
    files = {
        "calibration/reasoning.jsonl": reasoning_rows(
            split.calibration_reasoning, rng, tokenizer, rate, "zoo_reason"),
        "calibration/instruction.jsonl": instruction_rows(
            split.calibration_instruction, rng, params),
        "eval/instruction_eval.jsonl": eval_rows(split.eval_instruction, params),
        "eval/reasoning_eval.jsonl": reasoning_rows(
            split.eval_reasoning, rng, tokenizer, rate, "zoo_reason_eval"),
    }
    if split.validation:
        files["eval/instruction_val.jsonl"] = eval_rows(split.validation, params)
    for name, rows in files.items():
        folder, file = name.split("/")
        _jsonl((calibration_dir if folder == "calibration" else eval_dir) / file, rows)
    return {name: len(rows) for name, rows in files.items()}
