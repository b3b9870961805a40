"""Fresh project repositories for the end-to-end tests: a copy of the tracked files as its own git repo.

Used by test_pipeline (the scaled-down default family) and test_operations (the mini family:
two layers of width 32, a few training steps, so a whole flow run takes seconds, not minutes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import re
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from rain_tasks.io.digest import tree_digests
from rain_dev.s3server import DUMMY_CREDENTIALS, free_port
from rain_tasks.pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]

#: the default family's architecture, trained for a few steps only (same code path)
SMALL_ZOO = {
    "base_steps": 40, "lrm_steps": 10, "itm_steps": 10, "warmup_steps": 5,
    "n_calibration_reasoning": 8, "n_calibration_instruction": 8, "n_eval": 12, "n_eval_reasoning": 6,
    "n_val": 0,  # no validation split: the zoo report's baseline grid on validation is test_family's
}
#: a smaller architecture still (2 layers, width 32) for the operational tests
MINI_ZOO = {
    **SMALL_ZOO, "hidden_size": 32, "num_layers": 2, "intermediate_size": 64, "base_steps": 10,
    "max_shard_size": "20KB", "n_calibration_reasoning": 4, "n_calibration_instruction": 4, "n_eval": 4, "n_eval_reasoning": 4,
}
MINI_OVERRIDES = {"merge": {"max_shard_size": "20KB"}, "evaluate": {"max_new_tokens": 8}}
#: every tracked stage output (each is bit-identical across runs, whichever orchestrator made it)
OUTPUTS = sorted({o for s in STAGES for o in s.outputs})
FLOW_STATES = str(ROOT / "tests" / "flow_states.py")


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


def mini_env(tmp: Path) -> dict[str, str]:
    """project_env with moto's dummy credentials and a patient ephemeral Prefect server (the mini projects')."""
    return {**project_env(tmp), **DUMMY_CREDENTIALS, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}


def output_digests(root: Path) -> dict[str, dict[str, str]]:
    """Every tracked stage output's per-file digests."""
    return {out: tree_digests(root / out) for out in OUTPUTS}


def run_flow(root: Path, env: dict, task_runner: str = "thread") -> tuple[str, set[str]]:
    """Run the flow on `root` in a subprocess; return its summary and the stages that ran (were not 'Cached')."""
    log = sh([sys.executable, FLOW_STATES, str(root), task_runner], root, env)
    ran = re.search(r"^ran=\[(.*)\]$", log, flags=re.M).group(1)
    return log, set(filter(None, ran.split(",")))


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


# --- a real Prefect server and served deployments ----------------------------------------------


def start_prefect_server(tmp: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free port with its own database; return the process and its API URL."""
    import httpx

    port = free_port()
    server_env = {**env, "PREFECT_HOME": str(tmp / "server"), "PREFECT_API_URL": ""}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=server_env, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return proc, api
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.terminate()
    raise AssertionError(f"Prefect server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_for_deployment(client, name: str, serve: subprocess.Popen, log: Path):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            return client.read_deployment_by_name(name)
        except Exception:  # not registered yet (ObjectNotFound)
            if serve.poll() is not None:
                raise AssertionError(f"`rain serve` exited:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)
    raise AssertionError(f"deployment {name} never appeared:\n{log.read_text()[-3000:]}")


def task_states(client, flow_run_id) -> Counter:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return Counter(r.state.name for r in runs)
