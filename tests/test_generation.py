"""Output parsing, answer extraction and left-padded batched generation."""

import pytest
import torch

from rain_tasks.model.generation import Sampling, chat_prompt, generate, opens_think, whole_turn

from rain_tasks.evaluate.behaviour import extract_answer_number, parse_output, score_outputs
from rain_tasks.params import ZooParams
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


R1_SUFFIX = "<think>\n"  # DeepSeek-R1-Distill's generation prompt ends here: the model starts inside the block
ROW = {"prompt": "add 1 and 2 . finish with DONE .", "answer": 3,
       "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "DONE"}]}


def _random_model_and_tokenizer():
    params = ZooParams(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, max_operand=5)
    tokenizer = build_tokenizer(params)
    model = new_model(params, tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval(), tokenizer


@pytest.mark.parametrize("r1", [False, True], ids=["model_opens_think", "template_opens_think"])
def test_a_perfect_reply_scores_the_same_under_both_template_styles(r1: bool) -> None:
    _, tokenizer = _random_model_and_tokenizer()
    if r1:
        tokenizer.chat_template += R1_SUFFIX
    prompt_text = chat_prompt(tokenizer, ROW["prompt"])
    assert opens_think(prompt_text) == r1
    body = "1 plus 2 is 3 .\n</think>\n\nanswer is 3 DONE"
    continuation = body if r1 else "<think>\n" + body  # what the model itself emits in each style
    m = score_outputs([ROW], [whole_turn(prompt_text, continuation)])
    assert (m["think_rate"], m["missing_close_rate"], m["correct_rate"], m["comply_rate"]) == (1.0, 0.0, 1.0, 1.0)
    # truncated inside the thinking block: counted as </think> missing and scored on an empty answer
    m = score_outputs([ROW], [whole_turn(prompt_text, continuation[: continuation.index("</think>")])])
    assert (m["think_rate"], m["missing_close_rate"], m["correct_rate"], m["comply_rate"]) == (1.0, 1.0, 0.0, 0.0)
    # the checkers read only the answer after </think>: DONE inside the reasoning does not count
    body = "answer is 3 DONE\n</think>\n\nanswer is 3"
    m = score_outputs([ROW], [whole_turn(prompt_text, body if r1 else "<think>\n" + body)])
    assert (m["correct_rate"], m["comply_rate"]) == (1.0, 0.0)


def test_generation_under_an_r1_template_returns_the_whole_turn() -> None:
    model, tokenizer = _random_model_and_tokenizer()
    plain = generate(model, tokenizer, [ROW["prompt"]], max_new_tokens=8)[0]
    tokenizer.chat_template += R1_SUFFIX
    r1 = generate(model, tokenizer, [ROW["prompt"]], max_new_tokens=8)[0]
    assert r1.startswith("<think>\n") and parse_output(r1).opened_think
    assert not plain.startswith("<think>")  # the random model does not open the block itself


def test_sampled_generation_is_reproducible_and_gives_n_replies() -> None:
    model, tokenizer = _random_model_and_tokenizer()
    sampling = Sampling(temperature=1.0, top_p=0.9, num_samples=3, seed=7)
    first = generate(model, tokenizer, [ROW["prompt"], "add 4 and 4 ."], 8, sampling=sampling)
    assert len(first) == 6 and first == generate(model, tokenizer, [ROW["prompt"], "add 4 and 4 ."], 8, sampling=sampling)
    assert len(set(first[:3])) > 1  # the three replies to one prompt are really sampled
