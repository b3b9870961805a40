"""The repository's layout: data/ is present on a fresh clone with its README, and no tracked file lies inside a
stage's output (DVC owns those paths: a tracked file there would conflict with `dvc repro` and `dvc checkout`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rain_tasks.params import load_params
from rain_tasks.pipeline.stages import STAGES, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_data_is_in_the_repository_with_its_readme():
    tracked = subprocess.run(["git", "ls-files", "data"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "data/README.md" in tracked
    readme = (ROOT / "data/README.md").read_text()
    assert "dvc add" in readme and "data/calibration/" in readme


def test_no_tracked_file_is_inside_a_stage_output():
    params = load_params(ROOT / "params.yaml")
    outputs = {resolve(o, params) for s in STAGES for o in s.outputs}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    inside = [f for f in tracked for o in outputs if f == o or f.startswith(o + "/")]
    assert inside == [], f"tracked files inside stage outputs: {inside}"
