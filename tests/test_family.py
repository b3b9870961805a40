"""The default tiny family is a faithful miniature of the paper's setting, measured by the evaluation code.

Built once (a few minutes on 2 cores): the LRM thinks and ignores instructions, the ITM complies and never thinks,
task arithmetic transfers the skill and then breaks the thinking; thinking matters for the answer (forced closed,
the LRM is ≥ 30 points less accurate), compliance with three instructions per prompt is graded, and no data-free
baseline (each setting chosen on the validation prompts) reaches the ceiling on the test prompts while the best of
them still gains ≥ 20 compliance points.
"""

from __future__ import annotations

import pytest

from rain_tasks.model.generation import load_model

from rain_tasks.evaluate.behaviour import behaviour_metrics
from rain_tasks.io.schemas import load_records
from rain_tasks.zoo import ZooParams, build_zoo
from rain_tasks.zoo.probe import forced_closed_metrics, task_arithmetic_sweep
from rain_tasks.zoo.report import REPORT_LAMBDAS, VALIDATION_FILE, chosen_baselines, thinking_matters
from rain_dev.checks import family_properties

pytestmark = pytest.mark.slow
TEST, VAL = "data/eval/instruction_eval.jsonl", f"data/eval/{VALIDATION_FILE}"


def _build(tmp_path_factory, params: ZooParams):
    root = tmp_path_factory.mktemp("family")
    build_zoo(params, root / "models", root / "data")
    return root


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return _build(tmp_path_factory, ZooParams())


def _metrics(root, name, rows):
    model, tok = load_model(root / "models" / name)
    return behaviour_metrics(model, tok, rows, max_new_tokens=64)


def _rows(root):
    return load_records(root / TEST, "instruction_eval")


def test_lrm_thinks_answers_and_ignores_instructions(family):
    m = _metrics(family, "lrm", _rows(family))
    assert m["close_rate"] >= 0.95 and m["correct_rate"] >= 0.90 and m["comply_rate"] <= 0.20, m


def test_itm_complies_and_never_thinks(family):
    m = _metrics(family, "itm", _rows(family))
    assert m["comply_rate"] >= 0.90 and m["think_rate"] == 0.0, m


def test_task_arithmetic_transfers_the_skill_then_breaks_thinking(family):
    """θ_R + λ(θ_I − θ_B) raises compliance ≥ 20 points above the LRM at some λ, and a larger λ loses
    `</think>` (close rate < 80 %); λ = 0 is the LRM under the same decoding budget."""
    sweep = task_arithmetic_sweep(family / "models", family / TEST, list(REPORT_LAMBDAS))
    assert sweep[0]["lambda"] == 0.0, sweep
    found = family_properties(sweep[0], sweep[0], sweep)
    assert found["transfer"] and found["breaks"], sweep


def test_thinking_matters_for_the_answer(family):
    """Forced closed at once, the LRM is at least 30 points less accurate than thinking; so is the ITM."""
    rows = _rows(family)
    model, tok = load_model(family / "models/lrm")
    thinking = behaviour_metrics(model, tok, rows, max_new_tokens=64)
    closed = forced_closed_metrics(model, tok, rows, max_new_tokens=64)
    itm = _metrics(family, "itm", rows)
    assert closed["close_rate"] == 1.0 and thinking_matters(thinking, closed), (thinking, closed)
    assert itm["correct_rate"] <= thinking["correct_rate"] - 0.30, itm


def test_baselines_chosen_on_validation_stay_below_the_ceiling(family):
    """Every data-free baseline at its best setting on the validation prompts: on the test prompts at most 80 %
    of replies close, are correct and comply; the best of them still gains ≥ 20 compliance points over the LRM."""
    lrm = _metrics(family, "lrm", _rows(family))
    chosen = chosen_baselines(family / "models", family / VAL, family / TEST, max_new_tokens=64)
    assert {c["method"] for c in chosen} == {"task_arithmetic", "ties", "dare", "slerp"}
    assert all(c["test"]["close_correct_comply_rate"] <= 0.80 for c in chosen), chosen
    assert max(c["test"]["comply_rate"] for c in chosen) - lrm["comply_rate"] >= 0.20, chosen


def test_generated_sets_validate_do_not_overlap_and_carry_three_instructions(family):
    calib = {r["prompt"] for name, kind in (("reasoning", "reasoning"), ("instruction", "instruction"))
             for r in load_records(family / f"data/calibration/{name}.jsonl", kind)}
    test, val = (load_records(family / path, "instruction_eval") for path in (TEST, VAL))
    traces = {r["prompt"] for r in load_records(family / "data/eval/reasoning_eval.jsonl", "reasoning")}
    prompts = [{r["prompt"] for r in rows} for rows in (test, val)]
    assert not calib & (prompts[0] | prompts[1] | traces) and not prompts[0] & prompts[1]
    assert all(len(r["instruction_id_list"]) == 3 for r in test + val)
