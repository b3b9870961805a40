"""A small project on the tiny random family and a merge of it with its lineage and model card, as the
merge stage writes them: the three checkpoints, a calibration set, task vectors and a task-arithmetic
merge (lam from params.yaml) whose lineage records all of them and its params."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from rain_tasks.audit import lineage
from rain_tasks.merge.engine import DeltaPlan, TensorDir, merge_checkpoint
from rain_tasks.params import load_params, param_values
from rain_tasks.merge.task_vectors import compute_task_vectors

INPUTS = {"models.base": "models/base", "models.itm": "models/itm", "models.lrm": "models/lrm",
          "calibration.reasoning": "data/reasoning.jsonl", "task_vectors": "artifacts/tv"}
MAX_SHARD_BYTES = 20_000  # several shards even for the tiny family


def make_project(tiny_family: dict[str, Path], root: Path) -> Path:
    """A project root holding the tiny family, a calibration set, task vectors and params.yaml (merge.lam 0.5)."""
    for role in ("base", "itm", "lrm"):
        shutil.copytree(tiny_family[role], root / "models" / role)
    (root / "data").mkdir()
    shutil.copy(tiny_family["reasoning"], root / "data/reasoning.jsonl")
    compute_task_vectors(root / "models/base", root / "models/itm", root / "artifacts/tv")
    (root / "params.yaml").write_text(yaml.safe_dump({"merge": {"lam": 0.5}}))
    return root


def merge_with_lineage(root: Path, out: Path, finalize_extra: Callable[[Path], None] | None = None) -> Path:
    """A task-arithmetic merge of the project, its card and lineage written as the merging stages write them."""
    params = load_params(root / "params.yaml")
    core = lineage.build_core(lineage.record_inputs(root, INPUTS), "task_arithmetic", {"lam": params.merge.lam},
                              param_values(params, ("merge",)), ("task_vectors", "merge"))

    def finalize(tmp: Path) -> None:
        lineage.write_records(tmp, core, root, "RAIN")
        if finalize_extra is not None:
            finalize_extra(tmp)

    plan = DeltaPlan(linear=TensorDir(root / "artifacts/tv"))
    merge_checkpoint(root / "models/lrm", out, "task_arithmetic", {"lam": params.merge.lam}, plan, MAX_SHARD_BYTES,
                     metadata=lineage.shard_metadata(core), finalize=finalize)
    return out
