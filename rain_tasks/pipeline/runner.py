"""`rain stage NAME`: one registry stage run on a project, its inputs checked first and its run recorded.

Above both the stage registry (rain_tasks.pipeline.stages) and input validation (rain_tasks.pipeline.validation),
which reads the registry's paths, so neither imports the other.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rain_tasks.io.artifacts import output_locks
from rain_tasks.params import Params
from rain_tasks.pipeline.runs import record_run
from rain_tasks.pipeline.stages import LAYER_SPLITS, get_stage, resolve
from rain_tasks.pipeline.validation import preflight

log = logging.getLogger(__name__)


def run_stage(name: str, params: Params, root: str | Path = ".", parts: Path | None = None,
              inputs_checked: bool = False) -> None:
    """Run one stage of the project at `root`, after checking its inputs (a stage with deps reads the models).

    With `parts`, the stage finishes from the per-layer work its LAYER_SPLITS entry already did there.
    `inputs_checked`: the caller (the flow) validated this run's inputs already, so only the stage's upstream
    artifacts are checked here, not the checkpoints and calibration sets again.
    """
    stage, root = get_stage(name), Path(root)
    if stage.deps:  # the zoo makes the inputs; every other stage refuses bad ones before any work
        preflight(stage, params, root, inputs_checked=inputs_checked)
    log.info("stage %s: %s", name, stage.desc)
    start = time.perf_counter()
    with output_locks(root, [resolve(o, params) for o in stage.outputs]):
        facts = stage.run(params, root) if parts is None else LAYER_SPLITS[name].finish(params, root, parts)
    missing = [o for o in stage.outputs if not (root / resolve(o, params)).exists()]
    if missing:
        raise RuntimeError(f"stage {name} finished without writing {missing}")
    record_run(root, name, time.perf_counter() - start, facts)
