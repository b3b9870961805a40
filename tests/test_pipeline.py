"""The whole pipeline for real: `dvc repro` in a fresh git+DVC repository and the Prefect flow.

The mini family (same code path, 2 layers of width 32, a few training steps) keeps this to a few minutes: the
checks here run on a copy of the session's `dvc repro`-made mini project; the default family's properties are
tested in test_family.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from rain_dev.projects import ROOT, mini_env, output_digests, run_flow, sh
from rain_tasks.io.arch import read_shape
from rain_tasks.io.checkpoint import Checkpoint, load_tensors
from rain_tasks.io.digest import path_digest
from rain_tasks.pipeline.runs import read_runs
from rain_tasks.pipeline.stages import STAGES, dvc_yaml


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dvc_project(mini_repro, tmp_path_factory):
    """A copy of the session's mini project after `dvc repro` (git history, DVC cache and outputs), so the sweep and
    the param change below do not touch the project the orchestrator tests share; and the repro's log."""
    source, _, _, log = mini_repro
    tmp = tmp_path_factory.mktemp("dvc")
    env = mini_env(tmp)
    root = tmp / "project"
    shutil.copytree(source, root, symlinks=True)
    assert "up to date" in sh(["dvc", "status"], root, env)
    return root, env, log


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z_]+)'", log))


def test_dvc_yaml_is_generated_from_the_registry():
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text()) == dvc_yaml(), "dvc.yaml is stale: run `rain dvc-yaml`"


def _tensors(directory: Path, pattern: str = "layer_*.safetensors") -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob(pattern)):
        tensors.update(load_tensors(f))
    return tensors


def _other_update(root: Path, scope: str) -> dict[str, torch.Tensor]:
    """What scope gives the tensors outside the Linear modules: Δ_I under 'all', nothing under 'linear'."""
    return _tensors(root / "artifacts/task_vectors", "*.safetensors") if scope == "all" else {}


def test_merged_model_is_lrm_plus_scaled_projected_update(dvc_project):
    """θ_merged = θ_R + λ·α⊙Δ⊥ tensor by tensor; embeddings and norms θ_R + λ·Δ_I under scope 'all', else the LRM's."""
    root, _, _ = dvc_project
    merge = yaml.safe_load((root / "params.yaml").read_text())["merge"]
    lam = merge["lam"]
    lrm, merged = Checkpoint(root / "models/lrm"), Checkpoint(root / "models/merged")
    scales = load_tensors(root / "artifacts/alpha/scales.safetensors")
    projected, other = _tensors(root / "artifacts/projected"), _other_update(root, merge["scope"])
    assert set(projected) and set(projected) <= set(lrm.names())
    table = pd.read_parquet(root / "artifacts/alpha/alpha.parquet").sort_values(["layer", "head"])
    shape = read_shape(root / "models/lrm")
    per_head = torch.cat([scales[f"model.layers.{l}.self_attn.q_proj.weight"][:: shape.head_dim, 0] for l in range(shape.num_layers)])
    torch.testing.assert_close(per_head, torch.tensor(table["alpha"].to_numpy(), dtype=torch.float32))  # Stage 2's own α
    assert not (table["alpha"] == 0.5).all()  # not yet pinned by the param-change test, which runs last
    for name in lrm.names():
        theta = lrm.get(name).float()
        update = scales[name] * projected[name] if name in projected else other.get(name, 0.0)
        assert torch.equal(merged.get(name), (theta + lam * update).to(lrm.get(name).dtype)), name
    assert len(merged.shards) >= 2


@pytest.mark.parametrize("name, projected, scales_file", [
    ("rain_stage1_only", True, None), ("rain_stage2_only", False, "scales"),
    ("rain_uniform_alpha", True, "scales_uniform"), ("rain_permuted_alpha", True, "scales_permuted"),
])
def test_ablations_change_one_part(dvc_project, name, projected, scales_file):
    """Stage 1 only: θ_R + λ·Δ⊥ (α = 1); Stage 2 only: θ_R + λ·α⊙Δ_I (unprojected); the controls: θ_R + λ·α'⊙Δ⊥ with
    α' every head's mean or α permuted (same mean); on the same tensors as RAIN."""
    root, _, _ = dvc_project
    merge = yaml.safe_load((root / "params.yaml").read_text())["merge"]
    lam = merge["lam"]
    lrm, model = Checkpoint(root / "models/lrm"), Checkpoint(root / "models/ablations" / name)
    scaled = scales_file is not None
    scales = load_tensors(root / f"artifacts/alpha/{scales_file}.safetensors") if scaled else {}
    if scales_file in ("scales_uniform", "scales_permuted"):  # same mean α as the merge's, other allocation
        alpha = load_tensors(root / "artifacts/alpha/scales.safetensors")
        q = [n for n in alpha if n.endswith("q_proj.weight")]
        mean = lambda t: torch.cat([t[n].flatten() for n in q]).mean()  # noqa: E731
        assert mean(scales).item() == pytest.approx(mean(alpha).item(), rel=1e-5)
    linear, other = _tensors(root / "artifacts/projected"), _other_update(root, merge["scope"])
    deltas = linear if projected else _tensors(root / "artifacts/task_vectors")
    for tensor in lrm.names():
        theta = lrm.get(tensor).float()
        update = (scales[tensor] if scaled else 1.0) * deltas[tensor] if tensor in linear else other.get(tensor, 0.0)
        assert torch.equal(model.get(tensor), (theta + lam * update).to(lrm.get(tensor).dtype)), tensor


def test_paper_preset_is_method_md_as_published(dvc_project):
    """models/paper_preset = θ_R + 1·α⊙Δ⊥ on the Linear modules only, from its own Δ⊥ (energy 0.99) and two-pass α."""
    root, _, _ = dvc_project
    work = root / "artifacts/paper_preset"
    lrm, model = Checkpoint(root / "models/lrm"), Checkpoint(root / "models/paper_preset")
    scales, projected = load_tensors(work / "scales.safetensors"), _tensors(work / "projected")
    assert pd.read_parquet(work / "projection.parquet")["energy_protected"].min() >= 0.99 - 1e-9
    alpha = pd.read_parquet(work / "alpha.parquet")
    assert (alpha["alpha"] == alpha["alpha_solved"]).all()  # absolute: α as solved
    for name in lrm.names():
        theta = lrm.get(name).float()
        want = theta + scales[name] * projected[name] if name in projected else theta
        assert torch.equal(model.get(name), want.to(lrm.get(name).dtype)), name


def test_merged_model_loads_and_generates(dvc_project):
    from transformers import AutoModelForCausalLM

    from rain_tasks.model.calibration import load_tokenizer

    root, _, _ = dvc_project
    model = AutoModelForCausalLM.from_pretrained(root / "models/merged")
    tok = load_tokenizer(root / "models/merged")
    prompt = tok.apply_chat_template([{"role": "user", "content": "add 2 and 3 then sub 1 ."}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_evaluate_writes_metrics_plots_and_report(dvc_project):
    root, env, _ = dvc_project
    shown = sh(["dvc", "metrics", "show"], root, env)
    assert "RAIN" in shown and "close_rate" in shown
    report = (root / "reports/report.md").read_text()
    params = yaml.safe_load((root / "params.yaml").read_text())
    merged = ["RAIN", "rain_stage1_only", "rain_stage2_only", *(run["name"] for run in params["baselines"]["runs"])]
    for model in ("LRM", "ITM", *merged):
        assert f"| {model} |" in report
    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert metrics["contamination"] == {"instruction_eval": 0, "reasoning_eval": 0}
    times = {name: m["merge_time_s"] for stage in ("merge", "ablations", "baselines")
             for name, m in read_runs(root, stage)[-1]["models"].items()}  # volatile: in the run records only
    for model in merged:
        assert times[model] > 0 and "merge_time_s" not in metrics[model]
        assert metrics[model]["missing_close_rate"] == pytest.approx(1 - metrics[model]["close_rate"])
        # the zoo's eval prompts carry one instruction each, so prompt and instruction level agree
        assert metrics[model]["comply_rate"] == metrics[model]["comply_instruction_rate"]
    assert json.loads((root / "reports/report.json").read_text())["models"].keys() == metrics.keys() - {"contamination"}
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report):
        assert (root / "reports" / png).resolve().read_bytes()[:4] == b"\x89PNG", png
    assert "baselines_lambda.png" in report and "orthogonality.png" in report and "alpha_heatmap.png" in report


def test_energy_sweep_runs_experiments_and_restores_the_workspace(dvc_project):
    """`rain sweep projection.energy`: one DVC experiment per value, a table/plot of RAIN's metrics
    against the energy protected, and params.yaml plus every output back as they were. The second point is the
    project's own energy: its experiment is restored from DVC's run cache (nothing recomputed)."""
    root, env, _ = dvc_project
    params_before = (root / "params.yaml").read_text()
    energy = yaml.safe_load(params_before)["projection"]["energy"]
    assert energy > 0.5
    merged_before = path_digest(root / "models/merged")
    sh(["rain", "sweep", "projection.energy", "0.5", str(energy)], root, env)
    table = pd.read_csv(root / "plots/sweeps/projection.energy.csv")
    assert table["projection.energy"].tolist() == [0.5, energy]
    assert table["energy_protected"].iloc[0] < table["energy_protected"].iloc[1]
    assert table["norm_ratio"].iloc[0] > table["norm_ratio"].iloc[1]  # protecting more keeps less of Δ
    assert table[["close_rate", "comply_rate", "l_think", "h_drift", "residual_heldout"]].notna().all().all()
    assert (root / "plots/sweeps/projection.energy.png").read_bytes()[:4] == b"\x89PNG"
    experiments = sh(["dvc", "exp", "list", "--name-only"], root, env).split()
    assert len(experiments) == 2
    diff = sh(["dvc", "metrics", "diff", *experiments, "--json"], root, env)
    changed = json.loads(diff[diff.index("{"):])["metrics/eval.json"]
    assert "RAIN.l_think" in changed and changed["RAIN.l_think"]["diff"] != 0, changed
    assert (root / "params.yaml").read_text() == params_before
    assert path_digest(root / "models/merged") == merged_before
    assert "up to date" in sh(["dvc", "status"], root, env)
    with pytest.raises(AssertionError, match="not a params.yaml parameter"):
        sh(["rain", "sweep", "projection.energie", "0.5"], root, env)


def test_prefect_flow_matches_dvc_and_second_run_is_all_cache_hits(mini_flow, mini_repro):
    """The flow on a fresh project gives the same artifacts as `dvc repro` on another (the mini family, every tracked
    output, lineage.json included); a rerun of the flow executes nothing."""
    flow_root, env, first = mini_flow
    _, _, reference, _ = mini_repro
    assert "cached=0" in first, first
    assert output_digests(flow_root) == reference
    second, ran = run_flow(flow_root, env)
    assert ran == set() and f"cached={len(STAGES)} completed=0" in second, second


def test_dvc_repro_runs_every_stage_and_param_change_reruns_downstream_only(dvc_project):
    """Last in this module: it pins every α, so the tensor checks above run on Stage 2's own α."""
    root, env, log = dvc_project
    assert _ran(log) == {s.name for s in STAGES}
    assert "up to date" in sh(["dvc", "status"], root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["alpha"].update(box_lo=0.5, box_hi=0.5)  # pins every α: the merged model must change
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = sh(["dvc", "status"], root, env)
    assert re.findall(r"^([a-z_]+):", status, flags=re.M) == ["alpha", "paper_preset"]  # the preset's α shares the box
    rerun = sh(["dvc", "repro"], root, env)
    assert _ran(rerun) == {"alpha", "paper_preset", "merge", "ablations", "evaluate"}
    assert "up to date" in sh(["dvc", "status"], root, env)
