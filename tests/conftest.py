"""Shared fixtures: offline Hugging Face settings and tiny generated checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from rain_tasks import set_environment  # imports no torch

set_environment()  # before torch: no spinning threads on a busy machine, no hub access
# the value-scan record (rain_tasks.pipeline.validation.scanned_shards_file) of this run only, not the user's
os.environ["RAIN_CACHE_DIR"] = tempfile.mkdtemp(prefix="rain-test-cache-")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny linear algebra is faster on one thread; zoo builds set their own count

from rain_dev.tiny import instruction_rows, make_family, reasoning_rows, write_jsonl  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "reference-calibration"
#: test files sharing the session's mini projects (`mini_repro`, `mini_flow`): one xdist worker runs them all
MINI_FILES = ("test_neighbours.py", "test_operations.py", "test_orchestrators.py", "test_pipeline.py")
#: the longest work first: the mini group and the default family's build, each on its own worker
FIRST = ("mini", "test_family.py")


def _group(file: str) -> str:
    """A test file's unit of work on the xdist workers: the file, or "mini" for the files sharing the mini projects."""
    return "mini" if Path(file).name in MINI_FILES else Path(file).name


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest groups first (a stable sort keeps every file's own order); a file using the mini projects must
    be in MINI_FILES, or a second worker would build them again."""
    strays = {i.path.name for i in items if {"mini_repro", "mini_flow"} & set(i.fixturenames)} - set(MINI_FILES)
    if strays:
        raise pytest.UsageError(f"{sorted(strays)} use the mini projects: add them to MINI_FILES in tests/conftest.py")
    rank = {group: i for i, group in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.path.name), len(FIRST)))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`make test`'s two workers (`-n 2 --no-loadscope-reorder`): whole groups, in collection order, to whichever
    worker is free (a group's module and session fixtures are built once)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid.split("::", 1)[0])

    return ByGroup(config, log)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """Random Qwen2 base/itm/lrm with GQA (4 heads, 2 KV heads) and biases, plus calibration files."""
    root = tmp_path_factory.mktemp("tiny_family")
    paths = make_family(root)
    paths["reasoning"] = write_jsonl(root / "reasoning.jsonl", reasoning_rows())
    paths["instruction"] = write_jsonl(root / "instruction.jsonl", instruction_rows())
    return paths


@pytest.fixture(scope="session")
def tiny_task_vectors(tiny_family, tmp_path_factory) -> Path:
    """Δ_I = ITM − base of the tiny family, in the task_vectors stage's layout."""
    from rain_tasks.merge.task_vectors import compute_task_vectors

    out = tmp_path_factory.mktemp("tiny_task_vectors")
    compute_task_vectors(tiny_family["base"], tiny_family["itm"], out)
    return out


@pytest.fixture(scope="session")
def published() -> Path:
    """The published calibration sets beside the project; skip cleanly where absent."""
    if not SHARED.is_dir():
        pytest.skip(f"published calibration sets not found at {SHARED} (the shared/ folder beside the project)")
    return SHARED


@pytest.fixture(scope="session")
def mini_repro(tmp_path_factory) -> tuple[Path, dict, dict, str]:
    """A mini-family project after `dvc repro`, committed to git, with its outputs' digests and the repro's log
    (shared by the orchestrator tests and the flow-against-DVC comparison)."""
    from rain_dev.projects import MINI_OVERRIDES, MINI_ZOO, fresh_project, mini_env, output_digests, sh

    tmp = tmp_path_factory.mktemp("mini_repro")
    env = mini_env(tmp)
    root = fresh_project(tmp / "project", env, MINI_ZOO, MINI_OVERRIDES)
    log = sh(["dvc", "repro"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "pipeline outputs"], root, env)
    return root, env, output_digests(root), log


@pytest.fixture(scope="session")
def mini_flow(tmp_path_factory) -> tuple[Path, dict, str]:
    """A mini-family project (its own git repo) after one run of the flow on the default runner, and its summary."""
    from rain_dev.projects import MINI_OVERRIDES, MINI_ZOO, fresh_project, mini_env, run_flow

    tmp = tmp_path_factory.mktemp("mini_flow")
    env = mini_env(tmp)
    root = fresh_project(tmp / "project", env, MINI_ZOO, MINI_OVERRIDES)
    log, _ = run_flow(root, env)
    return root, env, log
