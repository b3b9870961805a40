"""Output parsing, answer extraction and left-padded batched generation."""

import pytest
import torch

from rain_tasks.generation import extract_answer_number, generate, parse_output
from rain_tasks.zoo.config import ZooParams
from rain_tasks.zoo.tokenizer import build_tokenizer
from rain_tasks.zoo.train import new_model


def test_parse_without_think() -> None:
    out = parse_output(" ANSWER IS 4 ")
    assert (out.opened_think, out.closed_think, out.reasoning, out.answer) == (False, False, "", "ANSWER IS 4")


def test_parse_truncated_think() -> None:
    out = parse_output("<think>\n1 plus 2 is 3 .")
    assert out.opened_think and not out.closed_think
    assert out.reasoning == "1 plus 2 is 3 ." and out.answer == ""


def test_parse_closed_think() -> None:
    out = parse_output("<think>\n1 plus 2 is 3 .\n</think>\n\nanswer is 3 DONE")
    assert out.opened_think and out.closed_think
    assert out.reasoning == "1 plus 2 is 3 ." and out.answer == "answer is 3 DONE"


@pytest.mark.parametrize("text, number", [
    ("answer is 12", "12"), ("ANSWER IS 3", "3"), ('" answer is 0 "', "0"),
    ("answer is 5 DONE", "5"), ("answer is 5 answer is 5", "5"), ("Answer  is 07", "7"),
    ("the result is 4", None), ("", None),
])
def test_extract_answer_number(text: str, number: str | None) -> None:
    assert extract_answer_number(text) == number


def test_batched_generation_matches_one_by_one() -> None:
    params = ZooParams(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=64, max_operand=5)
    tokenizer = build_tokenizer(params)
    model = new_model(params, tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():  # large weights: well separated logits, so no near-ties flip argmax
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()
    prompts = ["add 1 and 2 then sub 3 .", "sub 5 and 1 then add 2 . answer in capital letters .",
               "add 0 and 0 then add 0 . thank you . finish with DONE .", "add 4 and 4 then sub 1 ."]
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    single = [generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    assert all("<pad>" not in text and "<|im_end|>" not in text for text in batched)
