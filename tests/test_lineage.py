"""Lineage of a merged model: recorded inside the atomic write with its model card, bit-stable, audited by
`rain verify` and printed by `rain lineage` (the baselines' models carry the same records)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rain_dev.merged_project import make_project, merge_with_lineage
from rain_tasks.audit import card
from rain_tasks.audit import lineage
from rain_tasks.pipeline import runs
from rain_tasks.io.checkpoint import read_metadata
from rain_tasks.cli import main as rain
from rain_tasks.io.digest import tree_digests
from rain_tasks.merge.engine import DeltaPlan, TensorDir, merge_checkpoint
from rain_tasks.params import ModelsParams, load_params
from rain_tasks.pipeline.stages import BASELINES
from rain_tasks.pipeline.runner import run_stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tiny_family, tmp_path) -> Path:
    return make_project(tiny_family, tmp_path / "project")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_fresh_merge_verifies_and_records_its_inputs(project, capsys):
    out = merge_with_lineage(project, project / "models/merged")
    doc = json.loads((out / lineage.LINEAGE).read_text())
    assert doc["core"]["inputs"]["models.lrm"]["files"] == tree_digests(project / "models/lrm")  # every shard
    assert doc["core"]["params"] == {"merge": load_params(project / "params.yaml").merge.model_dump(mode="json")}
    assert set(doc["outputs"]) == set(tree_digests(out)) - {lineage.LINEAGE}
    assert set(doc) == {"core", "core_digest", "outputs", "lineage_digest"}  # nothing volatile: provenance is in the run record
    assert doc["lineage_digest"] == lineage.lineage_digest(doc["core_digest"], doc["outputs"])
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2
    for shard in shards:
        assert read_metadata(shard)["rain_lineage"] == doc["core_digest"]
    assert rain(["verify", str(out), "--project", str(project)]) == 0
    assert "lineage verified" in capsys.readouterr().out


def test_one_byte_of_a_shard_changed_is_reported(project, capsys):
    out = merge_with_lineage(project, project / "models/merged")
    shard = sorted(out.glob("model-*.safetensors"))[1]
    _flip_last_byte(shard)
    report = lineage.verify_lineage(out)
    assert not report.ok
    assert len(report.problems) == 1 and report.problems[0].startswith(f"output: {shard.name} differs: recorded sha256 ")
    assert rain(["verify", str(out)]) == 1
    assert f"MISMATCH: output: {shard.name} differs" in capsys.readouterr().out


def test_changed_calibration_row_and_param_are_reported(project):
    out = merge_with_lineage(project, project / "models/merged")
    calib = project / "data/reasoning.jsonl"
    rows = calib.read_text().splitlines()
    calib.write_text("\n".join([rows[0].replace("answer is", "answer was"), *rows[1:]]) + "\n")
    (project / "params.yaml").write_text(yaml.safe_dump({"merge": {"lam": 2.0}}))
    problems = lineage.verify_lineage(out, project).problems
    assert any(p.startswith("input calibration.reasoning (data/reasoning.jsonl): reasoning.jsonl differs") for p in problems), problems
    assert "param merge.lam: recorded 0.5, now 2.0" in problems
    assert len(problems) == 2, problems


def test_swapped_input_shard_and_foreign_shard_header_are_reported(project):
    out = merge_with_lineage(project, project / "models/merged")
    lrm = sorted((project / "models/lrm").glob("model-*.safetensors"))
    shutil.copy(project / "models/itm" / lrm[0].name, lrm[0])  # an ITM shard where the LRM's was
    problems = lineage.verify_lineage(out, project).problems
    assert problems == [p for p in problems if p.startswith(f"input models.lrm (models/lrm): {lrm[0].name} differs")]
    assert len(problems) == 1


def test_lineage_is_inside_the_atomic_write(project):
    """A merge that fails after its lineage was written leaves no directory at all."""
    def fail(tmp: Path) -> None:
        assert (tmp / lineage.LINEAGE).is_file()
        raise RuntimeError("simulated failure after lineage.json")

    with pytest.raises(RuntimeError, match="simulated"):
        merge_with_lineage(project, project / "models/merged", finalize_extra=fail)
    assert not (project / "models/merged").exists()


def test_identical_merges_are_bit_identical_lineage_included(project):
    a = merge_with_lineage(project, project / "models/a")
    b = merge_with_lineage(project, project / "models/b")
    assert tree_digests(a) == tree_digests(b)


def test_missing_lineage_tells_what_to_do(project, tmp_path):
    plan = DeltaPlan(linear=TensorDir(project / "artifacts/tv"))
    merge_checkpoint(project / "models/lrm", tmp_path / "bare", "task_arithmetic", {"lam": 1.0}, plan)
    assert lineage.verify_lineage(tmp_path / "bare").problems == [
        f"{tmp_path / 'bare'}/{lineage.LINEAGE}: no {lineage.LINEAGE}; not a model written by a merging stage (rerun it) nor a complete release"
    ]


def test_model_card_names_the_three_checkpoints_method_and_params(project):
    out = merge_with_lineage(project, project / "models/merged")
    text = (out / card.CARD).read_text()
    meta = card.front_matter(text)
    assert meta["base_model"] == ["models/base", "models/itm", "models/lrm"]
    assert meta["base_model_relation"] == "merge" and meta["tags"] == ["merge", "rain-merging"]
    assert meta["merge_method"] == "task_arithmetic" and meta["merge_params"] == {"lam": 0.5}
    assert meta["params"] == {"merge": load_params(project / "params.yaml").merge.model_dump(mode="json")}
    assert meta["rain_evaluation"] == {"report": "reports/report.json", "row": "RAIN"}
    assert card.PLACEHOLDER in text
    assert json.loads((out / lineage.LINEAGE).read_text())["outputs"][card.CARD] == tree_digests(out)[card.CARD]


def test_card_names_a_hub_id_its_config_gives(project):
    config = project / "models/itm/config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_name_or_path": "Qwen/Qwen2.5-7B-Instruct"}))
    assert card.checkpoint_name(project, "models/itm") == "Qwen/Qwen2.5-7B-Instruct"
    assert card.checkpoint_name(project, "models/base") == "models/base"


def test_filled_evaluation_still_verifies_but_an_edited_card_does_not(project):
    out = merge_with_lineage(project, project / "models/merged")
    path = out / card.CARD
    path.write_text(card.fill_evaluation(path.read_text(), "| model | IF prompt |\n|---|---:|\n| RAIN | 0.5 |"))
    assert lineage.verify_lineage(out).ok
    path.write_text(path.read_text().replace("base_model_relation: merge", "base_model_relation: finetune"))
    assert [p.split(":")[1].strip() for p in lineage.verify_lineage(out).problems] == [f"{card.CARD} differs"]


def test_lineage_prints_inputs_stages_output(project, capsys):
    out = merge_with_lineage(project, project / "models/merged")
    assert rain(["lineage", str(out)]) == 0
    text = capsys.readouterr().out
    inputs, stages, output = text.index("\ninputs\n"), text.index("\nstages "), text.index("\noutput\n")
    assert inputs < stages < output
    lines = text.splitlines()
    assert any(line.split()[:2] == ["models.lrm", "models/lrm"] for line in lines)
    assert any(line.split()[:2] == ["calibration.reasoning", "data/reasoning.jsonl"] for line in lines)
    assert "  task_vectors: Δ_I = θ_ITM − θ_base per layer (fp32) [not in dvc.lock" in text
    assert "  → merge: Stage 3" in text and "[this run]" in text
    for name, sha in tree_digests(out).items():
        if name != lineage.LINEAGE:
            assert f"{name}" in text[output:] and sha[:16] in text[output:]


def test_baseline_models_carry_lineage_and_card(tiny_family, tmp_path, capsys):
    """The baselines stage records every run like the merge: lineage.json with its own method and params, a card
    naming its report row, shards naming the lineage; and only the inputs the baselines read (no calibration set)."""
    models = ModelsParams(**{k: str(tiny_family[k]) for k in ("base", "itm", "lrm")})
    params = load_params(ROOT / "params.yaml").model_copy(update={"models": models})
    run_stage("task_vectors", params, tmp_path)
    run_stage("baselines", params, tmp_path)
    for run in params.baselines.runs:
        out = tmp_path / BASELINES / run.name
        doc = json.loads((out / lineage.LINEAGE).read_text())
        assert (doc["core"]["method"], doc["core"]["method_params"]) == (run.method, run.method_params())
        assert set(doc["core"]["inputs"]) == {"models.base", "models.itm", "models.lrm", "artifacts/task_vectors"}
        assert doc["core"]["stages"] == ["task_vectors", "baselines"]
        assert card.front_matter((out / card.CARD).read_text())["rain_evaluation"]["row"] == run.name
        assert rain(["verify", str(out)]) == 0, capsys.readouterr().out


def test_volatile_facts_go_to_the_run_record_not_the_models(tiny_family, tmp_path, capsys):
    """Two runs of a merging stage on the same inputs write the same bytes (lineage.json included); each run's
    wall times, host and provenance go to its run record, where `rain lineage` finds them by lineage digest."""
    models = ModelsParams(**{k: str(tiny_family[k]) for k in ("base", "itm", "lrm")})
    params = load_params(ROOT / "params.yaml").model_copy(update={"models": models})
    run_stage("task_vectors", params, tmp_path)
    run_stage("baselines", params, tmp_path)
    first = tree_digests(tmp_path / BASELINES)
    run_stage("baselines", params, tmp_path)
    assert tree_digests(tmp_path / BASELINES) == first
    records = runs.read_runs(tmp_path, "baselines")
    assert len(records) == 2 and records[0]["finished_at"] <= records[1]["finished_at"]
    name = params.baselines.runs[0].name
    doc = json.loads((tmp_path / BASELINES / name / lineage.LINEAGE).read_text())
    assert records[1]["models"][name]["lineage"] == doc["core_digest"]
    assert records[1]["models"][name]["merge_time_s"] > 0
    assert records[1]["provenance"]["prefect_flow_run_id"] is None and records[1]["provenance"]["libraries"]["torch"]
    assert runs.find_run(tmp_path, doc["core_digest"]) == records[1]
    assert rain(["lineage", str(tmp_path / BASELINES / name), "--project", str(tmp_path)]) == 0
    assert f"stage baselines ran on {records[1]['host']} at {records[1]['finished_at']}" in capsys.readouterr().out
    assert rain(["lineage", str(tmp_path / BASELINES / name), "--project", str(tmp_path / "elsewhere")]) == 0
    assert "provenance: no run record in" in capsys.readouterr().out
