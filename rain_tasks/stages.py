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

TV, FEAT, FEAT_HELDOUT, PROJ = "artifacts/task_vectors", "artifacts/features", "artifacts/features_heldout", "artifacts/projected"
ATTN, ALPHA = "artifacts/attention", "artifacts/alpha"
MERGED, BASELINES = "models/merged", "models/baselines"
ORTHO_CSV = "plots/orthogonality.csv"
EVAL_DIR = "data/eval"
ALPHA_PNG = "plots/alpha_heatmap.png"


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
    accumulate_features(r / p.models.lrm, r / p.calibration.reasoning_heldout, p.features, r / FEAT_HELDOUT)


def _projection(p: Params, r: Path) -> None:
    from rain_tasks.projection import project

    project(r / TV, r / FEAT, p.projection, r / PROJ, r / "reports/projection.parquet", r / FEAT_HELDOUT,
            r / "metrics/projection.json")


def _attention_stats(p: Params, r: Path) -> None:
    from rain_tasks.attention import attention_stats

    attention_stats(
        r / p.models.lrm, r / PROJ, r / p.calibration.instruction, p.attention, r / ATTN / "stats.parquet", r / ATTN / "report.json"
    )


def _alpha(p: Params, r: Path) -> None:
    from rain_tasks.alpha import solve_alpha

    solve_alpha(
        r / ATTN / "stats.parquet", r / p.models.lrm, p.alpha, p.attention.prior,
        r / ALPHA / "alpha.parquet", r / ALPHA / "scales.safetensors", r / "plots/alpha_heatmap.csv", r / ALPHA_PNG,
        r / ALPHA / "summary.md", f"../{ALPHA_PNG}",
    )


def _rain_plan(p: Params, r: Path):
    """The merge stage's inputs per tensor: Δ⊥ on the Linear modules, Δ_I elsewhere under scope 'all', α scales."""
    from rain_tasks.merge import DeltaPlan, TensorDir

    return DeltaPlan(
        linear=TensorDir(r / PROJ),
        other=TensorDir(r / TV) if p.merge.scope == "all" else None,
        scales=TensorDir(None, single_file=r / ALPHA / "scales.safetensors"),
    )


def _merge(p: Params, r: Path, parts: Path | None = None) -> None:
    """Stage 3 with its lineage (lineage.json written inside the atomic directory write, shards naming it);
    `parts` holds layers already merged by `_merge_layer` tasks."""
    from rain_tasks import lineage
    from rain_tasks.merge import TensorDir, merge_checkpoint

    method_params = {"lam": p.merge.lam}
    inputs = lineage.record_inputs(r, lineage_inputs(p, "merge"))
    core = lineage.build_core(inputs, "rain", method_params, param_values(p, upstream_param_keys("merge", p)))
    merge_checkpoint(
        r / p.models.lrm, r / MERGED, "rain", method_params, _rain_plan(p, r), p.merge.max_shard_size,
        metadata=lineage.shard_metadata(core), parts=TensorDir(parts) if parts is not None else None,
        finalize=lambda tmp: lineage.write_lineage(tmp, core, lineage.provenance(r)),
    )


def _merge_layer(p: Params, r: Path, layer: int, parts: Path) -> None:
    from rain_tasks.merge import merge_layer
    from rain_tasks.task_vectors import layer_file

    merge_layer(r / p.models.lrm, layer, "rain", {"lam": p.merge.lam}, _rain_plan(p, r), layer_file(parts, layer))


def _baselines(p: Params, r: Path) -> None:
    from rain_tasks.checkpoint import Checkpoint, atomic_path
    from rain_tasks.merge import DeltaPlan, TensorDir, merge_checkpoint

    with atomic_path(r / BASELINES) as tmp:
        tmp.mkdir()
        for run in p.baselines.runs:
            plan = DeltaPlan(linear=TensorDir(r / TV), other=TensorDir(r / TV) if run.scope == "all" else None,
                             base=Checkpoint(r / p.models.base))
            merge_checkpoint(r / p.models.lrm, tmp / run.name, run.method, run.method_params(), plan, p.merge.max_shard_size)


def _orthogonality(p: Params, r: Path) -> None:
    from rain_tasks.orthogonality import write_orthogonality

    write_orthogonality(r / p.models.base, r / p.models.itm, r / p.models.lrm, p.orthogonality, r / ORTHO_CSV)


def _evaluate(p: Params, r: Path) -> None:
    from rain_tasks.evaluation import evaluate_models, format_table, write_outputs

    models = {"LRM": r / p.models.lrm, "ITM": r / p.models.itm, "RAIN": r / MERGED}
    models.update({run.name: r / BASELINES / run.name for run in p.baselines.runs})
    e = p.evaluate
    results = evaluate_models(
        r / p.models.lrm, models, r / EVAL_DIR / "instruction_eval.jsonl", r / EVAL_DIR / "reasoning_eval.jsonl",
        e.max_new_tokens, e.batch_size, e.neighbour_radius, e.max_eval,
    )
    alpha = (r / ALPHA / "summary.md").read_text()
    write_outputs(results, r / "metrics/eval.json", r / "plots/eval.csv", r / "reports/report.md",
                  {"merged": MERGED, "params": p.model_dump(exclude={"zoo"})}, sections=(alpha,))
    print(format_table(results))


STAGES: tuple[Stage, ...] = (
    Stage("zoo", _zoo, deps=(), code=("rain_tasks/zoo", "rain_tasks/instructions.py"), params=("zoo",),
          outs=("models/base", "models/itm", "models/lrm", "data/calibration", EVAL_DIR),
          desc="build the tiny model family and its calibration/evaluation data"),
    Stage("task_vectors", _task_vectors, deps=("${models.base}", "${models.itm}"),
          code=("rain_tasks/task_vectors.py",), outs=(TV,),
          desc="Δ_I = θ_ITM − θ_base per layer (fp32)"),
    Stage("orthogonality", _orthogonality, deps=("${models.base}", "${models.itm}", "${models.lrm}"),
          code=("rain_tasks/orthogonality.py",), params=("orthogonality",), plots=(ORTHO_CSV,),
          desc="principal-angle cosines between the top-r singular subspaces of Δ_R and Δ_I per module"),
    Stage("features", _features, deps=("${models.lrm}", "${calibration.reasoning}", "${calibration.reasoning_heldout}"),
          code=("rain_tasks/features.py", "rain_tasks/capture.py", "rain_tasks/calibration.py"), params=("features",),
          outs=(FEAT, FEAT_HELDOUT), desc="Stage 1: LRM features at Ω_think (calibration and held-out), Gram accumulation"),
    Stage("projection", _projection, deps=(TV, FEAT, FEAT_HELDOUT), code=("rain_tasks/projection.py",), params=("projection",),
          outs=(PROJ, "reports/projection.parquet"), metrics=("metrics/projection.json",),
          desc="Stage 1: null-space projection Δ⊥ and its invariance residuals"),
    Stage("attention_stats", _attention_stats, deps=("${models.lrm}", PROJ, "${calibration.instruction}"),
          code=("rain_tasks/attention.py", "rain_tasks/capture.py", "rain_tasks/calibration.py"),
          params=("attention",), outs=(ATTN,), desc="Stage 2: instruction-attention statistics, two passes"),
    Stage("alpha", _alpha, deps=(ATTN, "${models.lrm}/config.json"), code=("rain_tasks/alpha.py",), params=("alpha", "attention.prior"),
          outs=(ALPHA,), plots=("plots/alpha_heatmap.csv", ALPHA_PNG), desc="Stage 2: closed-form α per head, mapped to modules"),
    Stage("merge", _merge, deps=("${models.lrm}", PROJ, ALPHA, TV), code=("rain_tasks/merge.py", "rain_tasks/lineage.py"), params=("merge",), outs=(MERGED,),
          desc="Stage 3: θ_R + λ·α⊙Δ⊥, streamed into new shards"),
    Stage("baselines", _baselines, deps=("${models.lrm}", "${models.base}", TV), code=("rain_tasks/merge.py", "rain_tasks/baselines.py"),
          params=("baselines", "merge.max_shard_size"),
          outs=(BASELINES,), desc="task arithmetic, TIES, DARE and SLERP baselines on the same engine"),
    Stage("evaluate", _evaluate, deps=("${models.lrm}", "${models.itm}", MERGED, BASELINES, EVAL_DIR, ALPHA),
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


def run_stage(name: str, params: Params, root: str | Path = ".", parts: Path | None = None) -> None:
    """Run one stage of the project at `root`, after checking its inputs (a stage with deps reads the models).

    With `parts`, the stage finishes from the per-layer work its LAYER_SPLITS entry already did there.
    """
    stage, root = get_stage(name), Path(root)
    if stage.deps:  # the zoo makes the inputs; every other stage refuses bad ones before any work
        from rain_tasks.validation import preflight

        preflight(stage, params, root)
    log.info("stage %s: %s", name, stage.desc)
    if parts is None:
        stage.run(params, root)
    else:
        LAYER_SPLITS[name].finish(params, root, parts)
    missing = [o for o in stage.outputs if not (root / resolve(o, params)).exists()]
    if missing:
        raise RuntimeError(f"stage {name} finished without writing {missing}")


@dataclass(frozen=True)
class LayerSplit:
    """A stage whose per-layer work the Prefect flow can run as one task per layer (e.g. on a Dask cluster).

    `run(params, root, layer, parts)` does one layer's share into `parts` (a scratch directory the
    flow keys on the stage's inputs) or straight into the stage's own self-validating per-layer
    outputs; `finish(params, root, parts)` then completes the stage from that work, computing any
    layer left undone. Outputs are the same bytes as the stage's serial body (what `dvc repro` runs).
    """

    verb: str  # task names read "<verb> layer 3"
    run: Callable[[Params, Path, int, Path], None]
    finish: Callable[[Params, Path, Path], None]


def _projection_layer(p: Params, r: Path, layer: int, parts: Path) -> None:
    """One layer of Δ⊥, written in place: projection's layer files carry their inputs' digests, so the
    serial body skips them (`parts` is not needed)."""
    from rain_tasks.projection import project_layer_file

    project_layer_file(r / TV, r / FEAT, p.projection, r / PROJ, layer, r / FEAT_HELDOUT)


def _projection_finish(p: Params, r: Path, parts: Path) -> None:
    """The serial body, which keeps the layer files already current and writes the report and manifest."""
    _projection(p, r)


LAYER_SPLITS: dict[str, LayerSplit] = {
    "projection": LayerSplit("project", _projection_layer, _projection_finish),
    "merge": LayerSplit("merge", _merge_layer, _merge),
}


def param_values(params: Params, keys: tuple[str, ...]) -> dict:
    """The values of dotted params keys, e.g. {'alpha': {...}, 'attention.prior': 1.0}."""
    dumped = params.model_dump(mode="json")
    values = {}
    for key in keys:
        node = dumped
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


def _reads(path: str, output: str) -> bool:
    """True if a dep path and an output path overlap (one is the other or inside it)."""
    return path == output or path.startswith(output + "/") or output.startswith(path + "/")


def upstream_param_keys(name: str, params: Params) -> tuple[str, ...]:
    """The params keys that shaped a stage's outputs: its own, its `${...}` references, and every upstream stage's."""
    seen: dict[str, Stage] = {}
    todo = [get_stage(name)]
    while todo:
        stage = todo.pop()
        if stage.name in seen:
            continue
        seen[stage.name] = stage
        deps = [resolve(d, params) for d in stage.deps]
        todo += [s for s in STAGES if any(_reads(d, resolve(o, params)) for d in deps for o in s.outputs)]
    keys = {k for s in seen.values() for k in s.params}
    keys |= {f"{sec}.{key}" for s in seen.values() for d in s.deps for sec, key in _REF.findall(d)}
    return tuple(sorted(keys))


def lineage_inputs(params: Params, name: str) -> dict[str, str]:
    """Role -> path of what a merged model's lineage records: the three checkpoints, the calibration sets,
    and the stage's own artifact deps."""
    roles = {f"models.{k}": v for k, v in params.models.model_dump().items()}
    roles |= {f"calibration.{k}": v for k, v in params.calibration.model_dump().items()}
    roles |= {d: d for d in get_stage(name).deps if not _REF.search(d)}
    return roles


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
            {"plots/alpha_heatmap.csv": {"x": "alpha", "y": "unit", "template": "bar_horizontal"}},
            {ORTHO_CSV: {"x": "layer", "y": "cos_max", "template": "scatter"}},
            ALPHA_PNG,
        ],
    }
