"""Instruction checkers on hand-made compliant and non-compliant answers."""

import pytest

from rain_tasks.instructions import CHECKERS, check


@pytest.mark.parametrize("iid, kwargs, good, bad", [
    ("change_case:english_capital", {}, ["ANSWER IS 7", "9 PLUS 1 IS 10 . ANSWER IS 10"],
     ["answer is 7", "ANSWER is 7", "12", ""]),
    ("startend:quotation", {}, ['" answer is 7 "', '"ANSWER IS 7"', '  " a "  '],
     ["answer is 7", '" answer is 7', 'answer is 7 "', '"']),
    ("startend:end_checker", {"end_phrase": "DONE"}, ["answer is 7 DONE", "answer is 7 done  "],
     ["answer is 7", "DONE answer is 7", "answer is 7 DONE ."]),
    ("combination:repeat_answer", {"times": 2},
     ["answer is 7 answer is 7", "3 plus 4 is 7 . ANSWER IS 7 answer is 7"],
     ["answer is 7", "answer is 7 answer is 8", "answer is 7 answer is 7 answer is 7"]),
])
def test_checkers(iid: str, kwargs: dict, good: list[str], bad: list[str]) -> None:
    for text in good:
        assert check(iid, text, kwargs), text
    for text in bad:
        assert not check(iid, text, kwargs), text


def test_registry_has_four_ids() -> None:
    assert len(CHECKERS) == 4


def test_unknown_id_names_it() -> None:
    with pytest.raises(KeyError, match="detectable_format:nope"):
        check("detectable_format:nope", "x", {})
