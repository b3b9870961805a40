"""The scheduled deployment of `rain_merge`, served by this process (`rain serve`).

Every cron tick, and every run triggered through the API or UI, runs the flow on the project
with its params.yaml as it is then: the parameters name the project and the params file, not a
snapshot of the params, so a run after an input or param change executes only the stages
downstream of it and a run with nothing changed is all cache hits (DVC's record, shared with
`dvc repro`). With `pull`, `push` and `release_uri` a run does the whole job on a machine that
has only the repository and the DVC remote: pull what the remote holds (run cache included),
run what is out of date, push the new outputs, release a merged model whose lineage is new. A
failed push or release fails the run; the next tick retries it without recomputing.
"""

from __future__ import annotations

from pathlib import Path

from flows.rain_merge import TaskRunnerKind, rain_merge
from rain_tasks.params import load_params

DEFAULT_NAME = "nightly"
DEFAULT_CRON = "0 3 * * *"  # 03:00 every day


def deployment_parameters(
    project_dir: str | Path, params_file: str = "params.yaml", task_runner: TaskRunnerKind = "thread",
    dask_address: str | None = None, result_storage: str | None = None, *, pull: bool = False, push: bool = False,
    remote: str | None = None, release_uri: str | None = None,
) -> dict:
    """The flow parameters the deployment passes on every run (the params file and the release URI are checked
    now, not at 03:00)."""
    root = Path(project_dir).resolve()
    load_params(root / params_file)
    if release_uri:
        from rain_tasks.audit.release import S3Location
        from rain_tasks.audit.signing import SigningConfig

        S3Location.parse(release_uri)
        SigningConfig.from_env().signer()  # releases are signed: $RAIN_SIGNING_KEY must name a readable key
    return {"project_dir": str(root), "params_file": params_file, "task_runner": task_runner,
            "dask_address": dask_address, "result_storage": result_storage, "pull": pull, "push": push,
            "remote": remote, "release_uri": release_uri}


def serve_deployment(parameters: dict, name: str = DEFAULT_NAME, cron: str = DEFAULT_CRON) -> None:
    """Register `rain_merge/<name>` with the Prefect server (PREFECT_API_URL) on `cron` and run its flow runs until stopped."""
    rain_merge.serve(name=name, cron=cron, parameters=parameters, pause_on_shutdown=False,
                     description=f"RAIN-Merging pipeline on {parameters['project_dir']}")
