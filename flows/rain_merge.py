"""Prefect flow `rain_merge`: the DVC stages as Prefect tasks cached on content digests.

Each task's cache key is its stage name, the params keys it reads, the digests of its input
files (code included) and the task's source: a second run with nothing changed is all cache
hits, and a param change reruns only the stages downstream of it. Results are small JSON
manifests of output digests (never pickles); a cached result whose outputs were removed or
altered on disk is recomputed.

Operations:
- Result storage: Prefect's default (PREFECT_LOCAL_STORAGE_PATH, or the block named by
  PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK), or the flow parameter `result_storage`: a local
  path, or the slug of a saved storage block (e.g. `remote-file-system/rain-results`, an
  s3:// RemoteFileSystem) so a team shares one cache.
- Retries: transient storage and network errors (S3, sockets, disk I/O) are retried with
  exponential backoff and jitter; bad inputs, bad params and bugs fail at once.
- Scale-out: the stages in LAYER_SPLITS (projection, merge) run one task per layer on a
  layer runner (`task_runner`: 'thread', one layer at a time in this process, or 'dask', on
  a local cluster or the scheduler at `dask_address`) before the stage task finishes them.
  Artifacts are the same bytes either way. A remote cluster's workers must see the project
  directory at the same path and have this package installed.
"""

# no `from __future__ import annotations`: Prefect validates the flow's parameter types at run time
import logging
import shutil
from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.client.schemas.objects import State, TaskRun
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import Task, exponential_backoff

from rain_tasks.arch import read_shape
from rain_tasks.digest import json_digest, path_digest
from rain_tasks.params import Params, load_params
from rain_tasks.runtime import configure
from rain_tasks.stages import LAYER_SPLITS, STAGES, Stage, get_stage, param_values, resolve, run_stage
from rain_tasks.validation import out_of_space_message, validate

log = logging.getLogger(__name__)

PARTS_DIR = ".rain/parts"  # per-layer scratch under the project root (git- and DVC-ignored)
TaskRunnerKind = Literal["thread", "dask"]

#: OSErrors a retry cannot fix: the input or the configuration is wrong
_PERMANENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: S3/botocore failures and I/O or network OSErrors, not bad inputs or a full disk."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        from rain_tasks.remote import PERMANENT_S3_CODES

        if isinstance(exc, ClientError):  # throttling and 5xx are worth a retry; refused credentials are not
            return exc.response.get("Error", {}).get("Code") not in PERMANENT_S3_CODES
        if isinstance(exc, BotoCoreError):
            return True
    except ImportError:  # without botocore there is no S3 client to fail
        pass
    if not isinstance(exc, OSError) or isinstance(exc, _PERMANENT):
        return False
    return out_of_space_message(exc) is None  # a full disk stays full for the seconds a retry waits


def _retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect retry condition: retry only when the failure is transient."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


_TASK_OPTIONS = dict(
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
    result_serializer="json",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),  # 2 s, 4 s, 8 s
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_transient,
)


def _digests(root: Path, paths: list[str]) -> dict[str, str]:
    return {p: path_digest(root / p, remembered=True) for p in paths}


@task(**_TASK_OPTIONS)
def stage_task(
    name: str, project_dir: str, params_file: str, params: dict, inputs: dict[str, str], parts: str | None = None
) -> dict[str, str]:
    """Run one stage (finishing from per-layer `parts` where given); return its output digests (the cached result)."""
    root = Path(project_dir)
    configure()
    run_stage(name, load_params(root / params_file), root, Path(parts) if parts else None)
    return _digests(root, list(get_stage(name).outputs))


@task(**_TASK_OPTIONS)
def layer_task(name: str, layer: int, project_dir: str, params_file: str, parts: str, params: dict, inputs: dict[str, str]) -> str:
    """Do one layer of a split stage into `parts` (`params` and `inputs` are the cache key: the stage's own)."""
    root = Path(project_dir)
    configure()
    LAYER_SPLITS[name].run(load_params(root / params_file), root, layer, Path(parts))
    return f"{name} layer {layer}"


def layer_runner(kind: TaskRunnerKind, dask_address: str | None = None, dask_workers: int = 2) -> TaskRunner:
    """The task runner for per-layer tasks: one layer at a time here, or a Dask cluster (local or at an address)."""
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=1)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True})
    raise ValueError(f"task_runner must be 'thread' or 'dask', not {kind!r}")


def resolve_result_storage(spec: str | None):
    """None (Prefect's default), a local directory, or a saved storage block named by its slug ('type/name')."""
    if not spec:
        return None
    if spec.startswith(("/", ".", "~")):
        from prefect.filesystems import LocalFileSystem

        return LocalFileSystem(basepath=str(Path(spec).expanduser().resolve()))
    from prefect.blocks.core import Block

    try:
        return Block.load(spec)
    except ValueError as e:
        raise ValueError(f"result storage block {spec!r} not found on the Prefect server ({e}); save it first "
                         "(README: Operations, Prefect result storage) or pass a local path") from None


def _with_storage(t: Task, storage, name: str) -> Task:
    """The task named for this run, persisting to `storage` where one is configured."""
    return t.with_options(task_run_name=name, **({"result_storage": storage} if storage is not None else {}))


def _fan_out(stage: Stage, runner: TaskRunner, storage, args: tuple, root: Path, params: Params) -> tuple[str, list[str]]:
    """Run the stage's per-layer tasks on `runner`; return the parts directory and their final state names."""
    name, project_dir, params_file, param_vals, inputs = args
    parts = root / PARTS_DIR / name / json_digest({"params": param_vals, "inputs": inputs})[:16]
    verb = LAYER_SPLITS[name].verb
    layers = range(read_shape(root / params.models.lrm).num_layers)
    with runner.duplicate() as r:
        futures = [
            r.submit(_with_storage(layer_task, storage, f"{verb} layer {layer}"),
                     {"name": name, "layer": layer, "project_dir": project_dir, "params_file": params_file,
                      "parts": str(parts), "params": param_vals, "inputs": inputs})
            for layer in layers
        ]
        for f in futures:
            f.result()  # raises the first failure
        return str(parts), [f.state.name for f in futures]


def _run(stage: Stage, root: Path, params_file: str, params: Params, runner: TaskRunner, storage) -> dict:
    """Run (or take from cache) one stage, per layer first where it splits; return state names and output digests."""
    deps = [resolve(d, params) for d in (*stage.deps, *stage.code)]
    args = (stage.name, str(root), params_file, param_values(params, stage.params), _digests(root, deps))
    parts, layer_states = _fan_out(stage, runner, storage, args, root, params) if stage.name in LAYER_SPLITS else (None, [])
    call = _with_storage(stage_task, storage, f"{stage.name}: {stage.desc}")
    state = call(*args, parts, return_state=True)
    outputs = state.result()
    on_disk = {p: (path_digest(root / p, remembered=True) if (root / p).exists() else None) for p in outputs}
    if on_disk != outputs:
        log.warning("stage %s: cached outputs are missing or changed on disk; recomputing", stage.name)
        state = call.with_options(refresh_cache=True)(*args, parts, return_state=True)
        outputs = state.result()
    if parts is not None:
        shutil.rmtree(parts, ignore_errors=True)
    return {"state": state.name, "outputs": outputs, "layers": layer_states}


@flow(name="rain_merge", log_prints=True)
def rain_merge(
    project_dir: str = ".",
    params_file: str = "params.yaml",
    task_runner: TaskRunnerKind = "thread",
    dask_address: str | None = None,
    result_storage: str | None = None,
) -> dict[str, dict]:
    """Run every stage in DAG order; return per stage its state ('Completed' or 'Cached'), its per-layer
    task states and its output digests."""
    root = Path(project_dir).resolve()
    params = validate(root, params_file)  # every input problem at once, before any stage runs
    storage = resolve_result_storage(result_storage)
    runner = layer_runner(task_runner, dask_address)
    summary = {stage.name: _run(stage, root, params_file, params, runner, storage) for stage in STAGES}
    print("stages: " + ", ".join(f"{name} {r['state']}" for name, r in summary.items()))
    return summary
