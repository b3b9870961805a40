"""The pipeline's DAG in one place: each stage's params, inputs, outputs and the library call it makes.

`dvc.yaml` is generated from this registry (`rain dvc-yaml`, checked by a test), the CLI's
`rain stage NAME` runs one entry, and the Prefect flow runs the same entries in order, so
`dvc repro` and the flow cannot drift apart. Paths are relative to the project root; a dep
written `${models.lrm}` is resolved from params.yaml (DVC templating does the same).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rain_tasks.params import Params

log = logging.getLogger(__name__)

TV, FEAT, PROJ = "artifacts/task_vectors", "artifacts/features", "artifacts/projected"
ATTN, ALPHA = "artifacts/attention", "artifacts/alpha"
MERGED, BASELINES = "models/merged", "models/baselines"
EVAL_DIR = "data/eval"


@dataclass(frozen=True)
class Stage:
    """One DAG node: what it reads (files and params sections), what it writes, and how."""

    name: str
    run: Callable[[Params, Path], None]  # (params, project root)
    deps: tuple[str, ...]
    code: tuple[str, ...] = ()  # library files whose change must rerun the stage
    params: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    desc: str = ""
    outputs: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        object.__setattr__(self, "outputs", self.outs + self.metrics + self.plots)


_REF = re.compile(r"\$\{([a-z_]+)\.([a-z_]+)\}")


def resolve(path: str, params: Params) -> str:
    """Expand `${section.key}` references exactly as DVC's templating does."""
    return _REF.sub(lambda m: str(getattr(getattr(params, m.group(1)), m.group(2))), path)


# --- stage bodies: thin calls into the library ------------------------------------------------


def _zoo(p: Params, r: Path) -> None:
    from rain_tasks.zoo import build_zoo

    build_zoo(p.zoo, r / "models", r / "data")


def _task_vectors(p: Params, r: Path) -> None:
    from rain_tasks.task_vectors import compute_task_vectors

    compute_task_vectors(r / p.models.base, r / p.models.itm, r / TV)


def _features(p: Params, r: Path) -> None:
    from rain_tasks.features import accumulate_features

    accumulate_features(r / p.models.lrm, r / p.calibration.reasoning, p.features, r / FEAT)


def _projection(p: Params, r: Path) -> None:
    from rain_tasks.projection import project

    project(r / TV, r / FEAT, p.projection, r / PROJ, r / "reports/projection.parquet")


def _attention_stats(p: Params, r: Path) -> None:
    from rain_tasks.attention import attention_stats

    attention_stats(
        r / p.models.lrm, r / PROJ, r / p.calibration.instruction, p.attention, r / ATTN / "stats.parquet", r / ATTN / "report.json"
    )


def _alpha(p: Params, r: Path) -> None:
    from rain_tasks.alpha import solve_alpha

    solve_alpha(
        r / ATTN / "stats.parquet", r / p.models.lrm, p.alpha, p.attention.prior,
        r / ALPHA / "alpha.parquet", r / ALPHA / "scales.safetensors", r / "plots/alpha_heatmap.csv",
    )


def _merge(p: Params, r: Path) -> None:
    from rain_tasks.merge import DeltaPlan, TensorDir, merge_checkpoint

    plan = DeltaPlan(
        linear=TensorDir(r / PROJ),
        other=TensorDir(r / TV) if p.merge.scope == "all" else None,
        scales=TensorDir(None, single_file=r / ALPHA / "scales.safetensors"),
    )
    merge_checkpoint(r / p.models.lrm, r / MERGED, "rain", {"lam": p.merge.lam}, plan, p.merge.max_shard_size)


def _baselines(p: Params, r: Path) -> None:
    from rain_tasks.checkpoint import atomic_path
    from rain_tasks.merge import DeltaPlan, TensorDir, merge_checkpoint

    with atomic_path(r / BASELINES) as tmp:
        tmp.mkdir()
        for run in p.baselines.runs:
            plan = DeltaPlan(linear=TensorDir(r / TV), other=TensorDir(r / TV) if run.scope == "all" else None)
            merge_checkpoint(r / p.models.lrm, tmp / run.name, run.method, {"lam": run.lam}, plan, p.merge.max_shard_size)


def _evaluate(p: Params, r: Path) -> None:
    from rain_tasks.evaluation import evaluate_models, format_table, write_outputs

    models = {"LRM": r / p.models.lrm, "ITM": r / p.models.itm, "RAIN": r / MERGED}
    models.update({run.name: r / BASELINES / run.name for run in p.baselines.runs})
    e = p.evaluate
    results = evaluate_models(
        r / p.models.lrm, models, r / EVAL_DIR / "instruction_eval.jsonl", r / EVAL_DIR / "reasoning_eval.jsonl",
        e.max_new_tokens, e.batch_size, e.neighbour_radius, e.max_eval,
    )
    write_outputs(results, r / "metrics/eval.json", r / "plots/eval.csv", r / "reports/report.md",
                  {"merged": MERGED, "params": p.model_dump(exclude={"zoo"})})
    print(format_table(results))


STAGES: tuple[Stage, ...] = (
    Stage("zoo", _zoo, deps=(), code=("rain_tasks/zoo", "rain_tasks/instructions.py"), params=("zoo",),
          outs=("models/base", "models/itm", "models/lrm", "data/calibration", EVAL_DIR),
          desc="build the tiny model family and its calibration/evaluation data"),
    Stage("task_vectors", _task_vectors, deps=("${models.base}", "${models.itm}"),
          code=("rain_tasks/task_vectors.py",), outs=(TV,),
          desc="Δ_I = θ_ITM − θ_base per layer (fp32)"),
    Stage("features", _features, deps=("${models.lrm}", "${calibration.reasoning}"),
          code=("rain_tasks/features.py", "rain_tasks/capture.py", "rain_tasks/calibration.py"), params=("features",),
          outs=(FEAT,), desc="Stage 1: LRM features at Ω_think, Gram accumulation"),
    Stage("projection", _projection, deps=(TV, FEAT), code=("rain_tasks/projection.py",), params=("projection",),
          outs=(PROJ, "reports/projection.parquet"), desc="Stage 1: null-space projection Δ⊥"),
    Stage("attention_stats", _attention_stats, deps=("${models.lrm}", PROJ, "${calibration.instruction}"),
          code=("rain_tasks/attention.py", "rain_tasks/capture.py", "rain_tasks/calibration.py"),
          params=("attention",), outs=(ATTN,), desc="Stage 2: instruction-attention statistics, two passes"),
    Stage("alpha", _alpha, deps=(ATTN, "${models.lrm}/config.json"), code=("rain_tasks/alpha.py",), params=("alpha", "attention.prior"),
          outs=(ALPHA,), plots=("plots/alpha_heatmap.csv",), desc="Stage 2: closed-form α per head, mapped to modules"),
    Stage("merge", _merge, deps=("${models.lrm}", PROJ, ALPHA, TV), code=("rain_tasks/merge.py",), params=("merge",), outs=(MERGED,),
          desc="Stage 3: θ_R + λ·α⊙Δ⊥, streamed into new shards"),
    Stage("baselines", _baselines, deps=("${models.lrm}", TV), code=("rain_tasks/merge.py",),
          params=("baselines", "merge.max_shard_size"),
          outs=(BASELINES,), desc="task-arithmetic baselines on the same engine"),
    Stage("evaluate", _evaluate, deps=("${models.lrm}", "${models.itm}", MERGED, BASELINES, EVAL_DIR),
          code=("rain_tasks/evaluation.py", "rain_tasks/generation.py", "rain_tasks/instructions.py"),
          params=("evaluate",), outs=("reports/report.md",), metrics=("metrics/eval.json",), plots=("plots/eval.csv",),
          desc="behaviour, L_think and the comparison report"),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def get_stage(name: str) -> Stage:
    """Registry lookup naming the known stages on a typo."""
    try:
        return STAGE_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {[s.name for s in STAGES]}") from None


def run_stage(name: str, params: Params, root: str | Path = ".") -> None:
    """Run one stage of the project at `root`."""
    stage, root = get_stage(name), Path(root)
    log.info("stage %s: %s", name, stage.desc)
    stage.run(params, root)
    missing = [o for o in stage.outputs if not (root / resolve(o, params)).exists()]
    if missing:
        raise RuntimeError(f"stage {name} finished without writing {missing}")


def dvc_yaml() -> dict:
    """The dvc.yaml document for this registry."""

    def entry(s: Stage) -> dict:
        d: dict = {"desc": s.desc, "cmd": f"rain stage {s.name}", "deps": [*s.deps, *s.code]}
        if s.params:
            d["params"] = list(s.params)
        if s.outs:
            d["outs"] = list(s.outs)
        if s.metrics:
            d["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        if s.plots:
            d["plots"] = [{pl: {"cache": False}} for pl in s.plots]
        return d

    return {
        "stages": {s.name: entry(s) for s in STAGES},
        "plots": [
            {"plots/eval.csv": {"x": "metric", "y": "value", "template": "bar_horizontal"}},
            {"plots/alpha_heatmap.csv": {"x": "head", "y": "layer", "template": "confusion"}},
        ],
    }
