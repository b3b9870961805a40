"""The tiny family's build: bit-exact determinism, loadable sharded checkpoints, well-formed data."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rain_tasks.evaluate.instructions import ANSWER_STATEMENT
from rain_tasks.zoo import ZooParams
from rain_tasks.zoo.tasks import FORMATS_BY_ID, split_problems
from rain_tasks.zoo.tokenizer import build_tokenizer
from rain_tasks.zoo.train import new_model

ROOT = Path(__file__).resolve().parents[1]
# Same code path as the default family, scaled down to seconds.
SMALL = dict(threads=1, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
             intermediate_size=64, batch_size=8, warmup_steps=2, base_steps=6, lrm_steps=4,
             itm_steps=4, n_calibration_reasoning=8, n_calibration_instruction=12, n_eval=8,
             n_eval_reasoning=4, n_val=8, max_shard_size="40KB")
QUESTION = re.compile(r"(add|sub) \d+ and \d+( then (add|sub) \d+)+ \.")
BUILD = ("import json, sys; from pathlib import Path; from rain_tasks.zoo import ZooParams, build_zoo; "
         "root = Path(sys.argv[2]); build_zoo(ZooParams(**json.loads(sys.argv[1])), root / 'models', root / 'data')")


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two builds of the same small params in two separate processes (run side by side)."""
    roots = [tmp_path_factory.mktemp(f"zoo{i}") for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, json.dumps(SMALL), str(root)],
                              env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for root in roots]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return roots


def test_build_is_bit_exact_across_processes(builds: list[Path]) -> None:
    first, second = (_digests(root) for root in builds)
    assert first == second
    assert any(name.endswith(".safetensors") for name in first)
    assert not [p for p in builds[0].rglob("*.partial")], "staging directories left behind"


@pytest.mark.parametrize("name", ["base", "itm", "lrm"])
def test_checkpoints_are_sharded_and_load(builds: list[Path], name: str) -> None:
    directory = builds[0] / "models" / name
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (directory / "model.safetensors.index.json").exists()
    for file in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (directory / file).exists(), file
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.padding_side == "left"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "add 1 and 2 then sub 3 ."}],
                                         tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<think>" not in text
    text += "<think>\n1 plus 2 is 3 .\n</think>\n\nanswer is 0<|im_end|>"
    fresh = build_tokenizer(ZooParams(**SMALL))
    reloaded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert reloaded["input_ids"] == fresh(text, add_special_tokens=False)["input_ids"]
    spans = [text[a:b] for a, b in reloaded["offset_mapping"]]
    assert "".join(spans) == text and "<think>" in spans and "</think>" in spans


def test_calibration_files_follow_the_published_schema(builds: list[Path]) -> None:
    data = builds[0] / "data"
    reasoning = _jsonl(data / "calibration" / "reasoning.jsonl")
    assert len(reasoning) == SMALL["n_calibration_reasoning"]
    for row in reasoning + _jsonl(data / "eval" / "reasoning_eval.jsonl"):
        assert set(row) == {"prompt", "reasoning", "response", "source", "num_tokens", "sample_id"}
        assert isinstance(row["num_tokens"], int) and row["num_tokens"] > 0
    rows = _jsonl(data / "calibration" / "instruction.jsonl")
    assert len(rows) == SMALL["n_calibration_instruction"]
    for row in rows:
        assert {"id", "prompt", "response", "reason", "instruction_id_list", "instruction_list",
                "related_prompt_list", "unrelated_response_spans", "verdict", "meta"} <= set(row)
        assert row["verdict"] == {iid: True for iid in row["instruction_id_list"]}
        for item in row["related_prompt_list"]:
            assert item["prompt_spans"] and item["response_spans"]
            assert all(span in row["prompt"] for span in item["prompt_spans"])
            assert all(span in row["response"] for span in item["response_spans"])
        assert all(span and span in row["response"] for span in row["unrelated_response_spans"])
    # the 'answer is N' statement is the unrelated span exactly when no instruction of the prompt rewrites it
    for row in rows:
        rewritten = any(FORMATS_BY_ID[i].touches_answer for i in row["instruction_id_list"])
        assert bool(row["unrelated_response_spans"]) == (not rewritten and bool(ANSWER_STATEMENT.search(row["response"]))), row


def test_eval_problems_are_held_out(builds: list[Path]) -> None:
    data = builds[0] / "data"
    sets = {name: _jsonl(data / name) for name in (
        "eval/instruction_eval.jsonl", "eval/instruction_val.jsonl", "eval/reasoning_eval.jsonl",
        "calibration/instruction.jsonl", "calibration/reasoning.jsonl")}
    problems = {name: {QUESTION.search(r["prompt"]).group(0) for r in rows} for name, rows in sets.items()}
    names = list(problems)
    for i, a in enumerate(names):
        assert len(problems[a]) == len(sets[a]), f"{a} repeats a problem"
        for b in names[i + 1:]:
            assert not problems[a] & problems[b], (a, b)
    per_prompt = ZooParams(**SMALL).constraints_per_prompt
    assert len(sets["eval/instruction_val.jsonl"]) == SMALL["n_val"]
    for row in sets["eval/instruction_eval.jsonl"] + sets["eval/instruction_val.jsonl"]:
        assert len(row["instruction_id_list"]) == len(row["kwargs"]) == per_prompt and row["answer"].isdigit()
    split = split_problems(ZooParams(**SMALL))
    train = {p.question for p in split.train}
    held = {p.question for pool in (split.eval_instruction, split.eval_reasoning, split.validation,
                                    split.calibration_instruction, split.calibration_reasoning)
            for p in pool}
    assert not train & held
    train_facts = {f for p in split.train for f in p.facts}
    assert all(p.facts <= train_facts for pool in (split.eval_instruction, split.eval_reasoning, split.validation)
               for p in pool)


def test_fine_tunes_move_only_the_embedding_rows_of_tokens_they_see(builds: list[Path]) -> None:
    """Control bytes never occur in the family's texts: their (tied) rows keep the base's values exactly in both
    fine-tunes, while the rows of tokens the fine-tunes train on move (and the base moved the unseen rows)."""
    root = builds[0] / "models"
    tok = AutoTokenizer.from_pretrained(root / "base")
    unseen = tok.convert_tokens_to_ids([chr(0x100 + b) for b in range(1, 9)])  # byte-level forms of bytes 1..8
    seen = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])  # in every fine-tuning batch
    rows = {name: AutoModelForCausalLM.from_pretrained(root / name).get_input_embeddings().weight.detach()
            for name in ("base", "lrm", "itm")}
    params = ZooParams(**SMALL)
    init = new_model(params, build_tokenizer(params)).get_input_embeddings().weight.detach()
    assert (rows["base"][unseen] != init[unseen]).any(dim=1).all()  # unmasked Adam moves every row
    for name in ("lrm", "itm"):
        assert (rows[name][unseen] == rows["base"][unseen]).all(), name
        assert (rows[name][seen] != rows["base"][seen]).any(dim=1).all(), name


def test_baselines_are_chosen_on_validation_and_scored_on_test(builds: list[Path]) -> None:
    """Each method's setting is picked on the validation prompts, and the row reported is measured on the test ones."""
    from rain_tasks.zoo.report import BASELINE_GRID, chosen_baselines

    root = builds[0]
    grid = tuple(next(r for r in BASELINE_GRID if r["method"] == m) for m in ("task_arithmetic", "ties", "dare", "slerp"))
    grid += ({**grid[0], "lam": 2.0},)
    chosen = chosen_baselines(root / "models", root / "data/eval/instruction_val.jsonl",
                              root / "data/eval/instruction_eval.jsonl", grid, max_new_tokens=8)
    assert [c["method"] for c in chosen] == ["task_arithmetic", "ties", "dare", "slerp"]
    assert all(c["val"]["n"] == SMALL["n_val"] and c["test"]["n"] == SMALL["n_eval"] for c in chosen)
    ta = [c for c in chosen if c["method"] == "task_arithmetic"][0]
    assert ta["setting"] in ("lam 0.3", "lam 2") and ta["val"]["lam"] == float(ta["setting"].split()[1])
