"""The tiny family's problems and instructions, without training: multi-step chains, multi-constraint prompts and
their checkers, the validation split, and the forced-closed generation prefix."""

from __future__ import annotations

import itertools
import random

import pytest

from rain_tasks.evaluate import instructions
from rain_tasks.model.generation import generate
from rain_tasks.evaluate.behaviour import extract_answer_number, score_outputs
from rain_tasks.params import ZooParams
from rain_tasks.zoo.probe import FORCED_CLOSED, forced_closed_metrics
from rain_tasks.zoo.tasks import (CONFLICTS, FORMATS, Problem, combos_of, eval_rows, instruction_rows, itm_example,
                                  obey_all, split_problems)
from rain_tasks.zoo.tokenizer import build_tokenizer
from rain_tasks.zoo.train import new_model

ALL = tuple(f.instruction_id for f in FORMATS)
THREE = dict(num_steps=3, max_operand=6, max_value=15, formats=ALL, constraints_per_prompt=3,
             n_eval=40, n_eval_reasoning=10, n_calibration_instruction=30, n_calibration_reasoning=10, n_val=40)


def test_multi_step_problem_chains_one_step_facts() -> None:
    p = Problem(9, (("add", 1), ("sub", 8), ("add", 4)))
    assert p.question == "add 9 and 1 then sub 8 then add 4 ."
    assert p.chain == "9 plus 1 is 10 . 10 minus 8 is 2 . 2 plus 4 is 6 ."
    assert p.values == (9, 10, 2, 6) and p.answer == "answer is 6"
    assert p.facts == {(9, "add", 1), (10, "sub", 8), (2, "add", 4)}


def test_problems_stay_in_range_and_held_out_facts_are_trained() -> None:
    params = ZooParams(**THREE)
    split = split_problems(params)
    assert all(0 <= v <= 15 for p in split.train for v in p.values)
    assert all(len(p.steps) == 3 for p in split.train)
    facts = {f for p in split.train for f in p.facts}
    held = [*split.eval_instruction, *split.validation, *split.calibration_instruction]
    assert len(split.validation) == 40 and all(p.facts <= facts for p in held)
    assert len({p.question for p in held}) == len(held) and not {p.question for p in held} & {p.question for p in split.train}


@pytest.mark.parametrize("per_prompt", [1, 2, 3])
def test_every_instruction_set_is_satisfiable_and_keeps_the_answer(per_prompt: int) -> None:
    """Each compatible set's reply passes every one of its checkers (lm-eval's IFEval ones included) and still
    states the answer; conflicting pairs are never asked together."""
    combos = combos_of(ZooParams(formats=ALL, constraints_per_prompt=per_prompt))
    assert len(combos) > 1
    for combo in combos:
        ids = [f.instruction_id for f in combo]
        assert not any(frozenset(pair) in CONFLICTS for pair in itertools.combinations(ids, 2))
        for body in ("answer is 7", "3 plus 4 is 7 . answer is 7"):
            reply = obey_all(combo, body)
            assert all(instructions.check(f.instruction_id, reply, f.kwargs) for f in combo), (ids, reply)
            assert extract_answer_number(reply) == "7", reply
            # and no checker passes by accident (IFEval's json_format accepts a quoted reply: a JSON string)
            others = [f for f in FORMATS if f not in combo
                      and not (f.instruction_id == "detectable_format:json_format" and "startend:quotation" in ids)]
            assert not any(instructions.check(f.instruction_id, reply, f.kwargs) for f in others), (ids, reply)


def test_compliance_is_graded_per_instruction() -> None:
    """Prompt-level compliance needs every instruction; instruction-level counts each one."""
    params = ZooParams(**THREE)
    row = eval_rows(split_problems(params).eval_instruction, params)[0]
    combo = [next(f for f in FORMATS if f.instruction_id == i) for i in row["instruction_id_list"]]
    full = obey_all(tuple(combo), f"answer is {row['answer']}")
    partial = obey_all(tuple(combo[:2]), f"answer is {row['answer']}")
    m = score_outputs([row, row], [full, partial])
    assert m["comply_rate"] == 0.5 and m["correct_rate"] == 1.0
    assert 0.5 < m["comply_instruction_rate"] < 1.0
    assert m["close_correct_comply_rate"] == 0.0  # neither reply thinks


def test_rows_carry_several_instructions_with_spans() -> None:
    params = ZooParams(**THREE)
    split = split_problems(params)
    rows = eval_rows(split.validation, params)
    assert all(len(r["instruction_id_list"]) == len(r["kwargs"]) == 3 for r in rows)
    assert len({tuple(r["instruction_id_list"]) for r in rows}) > 5
    for row in instruction_rows(split.calibration_instruction, random.Random(0), params):
        assert len(row["related_prompt_list"]) == 3
        for item in row["related_prompt_list"]:
            assert item["prompt_spans"][0] in row["prompt"]
            assert item["response_spans"] and all(s in row["response"] for s in item["response_spans"])
        assert all(instructions.check(i, row["response"], k) for i, k in zip(
            row["instruction_id_list"], [f.kwargs for f in FORMATS if f.instruction_id in row["instruction_id_list"]]))
    prompt, reply = itm_example(random.Random(3), split.train[0], params.model_copy(update={"itm_constraint_rate": 1.0}))
    assert prompt.count(" .") >= 4 and reply.endswith("<|im_end|>")


def test_forced_closed_generation_starts_with_a_closed_empty_block() -> None:
    params = ZooParams(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, max_operand=5)
    tokenizer = build_tokenizer(params)
    model = new_model(params, tokenizer).eval()
    rows = [{"prompt": "add 1 and 2 then sub 3 .", "instruction_id_list": ["startend:end_checker"],
             "kwargs": [{"end_phrase": "DONE"}], "answer": "0"}]
    text = generate(model, tokenizer, [rows[0]["prompt"]], max_new_tokens=4, reply_prefix=FORCED_CLOSED)[0]
    m = forced_closed_metrics(model, tokenizer, rows, max_new_tokens=4)
    assert FORCED_CLOSED == "<think>\n\n</think>\n\n" and m["think_rate"] == m["close_rate"] == 1.0
    assert "<think>" not in text and m["n"] == 1  # the prefix is given, not generated
