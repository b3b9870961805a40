"""One record of what is up to date for both orchestrators: DVC's (dvc.lock, the DVC cache and its run cache).

`dvc repro` keeps this record itself. The Prefect flow reads and writes the same one through
DVC's Python API (dvc.repo.Repo, what the `dvc` commands call):

- before a stage, `reuse` asks DVC what `dvc repro` would: is the stage up to date (`dvc status
  STAGE`: its deps, params, command and outputs against dvc.lock)? If not, does DVC's run cache
  hold outputs for exactly these deps and params (or does the DVC cache hold the outputs dvc.lock
  names)? Then they are checked out and committed, as `dvc repro` does, and the stage does not run.
- after running a stage itself, the flow calls `commit` (`dvc commit -f STAGE`): the outputs go
  into the DVC cache, dvc.lock gets the stage's entry and the run cache an entry for its deps and
  params, exactly what `dvc repro` leaves behind.

The calls are DVC's public Repo methods (`status`, `commit`) and its stage-cache `restore`, with
one private look-up (`stage_cache._load`: is there a run-cache entry, before anything is removed);
dvc is pinned in requirements.txt. DVC resolves a stage's paths against the working directory,
so each call runs with the project root as the working directory (the flow makes these calls one
at a time, between stages).

So `dvc repro` after a flow run (or the reverse) recomputes nothing, `dvc status` stays clean,
and a param change reruns the same downstream stages whichever orchestrator runs next.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import chdir, contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

UP_TO_DATE = "up to date in dvc.lock"
RESTORED = "outputs restored from DVC's cache (run cache or dvc.lock)"


@contextmanager
def _repo(root: str | Path) -> Iterator:
    """DVC's Repo of the project at `root`, with `root` as the working directory meanwhile."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    with chdir(root), Repo(str(root)) as repo:
        yield repo


def require_project(root: str | Path) -> None:
    """Refuse, before any work, a project directory DVC cannot keep the record for."""
    root = Path(root)
    missing = [name for name in (".dvc", "dvc.yaml") if not (root / name).exists()]
    if missing:
        raise ValueError(f"{root} is not a DVC project (no {' or '.join(missing)}); the flow keeps DVC's record of what "
                         "is up to date there. Run it on the repository (its clone), or `dvc init` and `rain dvc-yaml` first")


def reuse(root: str | Path, name: str) -> str | None:
    """Why stage `name` need not run (UP_TO_DATE, or RESTORED after checking its outputs out and committing
    them as `dvc repro` would), or None when it must run."""
    from dvc.repo import lock_repo
    from dvc.stage.cache import RunCacheNotFoundError

    with _repo(root) as repo:
        if not repo.status(targets=[name]):
            return UP_TO_DATE
        with lock_repo(repo):
            if not _held(repo, name):
                return None
            (stage,) = repo.stage.collect(name)  # a fresh stage: DVC's restore decides from dvc.lock as it is
            stage.remove_outs(ignore_remove=False, force=False)  # as `dvc repro` does before restoring
            try:
                repo.stage_cache.restore(stage)
            except RunCacheNotFoundError:  # an entry whose objects are gone: the stage runs, as under `dvc repro`
                return None
        repo.commit(name, force=True)
    log.info("stage %s: %s", name, RESTORED)
    return RESTORED


def _held(repo, name: str) -> bool:
    """Whether DVC's restore would find the stage's outputs: deps unchanged since dvc.lock and its outputs in the DVC
    cache, or a run-cache entry for the deps and params as they are now (DVC's own look-up, nothing checked out)."""
    (stage,) = repo.stage.collect(name)
    if not stage.changed_stage() and stage.deps_cached() and all(o.hash_info for o in stage.outs) and stage.outs_cached():
        return True
    stage.save_deps()  # the run-cache key is the deps' hashes as they are now
    return repo.stage_cache._load(stage) is not None


def commit(root: str | Path, name: str) -> None:
    """`dvc commit -f STAGE`: record the outputs a stage just wrote in dvc.lock, the DVC cache and the run cache."""
    with _repo(root) as repo:
        repo.commit(name, force=True)
