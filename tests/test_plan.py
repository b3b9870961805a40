"""`rain plan`: tokens from really tokenizing the sets, parameters from the headers, memory and disk per stage."""

from __future__ import annotations

import math

import yaml
from rain_dev.tiny import reasoning_rows, write_jsonl

from rain_tasks.model.calibration import load_tokenizer, render_sample
from rain_tasks.io.checkpoint import Checkpoint
from rain_tasks.model.runtime import load_causal_lm
from rain_tasks.cli import main
from rain_tasks.params import load_params
from rain_tasks.pipeline.plan import stage_plans
from rain_tasks.io.schemas import load_records


def _project(tiny_family, tmp_path, runtime: dict | None = None):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", reasoning_rows(3))
    params = {"models": {k: str(tiny_family[k]) for k in ("base", "itm", "lrm")},
              "calibration": {"reasoning": str(tiny_family["reasoning"]), "instruction": str(tiny_family["instruction"]),
                              "reasoning_heldout": str(heldout)},
              "runtime": runtime or {"device": "cpu"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return load_params(tmp_path / "params.yaml")


def test_plan_counts_what_the_stages_will_read(tiny_family, tmp_path, capsys):
    params = _project(tiny_family, tmp_path)
    facts, plans = stage_plans(params, tmp_path)
    tok = load_tokenizer(tiny_family["lrm"])
    reasoning = sum(len(render_sample(tok, r["prompt"], r["reasoning"], r["response"]))
                    for path in (tiny_family["reasoning"], tmp_path / "heldout.jsonl") for r in load_records(path, "reasoning"))
    instruction = sum(len(render_sample(tok, r["prompt"], r["reason"], r["response"])) for r in load_records(tiny_family["instruction"], "instruction"))
    assert facts["tokens"]["reasoning"] == reasoning and facts["tokens"]["instruction"] == instruction
    assert facts["parameters"] == sum(p.numel() for p in load_causal_lm(tiny_family["lrm"]).parameters())
    ckpt = Checkpoint(tiny_family["lrm"])
    assert facts["disk_bytes"]["merged model"] == sum(math.prod(ckpt.shape(n)) * 4 for n in ckpt.names())
    by_stage = {p.stage: p for p in plans}
    assert by_stage["attention_stats"].tokens == 3 * instruction  # θ_R, and one and two steps along the update
    assert all(p.peak_bytes >= facts["parameters"] * 4 for p in plans if p.stage in ("features", "attention_stats"))
    bf16 = stage_plans(_project(tiny_family, tmp_path, {"device": "cpu", "dtype": "bfloat16"}), tmp_path)[1]
    assert bf16[0].peak_bytes < by_stage["features"].peak_bytes  # half the bytes per weight and activation
    assert main(["plan", "--project", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{facts['parameters']:,}" in out and "throughput constants:" in out
