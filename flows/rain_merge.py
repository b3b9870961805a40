"""Prefect flow `rain_merge`: the DVC stages as Prefect tasks, sharing DVC's record of what is up to date.

A stage is skipped (its task ends 'Cached') when DVC says `dvc repro` would skip it: up to date
in dvc.lock, or its outputs for these exact deps and params are in DVC's run cache, whence they
are checked out (rain_tasks.pipeline.dvc_state). A stage that runs is committed through DVC afterwards
(dvc.lock, the DVC cache and the run cache), so `dvc repro` after a flow run, or a flow run
after `dvc repro`, recomputes nothing, and a param change reruns the same downstream stages
whichever orchestrator runs next. Results are small JSON manifests of output digests (never
pickles).

A scheduled run can do the whole job on a machine that has only the repository and the DVC
remote: `pull` first fetches what the remote holds (calibration sets, stage outputs, the run
cache), `push` afterwards uploads new outputs and run-cache entries, and `release_uri` releases
the merged model (`rain release`) under a version named after its lineage when that version is
not there yet. A failed pull, push or release fails the flow run; the next run finds every stage
committed, so it only retries the transfer.

Operations:
- Result storage (the task results: output digests, for the UI and the API): Prefect's default
  (PREFECT_LOCAL_STORAGE_PATH, or the block named by PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK), or
  the flow parameter `result_storage`: a local path, or the slug of a saved storage block (e.g.
  `remote-file-system/rain-results`, an s3:// RemoteFileSystem). What is up to date is DVC's
  record, not these results.
- Retries: transient storage and network errors (S3, sockets, disk I/O) are retried with
  exponential backoff and jitter; bad inputs, bad params and bugs fail at once.
- Scale-out: the stages in LAYER_SPLITS (projection, merge) run one task per layer on a
  layer runner (`task_runner`: 'thread', one layer at a time in this process, or 'dask', on
  a local cluster or the scheduler at `dask_address`) before the stage task finishes them.
  Artifacts are the same bytes either way. A remote cluster's workers must see the project
  directory at the same path and have this package installed.
"""

# no `from __future__ import annotations`: Prefect validates the flow's parameter types at run time
import json
import logging
import shutil
from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.states import Completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import Task, exponential_backoff

from rain_tasks.pipeline import dvc_state
from rain_tasks.io.arch import read_shape
from rain_tasks.io.digest import path_digest
from rain_tasks.params import Params, load_params
from rain_tasks.model.runtime import configure
from rain_tasks.pipeline.stages import LAYER_SPLITS, MERGED, STAGES, Stage, get_stage
from rain_tasks.pipeline.runner import run_stage
from rain_tasks.pipeline.validation import check_inputs, deferred_inputs, out_of_space_message, validate

log = logging.getLogger(__name__)

PARTS_DIR = ".rain/parts"  # per-layer scratch under the project root (git- and DVC-ignored)
TaskRunnerKind = Literal["thread", "dask"]

#: OSErrors a retry cannot fix: the input or the configuration is wrong
_PERMANENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: S3/botocore failures and I/O or network OSErrors, not bad inputs or a full disk."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        from rain_tasks.io.remote import PERMANENT_S3_CODES

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
    # results are persisted (for the UI and the API) under the task run's own id, so Prefect never takes one for a
    # cache hit: what is up to date is DVC's record (rain_tasks.pipeline.dvc_state)
    result_storage_key="{task_run.id}",
    persist_result=True,
    result_serializer="json",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),  # 2 s, 4 s, 8 s
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_transient,
)


def _digests(root: Path, paths: tuple[str, ...]) -> dict[str, str]:
    return {p: path_digest(root / p, remembered=True) for p in paths}


def _cached(message: str, outputs: dict[str, str]) -> State:
    """The final state of a task whose work DVC already holds (shown as 'Cached' in Prefect)."""
    return Completed(name="Cached", message=message, data=outputs)


@task(**_TASK_OPTIONS)
def stage_task(name: str, project_dir: str, params: dict, parts: str | None = None,
               reused: str | None = None, inputs_checked: bool = False) -> dict[str, str]:
    """Run one stage on the flow's validated `params` (finishing from per-layer `parts` where given) and commit it
    through DVC; return its output digests. With `reused` (why DVC needs no run), only report the outputs DVC
    already records."""
    root, outputs = Path(project_dir), get_stage(name).outputs
    if reused:
        return _cached(f"stage {name}: {reused}", _digests(root, outputs))
    configure()
    run_stage(name, Params.model_validate(params), root, Path(parts) if parts else None, inputs_checked=inputs_checked)
    dvc_state.commit(root, name)
    return _digests(root, outputs)


@task(**_TASK_OPTIONS)
def layer_task(name: str, layer: int, project_dir: str, params: dict, parts: str) -> str:
    """Do one layer of a split stage into `parts`, on the flow's validated `params`."""
    root = Path(project_dir)
    configure()
    LAYER_SPLITS[name].run(Params.model_validate(params), root, layer, Path(parts))
    return f"{name} layer {layer}"


@task(**_TASK_OPTIONS)
def pull_task(project_dir: str, remote: str | None) -> str:
    """`dvc pull --run-cache`: what the remote holds of the outputs dvc.lock names, and its run cache."""
    from rain_tasks.io.remote import pull

    pull(project_dir, remote)
    return f"pulled from {remote or 'the default remote'}"


@task(**_TASK_OPTIONS)
def push_task(project_dir: str, remote: str | None) -> str:
    """`dvc push --run-cache`: the outputs and run-cache entries the remote lacks (a failure fails the run)."""
    from rain_tasks.io.remote import push

    push(project_dir, remote)
    return f"pushed to {remote or 'the default remote'}"


@task(**_TASK_OPTIONS)
def release_task(project_dir: str, release_uri: str) -> str:
    """`rain release` of the merged model to RELEASE_URI/<its run name>, named after its lineage, unless that
    version is already committed there (the lineage has not changed since the last release). An interrupted
    release of that version resumes from its own staged uploads (rain_tasks.audit.release); it is signed with
    $RAIN_SIGNING_KEY."""
    from rain_tasks.audit.lineage import LINEAGE, run_name
    from rain_tasks.audit.release import S3Location, committed, release, s3_client
    from rain_tasks.audit.signing import SigningConfig

    model_dir = Path(project_dir) / MERGED
    uri = f"{release_uri.rstrip('/')}/{run_name(json.loads((model_dir / LINEAGE).read_text())['core'])}"
    client = s3_client()
    if committed(client, S3Location.parse(uri)):
        return _cached(f"{uri} is already released (same lineage)", {"release": uri})
    return release(model_dir, uri, project_dir, client=client, signing=SigningConfig.from_env()).format()


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


def _fan_out(stage: Stage, runner: TaskRunner, storage, root: Path, params: Params) -> tuple[str, list[str]]:
    """Run the stage's per-layer tasks on `runner`; return the parts directory and their final state names."""
    parts = root / PARTS_DIR / stage.name
    shutil.rmtree(parts, ignore_errors=True)  # layers of an earlier, interrupted run may be of other inputs
    verb = LAYER_SPLITS[stage.name].verb
    layers = range(read_shape(root / params.models.lrm).num_layers)
    with runner.duplicate() as r:
        futures = [
            r.submit(_with_storage(layer_task, storage, f"{verb} layer {layer}"),
                     {"name": stage.name, "layer": layer, "project_dir": str(root),
                      "params": params.model_dump(mode="json"), "parts": str(parts)})
            for layer in layers
        ]
        for f in futures:
            f.result()  # raises the first failure
        return str(parts), [f.state.name for f in futures]


def _run(stage: Stage, root: Path, params: Params, runner: TaskRunner, storage, inputs_checked: bool) -> dict:
    """Run one stage, per layer first where it splits, unless DVC holds its outputs; return state names and digests."""
    reused = dvc_state.reuse(root, stage.name)
    parts, layer_states = (None, [])
    if reused is None and stage.name in LAYER_SPLITS:
        parts, layer_states = _fan_out(stage, runner, storage, root, params)
    call = _with_storage(stage_task, storage, f"{stage.name}: {stage.desc}")
    state = call(stage.name, str(root), params.model_dump(mode="json"), parts, reused, inputs_checked, return_state=True)
    if parts is not None:
        shutil.rmtree(parts, ignore_errors=True)
    return {"state": state.name, "outputs": state.result(), "layers": layer_states}


def _transfer(t: Task, storage, name: str, *args) -> None:
    """Run a pull, push or release task; its failure fails the flow run (the next run retries it, stages committed)."""
    _with_storage(t, storage, name)(*args)


@flow(name="rain_merge", log_prints=True)
def rain_merge(
    project_dir: str = ".",
    params_file: str = "params.yaml",
    task_runner: TaskRunnerKind = "thread",
    dask_address: str | None = None,
    result_storage: str | None = None,
    pull: bool = False,
    push: bool = False,
    remote: str | None = None,
    release_uri: str | None = None,
) -> dict[str, dict]:
    """Pull (if asked), run every stage in DAG order that DVC does not hold, then push and release (if asked);
    return per stage its state ('Completed' or 'Cached'), its per-layer task states and its output digests."""
    root = Path(project_dir).resolve()
    load_params(root / params_file)  # a bad params file fails before any transfer
    storage = resolve_result_storage(result_storage)
    if pull:
        _transfer(pull_task, storage, "dvc pull", str(root), remote)
    params = validate(root, params_file)  # every input problem at once, before any stage runs; the tasks get these
    dvc_state.require_project(root)
    runner = layer_runner(task_runner, dask_address)
    deferred = deferred_inputs(params, root)  # inputs the zoo stage makes are checked once, when it has made them
    summary = {}
    for stage in STAGES:
        summary[stage.name] = _run(stage, root, params, runner, storage, inputs_checked=not deferred)
        if deferred and not stage.deps:
            check_inputs(params, root)
            deferred = False
    print("stages: " + ", ".join(f"{name} {r['state']}" for name, r in summary.items()))
    if push:
        _transfer(push_task, storage, "dvc push", str(root), remote)
    if release_uri:
        _transfer(release_task, storage, "rain release", str(root), release_uri)
    return summary
