"""Fresh project repositories for the end-to-end tests: a copy of the tracked files as its own git repo.

Used by test_pipeline (the scaled-down default family) and test_operations (the mini family:
two layers of width 32, a few training steps, so a whole flow run takes seconds, not minutes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: the default family's architecture, trained for a few steps only (same code path)
SMALL_ZOO = {
    "base_steps": 40, "lrm_steps": 10, "itm_steps": 10, "warmup_steps": 5,
    "n_calibration_reasoning": 8, "n_calibration_instruction": 8, "n_eval": 12, "n_eval_reasoning": 6,
}
#: a smaller architecture still (2 layers, width 32) for the operational tests
MINI_ZOO = {
    **SMALL_ZOO, "hidden_size": 32, "num_layers": 2, "intermediate_size": 64, "base_steps": 10,
    "max_shard_size": "20KB", "n_calibration_reasoning": 4, "n_calibration_instruction": 4, "n_eval": 4, "n_eval_reasoning": 4,
}
MINI_OVERRIDES = {"merge": {"max_shard_size": "20KB"}, "evaluate": {"max_new_tokens": 8}}


def project_env(tmp: Path) -> dict[str, str]:
    """The Makefile's environment with DVC and Prefect state under `tmp` (and no Prefect server configured)."""
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


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    """Run a command; on failure raise with the tail of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def fresh_project(dest: Path, env: dict, zoo: dict, overrides: dict | None = None) -> Path:
    """A clean copy of the tracked project files as its own git repository, with `zoo` (and section overrides) applied."""
    dest.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in files.stdout.split():
        if (ROOT / rel).is_file() and not rel.startswith(("models/", "artifacts/", "data/calibration", "data/eval")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["zoo"].update(zoo)
    for section, values in (overrides or {}).items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], dest, env)
    sh(["git", "add", "-A"], dest, env)
    sh(["git", "commit", "-qm", "init"], dest, env)
    return dest
