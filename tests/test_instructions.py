"""Instruction checkers on hand-made compliant and non-compliant answers, and the IFEval-style scoring."""

import importlib.util

import pytest

from rain_tasks.evaluate.behaviour import score_outputs
from rain_tasks.evaluate.instructions import CHECKERS, check, ifeval_registry, known_ids

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval (IFEval checkers) not installed: .venv/bin/pip install --no-deps -r requirements-eval.txt",
)


@pytest.mark.parametrize("iid, kwargs, good, bad", [
    ("change_case:capital_letters", {}, ["ANSWER IS 7", "9 PLUS 1 IS 10 . ANSWER IS 10"],
     ["answer is 7", "ANSWER is 7", "12", ""]),
    pytest.param("startend:quotation", {}, ['" answer is 7 "', '"ANSWER IS 7"', '  " a "  '],
                 ["answer is 7", '" answer is 7', 'answer is 7 "', '"', "  "], marks=needs_lm_eval),
    pytest.param("startend:end_checker", {"end_phrase": "DONE"}, ["answer is 7 DONE", "answer is 7 done  ", '"answer is 7 DONE"'],
                 ["answer is 7", "DONE answer is 7", "answer is 7 DONE .", ""], marks=needs_lm_eval),
    pytest.param("change_case:english_capital", {}, ["ANSWER IS 7"],
                 ["answer is 7", "7 PLUS 3 IS 10 . 10 MINUS 2 IS 8 . ANSWER IS 8"], marks=needs_lm_eval),  # langdetect: German
    pytest.param("punctuation:no_comma", {}, ["answer is 7"], ["answer is 7, surely"], marks=needs_lm_eval),
    ("combination:repeat_answer", {"times": 2},
     ["answer is 7 answer is 7", "3 plus 4 is 7 . ANSWER IS 7 answer is 7"],
     ["answer is 7", "answer is 7 answer is 8", "answer is 7 answer is 7 answer is 7"]),
])
def test_checkers(iid: str, kwargs: dict, good: list[str], bad: list[str]) -> None:
    for text in good:
        assert check(iid, text, kwargs), text
    for text in bad:
        assert not check(iid, text, kwargs), text


@needs_lm_eval
def test_ifeval_ids_come_from_lm_eval_and_ours_do_not_overlap() -> None:
    ifeval = ifeval_registry()
    assert len(ifeval) == 25 and not set(CHECKERS) & set(ifeval)
    assert known_ids() == sorted({*CHECKERS, *ifeval})


@needs_lm_eval
def test_checker_needing_missing_nltk_data_says_so() -> None:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt")
        pytest.skip("NLTK punkt data is installed here, so the sentence checker runs")
    except LookupError:
        pass
    with pytest.raises(RuntimeError, match="needs NLTK data .* nltk.downloader punkt"):
        check("length_constraints:number_sentences", "one. two.", {"relation": "less than", "num_sentences": 3})


@needs_lm_eval
def test_prompt_and_instruction_level_accuracy_and_missing_close_rate() -> None:
    """Prompt level: every instruction of a prompt followed; instruction level: over all instructions;
    a thinking block cut off by the token budget counts as missing `</think>` (and has no answer)."""
    rows = [
        {"prompt": "p1", "instruction_id_list": ["change_case:capital_letters", "startend:quotation"], "kwargs": [{}, {}], "answer": "7"},
        {"prompt": "p2", "instruction_id_list": ["change_case:capital_letters", "startend:end_checker"],
         "kwargs": [{}, {"end_phrase": "DONE"}], "answer": "3"},
        {"prompt": "p3", "instruction_id_list": ["startend:quotation"], "kwargs": [{}], "answer": "5"},
        {"prompt": "p4", "instruction_id_list": ["combination:repeat_answer"], "kwargs": [{"times": 2}], "answer": "9"},
    ]
    texts = [
        '<think>\n3 plus 4 is 7 .\n</think>\n\n" ANSWER IS 7 "',  # both followed, right answer
        "<think>\n1 plus 2 is 3 .\n</think>\n\nANSWER IS 3",  # capitals yes, DONE no
        "<think>\n2 plus 3 is",  # truncated: no answer, nothing followed
        "answer is 9 answer is 9",  # no thinking block: the whole reply is the answer
    ]
    m = score_outputs(rows, texts)
    assert m["comply_rate"] == 2 / 4 and m["comply_instruction_rate"] == 4 / 6
    assert m["close_rate"] == 2 / 4 and m["missing_close_rate"] == 2 / 4 and m["think_rate"] == 3 / 4
    assert m["correct_rate"] == 3 / 4
    assert m["comply_by_instruction"] == {"change_case:capital_letters": 1.0, "combination:repeat_answer": 1.0,
                                          "startend:end_checker": 0.0, "startend:quotation": 0.5}


def test_unknown_id_names_it() -> None:
    with pytest.raises(KeyError, match="detectable_format:nope"):
        check("detectable_format:nope", "x", {})
