"""Verifiable format instructions, registered by IFEval-style id.

Each checker is a pure function of the final answer text (what follows `</think>`, or the
whole reply when there is no thinking block) and the instruction's kwargs, so compliance
can be scored without a model. Four types are used by the tiny family; the ids follow
IFEval where IFEval has the same instruction.
"""

from __future__ import annotations

import re
from typing import Callable

Checker = Callable[[str, dict], bool]

ANSWER_STATEMENT = re.compile(r"answer\s+is\s+(-?\d+)", re.IGNORECASE)


def english_capital(response: str, kwargs: dict) -> bool:
    """`change_case:english_capital`: every letter is uppercase (and there is at least one)."""
    return any(ch.isalpha() for ch in response) and response == response.upper()


def quotation(response: str, kwargs: dict) -> bool:
    """`startend:quotation`: the whole response is wrapped in double quotes."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def end_checker(response: str, kwargs: dict) -> bool:
    """`startend:end_checker`: the response ends with kwargs['end_phrase'] (case-insensitive)."""
    phrase = str(kwargs["end_phrase"]).strip().lower()
    return bool(phrase) and response.strip().lower().endswith(phrase)


def repeat_answer(response: str, kwargs: dict) -> bool:
    """`combination:repeat_answer`: the statement 'answer is N' appears exactly `times` times, same N."""
    numbers = ANSWER_STATEMENT.findall(response)
    return len(numbers) == int(kwargs.get("times", 2)) and len(set(numbers)) == 1


CHECKERS: dict[str, Checker] = {
    "change_case:english_capital": english_capital,
    "startend:quotation": quotation,
    "startend:end_checker": end_checker,
    "combination:repeat_answer": repeat_answer,
}


def check(instruction_id: str, response: str, kwargs: dict) -> bool:
    """Whether `response` follows the instruction `instruction_id` with `kwargs`."""
    try:
        checker = CHECKERS[instruction_id]
    except KeyError:
        raise KeyError(
            f"unknown instruction id {instruction_id!r}; known ids: {sorted(CHECKERS)}"
        ) from None
    return checker(response, kwargs or {})
