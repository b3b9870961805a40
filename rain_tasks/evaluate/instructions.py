"""Verifiable format instructions: IFEval's checkers (from lm-eval) for the ids IFEval defines, ours for the rest.

A checker is a function of the final answer text (what follows `</think>`, or the whole reply
when there is no thinking block), the instruction's kwargs and the prompt, so compliance can
be scored without a model. Scoring is IFEval's *strict* rule: an instruction is followed when
the response is non-empty and the checker accepts it as it is.

The 25 IFEval ids are checked by lm-eval's own implementation (`lm_eval.tasks.ifeval`, pinned in
requirements-eval.txt) rather than a rewrite. Two of the tiny family's instructions have no IFEval
counterpart and are checked here: `change_case:capital_letters` (IFEval's `english_capital` also
requires langdetect to call the text English, which it does for 0 of 200 of the family's uppercase
chains, "7 PLUS 3 IS 10 . …", since that vocabulary is not English) and `combination:repeat_answer`.
"""

from __future__ import annotations

import functools
import io
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout

Checker = Callable[[str, dict], bool]

ANSWER_STATEMENT = re.compile(r"answer\s+is\s+(-?\d+)", re.IGNORECASE)
log = logging.getLogger(__name__)


def capital_letters(response: str, kwargs: dict) -> bool:
    """`change_case:capital_letters`: every letter is uppercase (and there is at least one)."""
    return any(ch.isalpha() for ch in response) and response == response.upper()


def repeat_answer(response: str, kwargs: dict) -> bool:
    """`combination:repeat_answer`: the statement 'answer is N' appears exactly `times` times, same N."""
    numbers = ANSWER_STATEMENT.findall(response)
    return len(numbers) == int(kwargs.get("times", 2)) and len(set(numbers)) == 1


#: instructions IFEval does not define, checked here
CHECKERS: dict[str, Checker] = {
    "change_case:capital_letters": capital_letters,
    "combination:repeat_answer": repeat_answer,
}


@contextmanager
def _no_nltk_download() -> Iterator[None]:
    """Importing lm-eval's IFEval utilities calls `nltk.download('punkt_tab')` when the data is missing:
    offline that is a failed (or hanging) network request, so it is turned into a log line instead (and
    lm-eval's unconditional "Downloaded punkt_tab" print is swallowed)."""
    import nltk

    download = nltk.download

    def skip(resource: str, *args, **kwargs) -> bool:
        log.info("NLTK data %r is not installed; not downloading it (checkers needing it will say so)", resource)
        return False

    nltk.download = skip
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        nltk.download = download


@functools.cache
def ifeval_registry() -> dict[str, type]:
    """lm-eval's IFEval instruction classes by id (langdetect seeded, so language checks are deterministic)."""
    try:
        import langdetect

        with _no_nltk_download():
            from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as e:
        raise ImportError(
            f"IFEval instruction checkers need lm-eval and its light dependencies ({e}); install them with "
            "`.venv/bin/pip install --no-deps -r requirements-eval.txt`"
        ) from e
    langdetect.DetectorFactory.seed = 0
    return dict(INSTRUCTION_DICT)


def _ifeval_check(instruction_id: str, response: str, kwargs: dict, prompt: str) -> bool:
    """One instruction of lm-eval's `test_instruction_following_strict` (same description building)."""
    instruction = ifeval_registry()[instruction_id](instruction_id)
    instruction.build_description(**{k: v for k, v in kwargs.items() if v})
    args = instruction.get_instruction_args()
    if args and "prompt" in args:
        instruction.build_description(prompt=prompt)
    try:
        return bool(instruction.check_following(response))
    except LookupError as e:  # nltk's banner-framed "Resource punkt_tab not found."
        missing = next((line.strip() for line in str(e).splitlines() if "Resource" in line), "an NLTK resource is missing")
        raise RuntimeError(
            f"IFEval checker {instruction_id!r} needs NLTK data that is not installed here and cannot be "
            f"downloaded offline ({missing}). On a machine with network access run "
            "`python -m nltk.downloader punkt punkt_tab` and point NLTK_DATA at the result."
        ) from None


def known_ids() -> list[str]:
    """Every instruction id that can be checked: ours and (where lm-eval is installed) IFEval's."""
    try:
        ifeval = list(ifeval_registry())
    except ImportError:
        ifeval = []
    return sorted({*CHECKERS, *ifeval})


def check(instruction_id: str, response: str, kwargs: dict | None, prompt: str = "") -> bool:
    """Whether `response` follows the instruction `instruction_id` with `kwargs` (IFEval strict: non-empty and accepted).

    `prompt` is the user prompt, which some IFEval checkers (`combination:repeat_prompt`) compare against.
    """
    kwargs = kwargs or {}
    if instruction_id in CHECKERS:
        return bool(response.strip()) and CHECKERS[instruction_id](response, kwargs)
    if instruction_id not in ifeval_registry():
        raise KeyError(f"unknown instruction id {instruction_id!r}; known ids: {known_ids()}")
    return bool(response.strip()) and _ifeval_check(instruction_id, response, kwargs, prompt)
