"""Run records: the volatile facts of each stage run, kept where no content hash sees them.

A stage's tracked outputs (DVC outs, metrics, plots) depend only on its inputs, so identical
inputs give identical bytes under `dvc repro` and the Prefect flow alike, and neither
orchestrator sees the other's work as changed. What does change run to run (when and on which
host it ran, how long each model took, the Prefect flow-run id, git commit, dvc.lock as found,
library versions) goes to `.rain/runs/<stage>.jsonl` under the project root, one JSON line per
run, newest last. The directory is ignored by git and DVC. `rain lineage` finds a merged
model's run here by its lineage digest; a model pulled from a remote was made elsewhere and
has no run record in this project.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from rain_tasks.audit.lineage import provenance
from rain_tasks.io.artifacts import write_text

RUNS_DIR = ".rain/runs"


def runs_file(root: str | Path, stage: str) -> Path:
    """The run log of one stage."""
    return Path(root) / RUNS_DIR / f"{stage}.jsonl"


def record_run(root: str | Path, stage: str, seconds: float, facts: dict | None = None) -> dict:
    """Append one run of `stage` (its wall time, `facts` the stage reported, host and provenance); return the entry."""
    entry = {"stage": stage, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "seconds": round(seconds, 3), "host": platform.node(), **(facts or {}), "provenance": provenance(root)}
    path = runs_file(root, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.read_text() if path.is_file() else ""
    write_text(path, before + json.dumps(entry, sort_keys=True) + "\n")
    return entry


def read_runs(root: str | Path, stage: str) -> list[dict]:
    """Every recorded run of `stage`, oldest first ([] when it never ran here)."""
    path = runs_file(root, stage)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def find_run(root: str | Path, lineage_digest: str) -> dict | None:
    """The latest run, of any stage, that wrote a model with this lineage digest (None if none did here)."""
    directory = Path(root) / RUNS_DIR
    found = [run for path in sorted(directory.glob("*.jsonl")) for run in read_runs(root, path.stem)
             if any(m.get("lineage") == lineage_digest for m in run.get("models", {}).values())]
    latest = None
    for run in found:  # records are appended in order: on a tie (same second) the later line wins
        if latest is None or run["finished_at"] >= latest["finished_at"]:
            latest = run
    return latest
