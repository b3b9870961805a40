"""The whole pipeline for real: `dvc repro` in a fresh git+DVC repository and the Prefect flow.

A scaled-down zoo (same code path, fewer steps) keeps this to a few minutes; the default
family's properties are tested in test_family.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from rain_tasks.checkpoint import Checkpoint, load_tensors
from rain_tasks.digest import path_digest
from rain_tasks.stages import STAGES, dvc_yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL_ZOO = {
    "base_steps": 40, "lrm_steps": 10, "itm_steps": 10, "warmup_steps": 5,
    "n_calibration_reasoning": 8, "n_calibration_instruction": 8, "n_eval": 12, "n_eval_reasoning": 6,
}
COMPARED = ["artifacts/task_vectors", "artifacts/features", "artifacts/projected", "artifacts/alpha", "models/merged"]

pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "prefect" / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": "",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }


def _sh(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def _fresh_project(dest: Path, env: dict) -> Path:
    """A clean copy of the tracked project files as its own git repository, with the small zoo."""
    dest.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in files.stdout.split():
        if (ROOT / rel).is_file() and not rel.startswith(("models/", "artifacts/", "data/calibration", "data/eval")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["zoo"].update(SMALL_ZOO)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(["git", "init", "-q"], dest, env)
    _sh(["git", "add", "-A"], dest, env)
    _sh(["git", "commit", "-qm", "init"], dest, env)
    return dest


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dvc")
    env = _env(tmp)
    root = _fresh_project(tmp / "project", env)
    log = _sh(["dvc", "repro"], root, env)
    return root, env, log


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z_]+)'", log))


def test_dvc_yaml_is_generated_from_the_registry():
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text()) == dvc_yaml(), "dvc.yaml is stale: run `rain dvc-yaml`"


def test_dvc_repro_runs_every_stage_and_param_change_reruns_downstream_only(dvc_project):
    root, env, log = dvc_project
    assert _ran(log) == {s.name for s in STAGES}
    assert "up to date" in _sh(["dvc", "status"], root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["alpha"].update(box_lo=0.5, box_hi=0.5)  # pins every α: the merged model must change
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _sh(["dvc", "status"], root, env)
    assert re.findall(r"^([a-z_]+):", status, flags=re.M) == ["alpha"]
    rerun = _sh(["dvc", "repro"], root, env)
    assert _ran(rerun) == {"alpha", "merge", "evaluate"}
    assert "up to date" in _sh(["dvc", "status"], root, env)


def test_merged_model_is_lrm_plus_scaled_projected_update(dvc_project):
    """θ_merged = θ_R + λ·α⊙Δ⊥ tensor by tensor; everything else is the LRM's."""
    root, _, _ = dvc_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    lam = params["merge"]["lam"]
    lrm, merged = Checkpoint(root / "models/lrm"), Checkpoint(root / "models/merged")
    scales = load_tensors(root / "artifacts/alpha/scales.safetensors")
    projected = {}
    for f in sorted((root / "artifacts/projected").glob("layer_*.safetensors")):
        projected.update(load_tensors(f))
    assert set(projected) and set(projected) <= set(lrm.names())
    for name in lrm.names():
        theta = lrm.get(name).float()
        expected = theta + lam * (scales[name] * projected[name]) if name in projected else theta
        assert torch.equal(merged.get(name), expected.to(lrm.get(name).dtype)), name
    assert len(merged.shards) >= 2


def test_merged_model_loads_and_generates(dvc_project):
    from transformers import AutoModelForCausalLM

    from rain_tasks.calibration import load_tokenizer

    root, _, _ = dvc_project
    model = AutoModelForCausalLM.from_pretrained(root / "models/merged")
    tok = load_tokenizer(root / "models/merged")
    prompt = tok.apply_chat_template([{"role": "user", "content": "add 2 and 3 then sub 1 ."}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_evaluate_writes_metrics_plots_and_report(dvc_project):
    root, env, _ = dvc_project
    shown = _sh(["dvc", "metrics", "show"], root, env)
    assert "RAIN" in shown and "close_rate" in shown
    report = (root / "reports/report.md").read_text()
    for model in ("LRM", "ITM", "RAIN", "ta_all_1.0"):
        assert f"| {model} |" in report


def test_energy_sweep_runs_experiments_and_restores_the_workspace(dvc_project):
    """`rain sweep projection.energy`: one DVC experiment per value, a table/plot of RAIN's metrics
    against the energy protected, and params.yaml plus every output back as they were."""
    root, env, _ = dvc_project
    params_before = (root / "params.yaml").read_text()
    merged_before = path_digest(root / "models/merged")
    _sh(["rain", "sweep", "projection.energy", "0.5", "1.0"], root, env)
    table = pd.read_csv(root / "plots/sweeps/projection.energy.csv")
    assert table["projection.energy"].tolist() == [0.5, 1.0]
    assert table["energy_protected"].iloc[0] < table["energy_protected"].iloc[1]
    assert table["norm_ratio"].iloc[0] > table["norm_ratio"].iloc[1]  # protecting more keeps less of Δ
    assert table[["close_rate", "comply_rate", "l_think", "h_drift", "residual_heldout"]].notna().all().all()
    assert (root / "plots/sweeps/projection.energy.png").read_bytes()[:4] == b"\x89PNG"
    assert len(_sh(["dvc", "exp", "list", "--name-only"], root, env).split()) == 2
    assert (root / "params.yaml").read_text() == params_before
    assert path_digest(root / "models/merged") == merged_before
    assert "up to date" in _sh(["dvc", "status"], root, env)
    with pytest.raises(AssertionError, match="not a params.yaml parameter"):
        _sh(["rain", "sweep", "projection.energie", "0.5"], root, env)


def test_prefect_flow_matches_dvc_and_second_run_is_all_cache_hits(dvc_project, tmp_path):
    """The flow on a fresh copy gives the same artifacts as dvc repro; a rerun executes nothing."""
    dvc_root, _, _ = dvc_project
    env = _env(tmp_path)
    root = _fresh_project(tmp_path / "project", env)
    params = yaml.safe_load((dvc_root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    script = ROOT / "tests" / "flow_states.py"
    first = _sh([sys.executable, str(script), str(root)], root, env)
    assert "cached=0" in first, first
    for rel in COMPARED:
        assert path_digest(root / rel) == path_digest(dvc_root / rel), rel
    second = _sh([sys.executable, str(script), str(root)], root, env)
    assert f"cached={len(STAGES)} completed=0" in second, second
