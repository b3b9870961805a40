"""Operations for real, on the mini family (2 layers, width 32: a whole flow run in well under a minute):

- DVC artifacts round-trip through a real S3 API server (moto): push, clone, pull, up to date;
- the flow's per-layer tasks on a local Dask cluster give the default runner's bytes;
- a served, scheduled Prefect deployment on a real local Prefect server, triggered through the
  API, with its task results in S3: the second triggered run is all cache hits (DVC's record).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from collections import Counter

import pytest

from rain_dev.projects import (MINI_OVERRIDES, MINI_ZOO, OUTPUTS, fresh_project, mini_env, run_flow, sh, start_prefect_server,
                      stop, task_states, wait_for_deployment)
from rain_tasks.io.digest import tree_digests
from rain_dev.s3server import DUMMY_CREDENTIALS, local_s3
from rain_tasks.pipeline.stages import LAYER_SPLITS, STAGES

pytestmark = pytest.mark.slow
MINI_LAYERS = MINI_ZOO["num_layers"]


@pytest.fixture(scope="module")
def flow_project(mini_flow) -> tuple[Path, dict]:
    """The mini-family project after one run of the flow on the default runner: every stage and layer task ran."""
    root, env, log = mini_flow
    assert f"completed={len(STAGES)}" in log and f"layers={{'Completed': {MINI_LAYERS * len(LAYER_SPLITS)}}}" in log, log
    return root, env


def test_dvc_artifacts_round_trip_through_s3(flow_project, tmp_path):
    """The flow recorded its outputs with DVC; push them to S3, clone the repo elsewhere and pull: up to date, same bytes."""
    root, env = flow_project
    assert "up to date" in sh(["dvc", "status"], root, env)  # the flow committed every stage
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "pipeline outputs"], root, env)
    clone = tmp_path / "clone"
    with local_s3("rain-artifacts") as endpoint:
        sh(["dvc", "remote", "modify", "--local", "storage", "endpointurl", endpoint], root, env)
        sh(["dvc", "push"], root, env)
        sh(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
        assert not (clone / "models/merged").exists()
        sh(["dvc", "remote", "modify", "--local", "storage", "endpointurl", endpoint], clone, env)
        sh(["dvc", "pull"], clone, env)
        status = sh(["dvc", "status"], clone, env)
    assert "Data and pipelines are up to date" in status, status
    for out in OUTPUTS:
        assert tree_digests(clone / out) == tree_digests(root / out), out
        assert (clone / out).exists()
    assert sh(["rain", "verify", "models/merged", "--project", "."], clone, env).startswith("models/merged: lineage verified")


def test_dask_runner_gives_the_default_runners_artifacts(flow_project, tmp_path):
    root, _ = flow_project
    env = mini_env(tmp_path)  # its own project and DVC cache: nothing cached
    other = fresh_project(tmp_path / "project", env, MINI_ZOO, MINI_OVERRIDES)
    log, _ = run_flow(other, env, "dask")
    assert f"layers={{'Completed': {MINI_LAYERS * len(LAYER_SPLITS)}}}" in log, log
    for out in OUTPUTS:
        assert tree_digests(other / out) == tree_digests(root / out), out


def test_scheduled_deployment_runs_through_the_api_with_results_in_s3(tmp_path):
    import boto3
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.filesystems import RemoteFileSystem
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = mini_env(tmp_path)
    root = fresh_project(tmp_path / "project", env, MINI_ZOO, MINI_OVERRIDES)
    server, api = start_prefect_server(tmp_path, env)
    env["PREFECT_API_URL"] = api
    serve_log = tmp_path / "serve.log"
    try:
        with local_s3("rain-results") as endpoint, temporary_settings({PREFECT_API_URL: api}):
            RemoteFileSystem(basepath="s3://rain-results/prefect", settings={
                "key": DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": endpoint}}).save("rain-results")
            serve = subprocess.Popen(
                ["rain", "serve", "--project", str(root), "--name", "test", "--cron", "0 3 * * *",
                 "--result-storage", "remote-file-system/rain-results"],
                cwd=root, env=env, stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
            try:
                with get_client(sync_client=True) as client:
                    deployment = wait_for_deployment(client, "rain_merge/test", serve, serve_log)
                    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
                    assert deployment.parameters["project_dir"] == str(root)
                    first = run_deployment("rain_merge/test", timeout=600)
                    assert first.state.is_completed(), serve_log.read_text()[-3000:]
                    states = task_states(client, first.id)
                    assert states["Completed"] == len(STAGES) + MINI_LAYERS * len(LAYER_SPLITS), states
                    second = run_deployment("rain_merge/test", timeout=600)
                    assert second.state.is_completed(), serve_log.read_text()[-3000:]
                    assert task_states(client, second.id) == Counter({"Cached": len(STAGES)})  # no layer re-run
                objects = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="rain-results", Prefix="prefect/")
                assert objects.get("KeyCount", 0) >= sum(states.values())  # one persisted result per task
            finally:
                stop(serve)
    finally:
        stop(server)
    assert sh(["rain", "verify", "models/merged"], root, env).startswith("models/merged: lineage verified")
