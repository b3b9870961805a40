"""DVC's record as the flow reads and writes it (rain_tasks.pipeline.dvc_state), on a one-stage DVC project: fast, real DVC."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rain_dev.projects import project_env, sh
from rain_tasks.pipeline import dvc_state

COPY = f"{sys.executable} -c \"import pathlib; pathlib.Path('out.txt').write_text(pathlib.Path('in.txt').read_text().upper())\""


@pytest.fixture
def project(tmp_path) -> tuple[Path, dict]:
    """A git+DVC project with one stage (in.txt -> OUT.txt upper-cased) after `dvc repro`."""
    env = project_env(tmp_path)
    root = tmp_path / "p"
    root.mkdir()
    sh(["git", "init", "-q"], root, env)
    sh(["dvc", "init", "-q"], root, env)
    (root / "in.txt").write_text("a\n")
    (root / "dvc.yaml").write_text(f"stages:\n  up:\n    cmd: {COPY}\n    deps: [in.txt]\n    outs: [out.txt]\n")
    sh(["dvc", "repro"], root, env)
    return root, env


def _run_as_the_flow(root: Path) -> None:
    """What the flow does for a stage that must run: the stage body, then the DVC commit."""
    (root / "out.txt").write_text((root / "in.txt").read_text().upper())
    dvc_state.commit(root, "up")


def test_reuse_follows_dvc_status_and_its_run_cache(project):
    root, env = project
    assert dvc_state.reuse(root, "up") == dvc_state.UP_TO_DATE
    (root / "in.txt").write_text("b\n")
    assert dvc_state.reuse(root, "up") is None  # changed dep, never seen: must run
    assert (root / "out.txt").read_text() == "A\n"  # and nothing was removed for it
    _run_as_the_flow(root)
    assert "up to date" in sh(["dvc", "status"], root, env)  # the flow's commit is dvc.lock as `dvc repro` leaves it
    (root / "in.txt").write_text("a\n")  # the first input again: the run cache of `dvc repro` holds its output
    assert dvc_state.reuse(root, "up") == dvc_state.RESTORED
    assert (root / "out.txt").read_text() == "A\n"
    assert "up to date" in sh(["dvc", "status"], root, env)
    (root / "in.txt").write_text("b\n")  # and `dvc repro` restores the flow's output from the run cache
    log = sh(["dvc", "repro"], root, env)
    assert "is cached - skipping run" in log and (root / "out.txt").read_text() == "B\n", log


def test_a_deleted_output_is_checked_out_from_the_dvc_cache(project):
    root, env = project
    (root / "out.txt").unlink()
    assert dvc_state.reuse(root, "up") == dvc_state.RESTORED
    assert (root / "out.txt").read_text() == "A\n"


def test_a_directory_without_dvc_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"not a DVC project \(no \.dvc or dvc\.yaml\)"):
        dvc_state.require_project(tmp_path)
