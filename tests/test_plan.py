"""`rain plan`: tokens from really tokenizing the sets, parameters from the headers, memory and disk per stage."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from rain_dev.tiny import reasoning_rows, write_jsonl
from torch.utils.flop_counter import FlopCounterMode

from rain_tasks.io.arch import read_shape
from rain_tasks.io.artifacts import layer_file
from rain_tasks.merge.task_vectors import compute_task_vectors
from rain_tasks.model.calibration import load_tokenizer, render_sample
from rain_tasks.io.checkpoint import Checkpoint, load_tensors, read_metadata
from rain_tasks.model.runtime import load_causal_lm
from rain_tasks.cli import main
from rain_tasks.params import FeaturesParams, ProjectionParams, load_params
from rain_tasks.pipeline.plan import projection_set_flops, row_set_outputs, stage_plans
from rain_tasks.io.schemas import load_records
from rain_tasks.stage1.features import (accumulate_features, layer_bytes, prepare_reasoning_samples, row_set_biases,
                                        row_set_dims, row_set_rows)
from rain_tasks.stage1.projection import load_stats, project_layer


def _project(tiny_family, tmp_path, runtime: dict | None = None, **sections: dict):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", reasoning_rows(3))
    params = {"models": {k: str(tiny_family[k]) for k in ("base", "itm", "lrm")},
              "calibration": {"reasoning": str(tiny_family["reasoning"]), "instruction": str(tiny_family["instruction"]),
                              "reasoning_heldout": str(heldout)},
              "runtime": runtime or {"device": "cpu"}, **sections}
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


def test_planned_projection_grows_with_the_rows_below_the_width_not_with_its_cube():
    d, out = 4096, [4096, 4096]
    few, twice = projection_set_flops(64, d, out, 16), projection_set_flops(128, d, out, 32)
    assert few < 10 * d**3 / 30  # 64 rows of width 4096: the old model charged every set 10·d³ whatever its rows
    assert 1.9 < twice / few < 4.1  # n²·d terms (forming X Xᵀ, the products, the diagnostics), not d³
    assert projection_set_flops(2 * d, d, out, 2 * d) == projection_set_flops(3 * d, d, out, 3 * d)  # Gram path: n is gone
    assert projection_set_flops(2 * d, d, out, 2 * d) > 10 * d**3


@pytest.fixture(scope="module")
def stage1_small(tiny_family, tmp_path_factory):
    """Task vectors and features of two calibration samples (some sets narrower than wide) and three held-out ones."""
    root = tmp_path_factory.mktemp("plan_stage1")
    compute_task_vectors(tiny_family["base"], tiny_family["itm"], root / "tv")
    heldout = write_jsonl(root / "heldout.jsonl", reasoning_rows(3))
    params = FeaturesParams(max_samples=2)
    accumulate_features(tiny_family["lrm"], tiny_family["reasoning"], params, root / "features")
    accumulate_features(tiny_family["lrm"], heldout, params, root / "heldout")
    tok = load_tokenizer(tiny_family["lrm"])
    samples = {name: prepare_reasoning_samples(load_records(path, "reasoning")[:2], tok, params)[0]
               for name, path in (("features", tiny_family["reasoning"]), ("heldout", heldout))}
    return root, samples


def test_planned_row_counts_bound_what_the_features_accumulate(stage1_small, tiny_family):
    root, samples = stage1_small
    shape, ckpt = read_shape(tiny_family["lrm"]), Checkpoint(tiny_family["lrm"])
    for kind in ("features", "heldout"):
        for layer in range(shape.num_layers):
            meta = read_metadata(layer_file(root / kind, layer))
            dims = row_set_dims(shape, row_set_biases(ckpt, shape, layer))
            planned, counted = row_set_rows(dims, samples[kind], shape), json.loads(meta["rows"])
            assert json.loads(meta["dims"]) == dims and set(planned) == set(counted)
            assert all(planned[s] == n for s, n in counted.items() if not s.startswith("k."))  # |Ω| and n_rep·|Ω|: exact
            assert all(counted[s] <= planned[s] for s in counted if s.startswith("k."))  # key_mass keeps at most every token
            stored = sum(t.numel() * t.element_size() for t in load_tensors(layer_file(root / kind, layer)).values())
            assert stored <= layer_bytes(dims, samples[kind], shape, True)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_planned_projection_work_bounds_the_products_the_projection_runs(stage1_small, tiny_family, precision):
    root, samples = stage1_small
    shape, ckpt = read_shape(tiny_family["lrm"]), Checkpoint(tiny_family["lrm"])
    dims = row_set_dims(shape, row_set_biases(ckpt, shape, 0))
    rows, held, outs = (row_set_rows(dims, samples["features"], shape), row_set_rows(dims, samples["heldout"], shape),
                        row_set_outputs(ckpt, shape, 0))
    planned = sum(projection_set_flops(rows[s], d, outs[s], held[s]) for s, d in dims.items())
    eigh = sum(10 * min(rows[s], d) ** 3 for s, d in dims.items())  # not counted by FlopCounterMode (nor the QR)
    counter = FlopCounterMode(display=False)
    with counter:
        project_layer(load_tensors(layer_file(root / "tv", 0)), load_stats(layer_file(root / "features", 0)), shape, 0,
                      ProjectionParams(precision=precision), load_stats(layer_file(root / "heldout", 0)))
    counted = counter.get_total_flops()
    assert counted <= planned - eigh < 3 * counted  # the matrix products the plan charges, within a small factor


def test_projection_memory_follows_the_working_precision(tiny_family, tmp_path):
    plans = {precision: {p.stage: p for p in stage_plans(_project(tiny_family, tmp_path, projection={"precision": precision}),
                                                         tmp_path)[1]}["projection"]
             for precision in ("float64", "float32")}
    assert plans["float32"].peak_bytes < plans["float64"].peak_bytes
    assert plans["float32"].flops == plans["float64"].flops
