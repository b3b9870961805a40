"""Evaluation data hygiene (contamination), the λ table, and the optional lm-eval HFLM path on a tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from rain_tasks.evaluate.evaluation import ContaminationError, contaminated_prompts, lambda_table, lm_eval_scores, require_uncontaminated
from rain_tasks.params import Params
from rain_tasks.pipeline.stages import EVAL_DIR, _contamination
from rain_tasks.params import ZooParams
from rain_tasks.zoo.tasks import split_problems, write_datasets
from rain_tasks.zoo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory) -> Path:
    """The default family's calibration and evaluation files (no models), laid out as the pipeline writes them."""
    root = tmp_path_factory.mktemp("zoo_data")
    zoo = ZooParams()
    write_datasets(split_problems(zoo), build_tokenizer(zoo), root / "data/calibration", root / EVAL_DIR, zoo)
    return root


def test_zoo_heldout_sets_share_no_prompt_with_calibration(zoo_data):
    assert _contamination(Params(), zoo_data) == {"instruction_eval": 0, "reasoning_eval": 0, "instruction_val": 0}


def test_injected_duplicate_is_caught(zoo_data, tmp_path):
    """A calibration prompt copied into the instruction eval set (spacing and case changed) fails the check by name."""
    calibration = json.loads((zoo_data / "data/calibration/instruction.jsonl").read_text().splitlines()[3])
    eval_rows = [json.loads(line) for line in (zoo_data / EVAL_DIR / "instruction_eval.jsonl").read_text().splitlines()]
    eval_rows[5]["prompt"] = "  " + calibration["prompt"].upper().replace(" ", "  ")
    found = contaminated_prompts({"instruction_eval": [r["prompt"] for r in eval_rows]}, [calibration["prompt"]])
    assert [len(v) for v in found.values()] == [1]
    with pytest.raises(ContaminationError, match=r"\{'instruction_eval': 1\}"):
        require_uncontaminated(found)
    # and end to end through the stage's own check, on a copy of the data with the duplicate written in
    for rel in ("data/calibration/reasoning.jsonl", "data/calibration/instruction.jsonl", f"{EVAL_DIR}/reasoning_eval.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((zoo_data / rel).read_text())
    (tmp_path / EVAL_DIR / "instruction_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    with pytest.raises(ContaminationError, match="held-out evaluation prompts also occur in a calibration set"):
        _contamination(Params(), tmp_path)


def test_lambda_table_keeps_task_arithmetic_runs_sorted_by_scope_and_lambda():
    runs = [run.model_dump(mode="json") for run in Params.model_validate(
        yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())).baselines.runs]
    results = {r["name"]: {"comply_rate": i, "correct_rate": 0.0, "missing_close_rate": 0.0, "l_think": 0.0} for i, r in enumerate(runs)}
    table = lambda_table(results, runs)
    ta = [r for r in runs if r["method"] == "task_arithmetic"]
    assert sorted(table["model"]) == sorted(r["name"] for r in ta) and len(ta) < len(runs)
    assert list(table.itertuples(index=False, name=None)) == sorted(table.itertuples(index=False, name=None), key=lambda t: (t[2], t[1]))


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-eval not installed: .venv/bin/pip install --no-deps -r requirements-eval.txt")
def test_lm_eval_hflm_on_a_local_task_agrees_with_our_loglikelihoods(tiny_family, tmp_path):
    """evaluate.lm_eval_tasks path, offline: HFLM on the tiny checkpoints with a local multiple-choice task;
    its accuracy equals the argmax of log p(choice | question) computed here with the same model."""
    from rain_tasks.model.calibration import load_tokenizer
    from rain_tasks.model.generation import load_model

    docs = [{"question": f"add {i} and {j} then sub 1 . answer is", "choices": [str(i), str(j), str(i + j)], "label": k % 3}
            for k, (i, j) in enumerate((a, b) for a in range(1, 5) for b in range(2, 5))]
    (tmp_path / "tiny_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = {"task": "tiny_mc", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"test": str(tmp_path / "tiny_mc.jsonl")}, "cache_dir": str(tmp_path / "cache")},
            "doc_to_text": "question", "doc_to_choice": "choices", "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/tiny_mc.yaml").write_text(yaml.safe_dump(task))
    models = {"LRM": tiny_family["lrm"], "ITM": tiny_family["itm"]}
    scores = lm_eval_scores(models, ["tiny_mc"], None, tmp_path / "tasks")
    tok = load_tokenizer(tiny_family["lrm"])
    for name, path in models.items():
        model = load_model(path)[0]
        hits = 0
        for d in docs:
            ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
            scores_per_choice = []
            for choice in d["choices"]:
                ids = tok(d["question"] + " " + choice, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                scores_per_choice.append(sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids))))
            hits += max(range(len(scores_per_choice)), key=scores_per_choice.__getitem__) == d["label"]
        assert scores[name]["tiny_mc"]["acc,none"] == pytest.approx(hits / len(docs)), name


def _early_closer(lrm: Path, dest: Path, logit_gain: float) -> Path:
    """The LRM with the `</think>` output row moved along the mean final hidden state (tied embeddings), so its
    logit rises by about `logit_gain` wherever the model thinks: it predicts `</think>` more everywhere."""
    from transformers import AutoModelForCausalLM

    from rain_tasks.model.calibration import load_tokenizer, think_token_ids

    model, tok = AutoModelForCausalLM.from_pretrained(lrm), load_tokenizer(lrm)
    close_id = think_token_ids(tok)[1]
    with torch.no_grad():
        ids = tok("add 3 and 4 then sub 1 . <think> 3 plus 4 is 7 .", return_tensors="pt", add_special_tokens=False)["input_ids"]
        v = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        model.get_output_embeddings().weight[close_id] += logit_gain * v / v.square().sum()
    model.save_pretrained(dest)
    load_tokenizer(lrm).save_pretrained(dest)
    return dest


def test_thinking_metrics_beyond_omega(tiny_family, tmp_path):
    """kl_close and early_close_mass are 0 / the LRM's own for the LRM and grow when a model favours `</think>`;
    the KL on a model's own generations is 0 for the LRM and positive for a different model."""
    from rain_tasks.evaluate.evaluation import own_generation_kl
    from rain_dev.checks import think_invariance
    from rain_tasks.model.generation import load_model
    from rain_dev.tiny import reasoning_rows

    lrm = tiny_family["lrm"]
    closer = _early_closer(lrm, tmp_path / "closer", 3.0)
    result = think_invariance(lrm, {"LRM": lrm, "closer": closer}, reasoning_rows(6), 2)
    assert result["LRM"]["kl_close"] == 0.0 and result["LRM"]["l_think"] == 0.0
    assert result["closer"]["kl_close"] > 1e-4
    assert result["closer"]["early_close_mass"] > 2 * result["LRM"]["early_close_mass"] > 0
    reference, tok = load_model(lrm)
    prompts = [r["prompt"] for r in reasoning_rows(4)]
    assert own_generation_kl(reference, reference, tok, prompts, 12, 4) == 0.0
    assert own_generation_kl(reference, load_model(tiny_family["itm"])[0], tok, prompts, 12, 4) > 0.0


def test_frontier_table_and_figure(tmp_path):
    from rain_tasks.evaluate.evaluation import frontier_table, write_frontier

    results = {f"{m}{lam}": {"comply_rate": c, "close_correct_rate": cc, "l_think": lt, "kl_own": 0.1}
               for m, lam, c, cc, lt in [("ta", 2.0, 0.6, 0.3, 1e-2), ("ta", 1.0, 0.9, 0.95, 1e-3), ("rain", 1.0, 0.8, 1.0, 1e-4)]}
    models = {"ta2.0": ("task arithmetic (all)", 2.0), "ta1.0": ("task arithmetic (all)", 1.0), "rain1.0": ("RAIN (linear)", 1.0),
              "missing": ("RAIN (linear)", 3.0)}
    table = frontier_table(results, models)
    assert list(table["model"]) == ["rain1.0", "ta1.0", "ta2.0"]  # by method, then λ; absent models left out
    write_frontier(table, tmp_path / "f.csv", tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(pd.read_csv(tmp_path / "f.csv").columns) == ["model", "method", "lam", "comply_rate", "close_correct_rate",
                                                            "l_think", "kl_own"]


def test_lm_eval_runs_give_each_budgeted_task_its_own_call_with_the_sampling():
    from rain_tasks.evaluate.evaluation import lm_eval_backend, lm_eval_runs
    from rain_tasks.params import EvaluateParams

    e = EvaluateParams(lm_eval_tasks=["ifeval", "gsm8k", "mmlu"], lm_eval_max_new_tokens={"gsm8k": 32768},
                       temperature=0.6, top_p=0.95, num_samples=4)
    assert lm_eval_runs(e.lm_eval_tasks, e) == [
        (["ifeval", "mmlu"], "do_sample=True,temperature=0.6,top_p=0.95"),
        (["gsm8k"], "do_sample=True,temperature=0.6,top_p=0.95,max_gen_toks=32768"),
    ]
    assert lm_eval_runs(["ifeval"], EvaluateParams(lm_eval_tasks=["ifeval"])) == [(["ifeval"], "do_sample=False")]
    with pytest.raises(ValueError, match="not in lm_eval_tasks"):
        EvaluateParams(lm_eval_tasks=["ifeval"], lm_eval_max_new_tokens={"gsm8k": 10})
    assert lm_eval_backend("auto") == "hf"  # vLLM is not installed here (and there is no GPU)
    assert lm_eval_backend("hf") == "hf"
    with pytest.raises(RuntimeError, match="vllm is not installed"):
        lm_eval_backend("vllm")
