"""Lineage of a merged model: recorded inside the atomic write, bit-stable, and audited by `rain verify-lineage`.

A small project on the tiny random family: the three checkpoints, a calibration set, task
vectors and a task-arithmetic merge whose lineage records all of them and its params.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rain_tasks import lineage
from rain_tasks.checkpoint import read_metadata
from rain_tasks.cli import main as rain
from rain_tasks.digest import tree_digests
from rain_tasks.merge import DeltaPlan, TensorDir, merge_checkpoint
from rain_tasks.params import load_params
from rain_tasks.stages import param_values
from rain_tasks.task_vectors import compute_task_vectors

INPUTS = {"models.base": "models/base", "models.itm": "models/itm", "models.lrm": "models/lrm",
          "calibration.reasoning": "data/reasoning.jsonl", "task_vectors": "artifacts/tv"}


@pytest.fixture
def project(tiny_family, tmp_path) -> Path:
    """A project root holding the tiny family, a calibration set, task vectors and params.yaml (merge.lam 0.5)."""
    root = tmp_path / "project"
    for role in ("base", "itm", "lrm"):
        shutil.copytree(tiny_family[role], root / "models" / role)
    (root / "data").mkdir()
    shutil.copy(tiny_family["reasoning"], root / "data/reasoning.jsonl")
    compute_task_vectors(root / "models/base", root / "models/itm", root / "artifacts/tv")
    (root / "params.yaml").write_text(yaml.safe_dump({"merge": {"lam": 0.5}}))
    return root


def merge_with_lineage(root: Path, out: Path, finalize_extra=None) -> Path:
    """A task-arithmetic merge of the project, its lineage written as the merge stage writes it."""
    params = load_params(root / "params.yaml")
    core = lineage.build_core(lineage.record_inputs(root, INPUTS), "task_arithmetic", {"lam": params.merge.lam},
                              param_values(params, ("merge",)))

    def finalize(tmp: Path) -> None:
        lineage.write_lineage(tmp, core, lineage.provenance(root))
        if finalize_extra is not None:
            finalize_extra(tmp)

    plan = DeltaPlan(linear=TensorDir(root / "artifacts/tv"))
    merge_checkpoint(root / "models/lrm", out, "task_arithmetic", {"lam": params.merge.lam}, plan, 20_000,
                     metadata=lineage.shard_metadata(core), finalize=finalize)
    return out


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
    assert doc["provenance"]["prefect_flow_run_id"] is None  # no flow run here
    assert doc["provenance"]["libraries"]["torch"]
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2
    for shard in shards:
        assert read_metadata(shard)["rain_lineage"] == doc["core_digest"]
    assert rain(["verify-lineage", str(out), "--project", str(project)]) == 0
    assert "lineage verified" in capsys.readouterr().out


def test_one_byte_of_a_shard_changed_is_reported(project, capsys):
    out = merge_with_lineage(project, project / "models/merged")
    shard = sorted(out.glob("model-*.safetensors"))[1]
    _flip_last_byte(shard)
    report = lineage.verify_lineage(out)
    assert not report.ok
    assert len(report.problems) == 1 and report.problems[0].startswith(f"output: {shard.name} differs: recorded sha256 ")
    assert rain(["verify-lineage", str(out)]) == 1
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
        f"{tmp_path / 'bare' / lineage.LINEAGE}: no {lineage.LINEAGE}; this directory was not written by the merge stage (rerun it)"
    ]
