"""The default tiny family is a faithful miniature of the paper's setting, measured by the evaluation code.

Builds the default zoo once (a few minutes on 2 cores) and measures on its held-out problems.
"""

from __future__ import annotations

import pytest

from rain_tasks.generation import behaviour_metrics, load_model
from rain_tasks.schemas import load_records
from rain_tasks.zoo import ZooParams, build_zoo
from rain_tasks.zoo.probe import task_arithmetic_sweep
from rain_tasks.zoo.report import REPORT_LAMBDAS, family_properties

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    build_zoo(ZooParams(), root / "models", root / "data")
    return root


@pytest.fixture(scope="module")
def eval_rows(family):
    return load_records(family / "data/eval/instruction_eval.jsonl", "instruction_eval")


def _metrics(family, name, rows):
    model, tok = load_model(family / "models" / name)
    return behaviour_metrics(model, tok, rows, max_new_tokens=64)


def test_lrm_thinks_answers_and_ignores_instructions(family, eval_rows):
    m = _metrics(family, "lrm", eval_rows)
    assert m["close_rate"] >= 0.95 and m["correct_rate"] >= 0.90 and m["comply_rate"] <= 0.20, m


def test_itm_complies_and_never_thinks(family, eval_rows):
    m = _metrics(family, "itm", eval_rows)
    assert m["comply_rate"] >= 0.90 and m["think_rate"] == 0.0, m


def test_task_arithmetic_transfers_the_skill_then_breaks_thinking(family):
    """θ_R + λ(θ_I − θ_B) raises compliance ≥ 20 points above the LRM at some λ, and a larger λ loses
    `</think>` (close rate < 80 %); λ = 0 is the LRM under the same decoding budget."""
    sweep = task_arithmetic_sweep(family / "models", family / "data/eval/instruction_eval.jsonl", list(REPORT_LAMBDAS))
    assert sweep[0]["lambda"] == 0.0, sweep
    found = family_properties(sweep[0], sweep[0], sweep)
    assert found["transfer"] and found["breaks"], sweep


def test_generated_sets_validate_and_do_not_overlap(family):
    reasoning = load_records(family / "data/calibration/reasoning.jsonl", "reasoning")
    instruction = load_records(family / "data/calibration/instruction.jsonl", "instruction")
    evals = load_records(family / "data/eval/instruction_eval.jsonl", "instruction_eval")
    traces = load_records(family / "data/eval/reasoning_eval.jsonl", "reasoning")
    calib = {r["prompt"] for r in reasoning} | {r["prompt"] for r in instruction}
    assert not calib & ({r["prompt"] for r in evals} | {r["prompt"] for r in traces})
