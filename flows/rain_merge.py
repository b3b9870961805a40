"""Prefect flow `rain_merge`: the DVC stages as Prefect tasks cached on content digests.

Each task's cache key is its stage name, the params sections it reads, the digests of its
input files (code included) and the task's source: a second run with nothing changed is all
cache hits, and a param change reruns only the stages downstream of it. Results are small
JSON manifests of output digests (never pickles); a cached result whose outputs were removed
or altered on disk is recomputed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from rain_tasks.digest import path_digest
from rain_tasks.params import Params, load_params
from rain_tasks.runtime import configure
from rain_tasks.stages import STAGES, Stage, resolve, run_stage

log = logging.getLogger(__name__)


def _param_values(params: Params, keys: tuple[str, ...]) -> dict:
    """The params a stage declares, e.g. {'alpha': {...}, 'attention.prior': 1.0}."""
    dumped = params.model_dump(mode="json")
    values = {}
    for key in keys:
        node = dumped
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


def _digests(root: Path, paths: list[str]) -> dict[str, str]:
    return {p: path_digest(root / p) for p in paths}


@task(
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=[2, 10],
)
def stage_task(name: str, project_dir: str, params_file: str, params: dict, inputs: dict[str, str]) -> dict[str, str]:
    """Run one stage; return the digests of its outputs (the persisted, cached result)."""
    root = Path(project_dir)
    configure()
    run_stage(name, load_params(root / params_file), root)
    stage = next(s for s in STAGES if s.name == name)
    return _digests(root, list(stage.outputs))


def _run(stage: Stage, root: Path, params_file: str, params: Params) -> dict:
    """Run (or take from cache) one stage; return its final state name and output digests."""
    deps = [resolve(d, params) for d in (*stage.deps, *stage.code)]
    call = stage_task.with_options(task_run_name=f"{stage.name}: {stage.desc}")
    args = (stage.name, str(root), params_file, _param_values(params, stage.params), _digests(root, deps))
    state = call(*args, return_state=True)
    outputs = state.result()
    on_disk = {p: (path_digest(root / p) if (root / p).exists() else None) for p in outputs}
    if on_disk != outputs:
        log.warning("stage %s: cached outputs are missing or changed on disk; recomputing", stage.name)
        state = call.with_options(refresh_cache=True)(*args, return_state=True)
        outputs = state.result()
    return {"state": state.name, "outputs": outputs}


@flow(name="rain_merge", log_prints=True)
def rain_merge(project_dir: str = ".", params_file: str = "params.yaml") -> dict[str, dict]:
    """Run every stage in DAG order; return per stage its state ('Completed' or 'Cached') and output digests."""
    root = Path(project_dir).resolve()
    params = load_params(root / params_file)
    summary = {stage.name: _run(stage, root, params_file, params) for stage in STAGES}
    print("stages: " + ", ".join(f"{name} {r['state']}" for name, r in summary.items()))
    return summary
