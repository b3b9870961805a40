"""Parameter sweeps as DVC experiments: `dvc exp run -S param=value` per value, RAIN's metrics collected.

Each point is a real experiment (listed by `dvc exp show`, comparable with `dvc metrics diff` and
`dvc plots diff`); only the stages downstream of the parameter rerun, and a point computed before
is restored from DVC's run cache. Afterwards params.yaml is put back and `dvc repro` restores the
original outputs (from the run cache, nothing recomputed). The collected table, RAIN's think-format
preservation and compliance against the Stage 1 energy actually protected, goes to
plots/sweeps/<param>.csv (`dvc plots show` data) with a PNG beside it.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pandas as pd
import yaml

from rain_tasks.io.artifacts import atomic_path
from rain_tasks.params import load_params
from rain_tasks.io.plots import lines

log = logging.getLogger(__name__)

SWEEP_DIR = "plots/sweeps"
#: RAIN's evaluation metrics kept per point (metrics/eval.json), and Stage 1's (metrics/projection.json)
EVAL_KEYS = ("close_rate", "correct_rate", "comply_rate", "l_think", "h_drift")
PROJECTION_KEYS = ("energy_protected", "norm_ratio", "residual_calib", "residual_heldout")


def _check_param(root: Path, param: str) -> None:
    """Refuse a parameter params.yaml does not have (before any experiment runs)."""
    section, _, key = param.partition(".")
    params = load_params(root / "params.yaml")
    if not key or not hasattr(params, section) or key not in type(getattr(params, section)).model_fields:
        raise ValueError(f"{param!r} is not a params.yaml parameter; write SECTION.KEY, e.g. projection.energy")


def _point(root: Path, param: str, value: str) -> dict:
    """One experiment's row: the swept value, Stage 1's summary and RAIN's evaluation metrics."""
    evaluation = json.loads((root / "metrics/eval.json").read_text())["RAIN"]
    projection = json.loads((root / "metrics/projection.json").read_text())
    return {param: yaml.safe_load(value), **{k: projection.get(k) for k in PROJECTION_KEYS}, **{k: evaluation[k] for k in EVAL_KEYS}}


def run_sweep(root: str | Path, param: str, values: list[str]) -> Path:
    """Run one DVC experiment per value of `param`; write the sweep table and plot; return the CSV path."""
    root = Path(root).resolve()
    _check_param(root, param)
    original = (root / "params.yaml").read_text()
    rows = []
    try:
        for value in values:
            log.info("sweep %s=%s", param, value)
            subprocess.run(["dvc", "exp", "run", "-S", f"{param}={value}"], cwd=root, check=True)
            rows.append(_point(root, param, value))
    finally:
        (root / "params.yaml").write_text(original)
        subprocess.run(["dvc", "repro"], cwd=root, check=True)
    table = pd.DataFrame(rows)
    csv = root / SWEEP_DIR / f"{param}.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    x = "energy_protected" if param.startswith("projection.") else param
    lines(table, x, ["close_rate", "comply_rate", "correct_rate", "l_think"], csv.with_suffix(".png"), f"RAIN sweep over {param}")
    return csv
