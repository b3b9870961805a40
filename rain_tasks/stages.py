"""The pipeline's DAG in one place: each stage's params, inputs, outputs and the library call it makes.

`dvc.yaml` is generated from this registry (`rain dvc-yaml`, checked by a test), the CLI's
`rain stage NAME` runs one entry, and the Prefect flow runs the same entries in order, so
`dvc repro` and the flow cannot drift apart. Paths are relative to the project root; a dep
written `${models.lrm}` is resolved from params.yaml (DVC templating does the same).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from rain_tasks.params import Params

log = logging.getLogger(__name__)

TV, FEAT, FEAT_HELDOUT, PROJ = "artifacts/task_vectors", "artifacts/features", "artifacts/features_heldout", "artifacts/projected"
ATTN, ALPHA = "artifacts/attention", "artifacts/alpha"
MERGED, BASELINES, ABLATIONS = "models/merged", "models/baselines", "models/ablations"
ORTHO_CSV, ORTHO_PNG = "plots/orthogonality.csv", "plots/orthogonality.png"
EVAL_DIR = "data/eval"
ZOO_MD, ZOO_CSV = "reports/zoo.md", "plots/zoo_sweep.csv"
ALPHA_PNG = "plots/alpha_heatmap.png"
LAMBDA_CSV, LAMBDA_PNG = "plots/baselines_lambda.csv", "plots/baselines_lambda.png"
#: each merging stage's wall time per model it writes (outside the model directories, whose bytes stay deterministic)
MERGE_TIMES = {"merge": "metrics/merge_time.json", "ablations": "metrics/ablations_time.json",
               "baselines": "metrics/baselines_time.json"}
#: outputs that record wall-clock times: identical inputs give identical bytes everywhere else
TIMED_OUTPUTS = frozenset({*MERGE_TIMES.values(), "metrics/eval.json", "plots/eval.csv", "reports/report.md", "reports/report.json"})


class Ablation(NamedTuple):
    """One of the paper's ablations: RAIN's merge keeping Stage 1 (Δ⊥ instead of Δ_I) and/or Stage 2 (α, else 1)."""

    projected: bool
    scaled: bool
    label: str


ABLATIONS_BY_NAME = {
    "rain_stage1_only": Ablation(True, False, "RAIN Stage 1 only: θ_R + λ·Δ⊥ (α = 1)"),
    "rain_stage2_only": Ablation(False, True, "RAIN Stage 2 only: θ_R + λ·α⊙Δ_I (no projection)"),
}


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
    from rain_tasks.zoo.report import REPORT_LAMBDAS, write_zoo_report

    build_zoo(p.zoo, r / "models", r / "data")
    write_zoo_report(r / "models", r / EVAL_DIR / "instruction_eval.jsonl", REPORT_LAMBDAS, r / ZOO_MD, r / ZOO_CSV,
                     threads=p.zoo.threads)


def _task_vectors(p: Params, r: Path) -> None:
    from rain_tasks.task_vectors import compute_task_vectors

    compute_task_vectors(r / p.models.base, r / p.models.itm, r / TV)


def _features(p: Params, r: Path) -> None:
    from rain_tasks.checkpoint import load_causal_lm
    from rain_tasks.features import accumulate_features

    load_lrm = functools.cache(functools.partial(load_causal_lm, r / p.models.lrm, p.runtime))  # one load for both sets
    for calibration, out in ((p.calibration.reasoning, FEAT), (p.calibration.reasoning_heldout, FEAT_HELDOUT)):
        accumulate_features(r / p.models.lrm, r / calibration, p.features, r / out, load_model=load_lrm, runtime=p.runtime)


def _projection(p: Params, r: Path) -> None:
    from rain_tasks.projection import project

    project(r / TV, r / FEAT, p.projection, r / PROJ, r / "reports/projection.parquet", r / FEAT_HELDOUT,
            r / "metrics/projection.json")


def _attention_stats(p: Params, r: Path) -> None:
    from rain_tasks.attention import attention_stats

    attention_stats(
        r / p.models.lrm, r / PROJ, r / p.calibration.instruction, p.attention, r / ATTN / "stats.parquet", r / ATTN / "report.json",
        runtime=p.runtime,
    )


def _alpha(p: Params, r: Path) -> None:
    from rain_tasks.alpha import solve_alpha

    solve_alpha(
        r / ATTN / "stats.parquet", r / p.models.lrm, p.alpha, p.attention.prior,
        r / ALPHA / "alpha.parquet", r / ALPHA / "scales.safetensors", r / "plots/alpha_heatmap.csv", r / ALPHA_PNG,
        r / ALPHA / "summary.md", f"../{ALPHA_PNG}",
    )


def _rain_plan(p: Params, r: Path, projected: bool = True, scaled: bool = True):
    """The merge stage's inputs per tensor: Δ⊥ on the Linear modules, Δ_I elsewhere under scope 'all', α scales.

    The ablations drop one stage: `projected=False` takes the unprojected Δ_I on the Linear modules
    (no Stage 1), `scaled=False` leaves out the α scales, i.e. α = 1 (no Stage 2).
    """
    from rain_tasks.merge import DeltaPlan, TensorDir

    return DeltaPlan(
        linear=TensorDir(r / (PROJ if projected else TV)),
        other=TensorDir(r / TV) if p.merge.scope == "all" else None,
        scales=TensorDir(None, single_file=r / ALPHA / "scales.safetensors") if scaled else None,
    )


@contextmanager
def _timed(times: dict[str, dict], name: str) -> Iterator[None]:
    """Record the wall time of the block as times[name]['merge_time_s']."""
    start = time.perf_counter()
    yield
    times[name] = {"merge_time_s": round(time.perf_counter() - start, 3)}


def _write_times(path: Path, times: dict[str, dict]) -> None:
    """A merging stage's wall times (its metrics file: timings vary run to run, so never inside a model directory)."""
    from rain_tasks.checkpoint import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(times, indent=2, sort_keys=True) + "\n")


def _lineage_cores(p: Params, r: Path, name: str) -> Callable[[str, dict], dict]:
    """(method, method_params) -> lineage core of a model that stage `name` merges; its inputs are hashed once
    here, however many models the stage writes."""
    from rain_tasks import lineage

    inputs = lineage.record_inputs(r, lineage_inputs(p, name))
    params = param_values(p, upstream_param_keys(name, p))
    stages = tuple(s.name for s in upstream_stages(name, p))
    return lambda method, method_params: lineage.build_core(inputs, method, method_params, params, stages)


def _merge_recorded(p: Params, r: Path, out: Path, core: dict, plan, row: str, parts: Path | None = None) -> None:
    """Merge the LRM into `out` as `core` says, with its records: shards naming the lineage, and the model card and
    lineage.json written inside the atomic directory write (`row`: the model's row in the evaluation report)."""
    from rain_tasks import lineage
    from rain_tasks.merge import TensorDir, merge_checkpoint

    merge_checkpoint(r / p.models.lrm, out, core["method"], core["method_params"], plan, p.merge.max_shard_size,
                     metadata=lineage.shard_metadata(core), parts=TensorDir(parts) if parts is not None else None,
                     finalize=lambda tmp: lineage.write_records(tmp, core, r, row))


def _merge(p: Params, r: Path, parts: Path | None = None) -> None:
    """Stage 3 with its lineage and model card; `parts` holds layers already merged by `_merge_layer` tasks."""
    core, row = _lineage_cores(p, r, "merge")("rain", {"lam": p.merge.lam}), "RAIN"
    times: dict[str, dict] = {}
    with _timed(times, row):  # with `parts`, the assembly only: the layers were merged by other tasks
        _merge_recorded(p, r, r / MERGED, core, _rain_plan(p, r), row, parts)
    _write_times(r / MERGE_TIMES["merge"], times)


def _merge_layer(p: Params, r: Path, layer: int, parts: Path) -> None:
    from rain_tasks.merge import merge_layer
    from rain_tasks.task_vectors import layer_file

    merge_layer(r / p.models.lrm, layer, "rain", {"lam": p.merge.lam}, _rain_plan(p, r), layer_file(parts, layer))


def _ablations(p: Params, r: Path) -> None:
    """RAIN with one stage left out (ABLATIONS_BY_NAME), each a model under models/ablations, same engine and λ."""
    from rain_tasks.checkpoint import atomic_path
    from rain_tasks.merge import merge_checkpoint

    times: dict[str, dict] = {}
    with atomic_path(r / ABLATIONS) as tmp:
        tmp.mkdir()
        for name, ablation in ABLATIONS_BY_NAME.items():
            with _timed(times, name):
                merge_checkpoint(r / p.models.lrm, tmp / name, "rain", {"lam": p.merge.lam},
                                 _rain_plan(p, r, ablation.projected, ablation.scaled), p.merge.max_shard_size)
    _write_times(r / MERGE_TIMES["ablations"], times)


def _baselines(p: Params, r: Path) -> None:
    """One model per configured run under models/baselines, each with its lineage and model card like the merge's."""
    from rain_tasks.checkpoint import Checkpoint, atomic_path
    from rain_tasks.merge import DeltaPlan, TensorDir

    cores = _lineage_cores(p, r, "baselines")
    times: dict[str, dict] = {}
    with atomic_path(r / BASELINES) as tmp:
        tmp.mkdir()
        for run in p.baselines.runs:
            plan = DeltaPlan(linear=TensorDir(r / TV), other=TensorDir(r / TV) if run.scope == "all" else None,
                             base=Checkpoint(r / p.models.base))
            with _timed(times, run.name):
                _merge_recorded(p, r, tmp / run.name, cores(run.method, run.method_params()), plan, run.name)
    _write_times(r / MERGE_TIMES["baselines"], times)


def _orthogonality(p: Params, r: Path) -> None:
    from rain_tasks.orthogonality import write_orthogonality

    write_orthogonality(r / p.models.base, r / p.models.itm, r / p.models.lrm, p.orthogonality, r / ORTHO_CSV, r / ORTHO_PNG)


def _contamination(p: Params, r: Path) -> dict[str, int]:
    """Held-out prompts found in a calibration set, per evaluation file; raises if there is any."""
    from rain_tasks.evaluation import contaminated_prompts, require_uncontaminated
    from rain_tasks.schemas import load_records

    held_out = {"instruction_eval": load_records(r / EVAL_DIR / "instruction_eval.jsonl", "instruction_eval"),
                "reasoning_eval": load_records(r / EVAL_DIR / "reasoning_eval.jsonl", "reasoning")}
    calibration = [*load_records(r / p.calibration.reasoning, "reasoning"),
                   *load_records(r / p.calibration.instruction, "instruction")]
    return require_uncontaminated(contaminated_prompts(
        {name: [row["prompt"] for row in rows] for name, rows in held_out.items()}, (row["prompt"] for row in calibration)))


def _evaluate(p: Params, r: Path) -> None:
    from rain_tasks.evaluation import (
        evaluate_models, format_table, lambda_table, lm_eval_scores, read_merge_times, write_lambda_sweep, write_outputs,
    )
    from rain_tasks.generation import Sampling

    contamination = _contamination(p, r)  # before any model runs: contaminated numbers are not worth computing
    labels = {"LRM": "reasoning model θ_R", "ITM": "instruction model θ_I"}
    labels |= {run.name: run.describe() for run in p.baselines.runs}
    labels |= {name: a.label for name, a in ABLATIONS_BY_NAME.items()} | {"RAIN": "RAIN: θ_R + λ·α⊙Δ⊥"}
    models = {"LRM": r / p.models.lrm, "ITM": r / p.models.itm}
    models |= {run.name: r / BASELINES / run.name for run in p.baselines.runs}
    models |= {name: r / ABLATIONS / name for name in ABLATIONS_BY_NAME} | {"RAIN": r / MERGED}
    e = p.evaluate
    results = evaluate_models(
        r / p.models.lrm, models, r / EVAL_DIR / "instruction_eval.jsonl", r / EVAL_DIR / "reasoning_eval.jsonl",
        e.max_new_tokens, e.batch_size, e.neighbour_radius, e.max_eval, runtime=p.runtime,
        sampling=Sampling(e.temperature, e.top_p, e.num_samples, e.seed),
    )
    for name, seconds in read_merge_times(r / path for path in MERGE_TIMES.values()).items():
        results[name]["merge_time_s"] = seconds
    if e.lm_eval_tasks:
        for name, scores in lm_eval_scores(models, e.lm_eval_tasks, e.lm_eval_limit, e.lm_eval_include,
                                           runtime=p.runtime, evaluate=e).items():
            results[name]["lm_eval"] = scores
    runs = [run.model_dump(mode="json") for run in p.baselines.runs]
    figures = [("orthogonality of Δ_R and Δ_I", f"../{ORTHO_PNG}")]
    if write_lambda_sweep(lambda_table(results, runs), r / LAMBDA_CSV, r / LAMBDA_PNG):
        figures.insert(0, ("task arithmetic against λ", f"../{LAMBDA_PNG}"))
    context = {"merged": MERGED, "labels": labels, "contamination": contamination, "params": p.model_dump(exclude={"zoo"})}
    write_outputs(results, r / "metrics/eval.json", r / "plots/eval.csv", r / "reports/report.md", context,
                  sections=((r / ALPHA / "summary.md").read_text(),), figures=tuple(figures))
    print(format_table(results, labels))


STAGES: tuple[Stage, ...] = (
    Stage("zoo", _zoo, deps=(), code=("rain_tasks/zoo", "rain_tasks/instructions.py", "rain_tasks/generation.py"), params=("zoo",),
          outs=("models/base", "models/itm", "models/lrm", "data/calibration", EVAL_DIR, ZOO_MD), plots=(ZOO_CSV,),
          desc="build the tiny model family and its calibration/evaluation data; report task arithmetic's λ sweep on it"),
    Stage("task_vectors", _task_vectors, deps=("${models.base}", "${models.itm}"),
          code=("rain_tasks/task_vectors.py",), outs=(TV,),
          desc="Δ_I = θ_ITM − θ_base per layer (fp32)"),
    Stage("orthogonality", _orthogonality, deps=("${models.base}", "${models.itm}", "${models.lrm}"),
          code=("rain_tasks/orthogonality.py", "rain_tasks/plots.py"), params=("orthogonality",), plots=(ORTHO_CSV, ORTHO_PNG),
          desc="principal-angle cosines between the top-r singular subspaces of Δ_R and Δ_I per module"),
    Stage("features", _features, deps=("${models.lrm}", "${calibration.reasoning}", "${calibration.reasoning_heldout}"),
          code=("rain_tasks/features.py", "rain_tasks/capture.py", "rain_tasks/calibration.py"), params=("features", "runtime.dtype"),
          outs=(FEAT, FEAT_HELDOUT), desc="Stage 1: LRM features at Ω_think (calibration and held-out), Gram accumulation"),
    Stage("projection", _projection, deps=(TV, FEAT, FEAT_HELDOUT), code=("rain_tasks/projection.py",), params=("projection",),
          outs=(PROJ, "reports/projection.parquet"), metrics=("metrics/projection.json",),
          desc="Stage 1: null-space projection Δ⊥ and its invariance residuals"),
    Stage("attention_stats", _attention_stats, deps=("${models.lrm}", PROJ, "${calibration.instruction}"),
          code=("rain_tasks/attention.py", "rain_tasks/capture.py", "rain_tasks/calibration.py"),
          params=("attention", "runtime.dtype"), outs=(ATTN,), desc="Stage 2: instruction-attention statistics, two passes"),
    Stage("alpha", _alpha, deps=(ATTN, "${models.lrm}/config.json"), code=("rain_tasks/alpha.py",), params=("alpha", "attention.prior"),
          outs=(ALPHA,), plots=("plots/alpha_heatmap.csv", ALPHA_PNG), desc="Stage 2: closed-form α per head, mapped to modules"),
    Stage("merge", _merge, deps=("${models.lrm}", PROJ, ALPHA, TV), code=("rain_tasks/merge.py", "rain_tasks/lineage.py", "rain_tasks/card.py"), params=("merge",), outs=(MERGED,),
          metrics=(MERGE_TIMES["merge"],), desc="Stage 3: θ_R + λ·α⊙Δ⊥, streamed into new shards"),
    Stage("ablations", _ablations, deps=("${models.lrm}", PROJ, ALPHA, TV), code=("rain_tasks/merge.py",), params=("merge",),
          outs=(ABLATIONS,), metrics=(MERGE_TIMES["ablations"],),
          desc="the paper's ablations: Stage 1 only (Δ⊥, α = 1) and Stage 2 only (α⊙Δ_I), same engine"),
    Stage("baselines", _baselines, deps=("${models.lrm}", "${models.base}", TV),
          code=("rain_tasks/merge.py", "rain_tasks/baselines.py", "rain_tasks/lineage.py", "rain_tasks/card.py"),
          params=("baselines", "merge.max_shard_size"),
          outs=(BASELINES,), metrics=(MERGE_TIMES["baselines"],),
          desc="task arithmetic, TIES, DARE and SLERP baselines on the same engine"),
    Stage("evaluate", _evaluate, deps=("${models.lrm}", "${models.itm}", MERGED, ABLATIONS, BASELINES, EVAL_DIR, ALPHA,
                                       "${calibration.reasoning}", "${calibration.instruction}", ORTHO_PNG, *MERGE_TIMES.values()),
          code=("rain_tasks/evaluation.py", "rain_tasks/generation.py", "rain_tasks/instructions.py", "rain_tasks/plots.py"),
          params=("evaluate", "baselines", "runtime.dtype"), outs=("reports/report.md", "reports/report.json"), metrics=("metrics/eval.json",),
          plots=("plots/eval.csv", LAMBDA_CSV, LAMBDA_PNG),
          desc="contamination check, behaviour, L_think and the comparison report"),
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


def upstream_stages(name: str, params: Params) -> tuple[Stage, ...]:
    """Stage `name` and every stage whose outputs it reads, directly or not, in registry (execution) order."""
    seen: dict[str, Stage] = {}
    todo = [get_stage(name)]
    while todo:
        stage = todo.pop()
        if stage.name in seen:
            continue
        seen[stage.name] = stage
        deps = [resolve(d, params) for d in stage.deps]
        todo += [s for s in STAGES if any(_reads(d, resolve(o, params)) for d in deps for o in s.outputs)]
    return tuple(s for s in STAGES if s.name in seen)


def _upstream_refs(name: str, params: Params) -> set[tuple[str, str]]:
    """The (section, key) of every `${...}` dep of the stage and its upstream stages."""
    return {ref for s in upstream_stages(name, params) for d in s.deps for ref in _REF.findall(d)}


def upstream_param_keys(name: str, params: Params) -> tuple[str, ...]:
    """The params keys that shaped a stage's outputs: its own, its `${...}` references, and every upstream stage's."""
    keys = {k for s in upstream_stages(name, params) for k in s.params}
    keys |= {f"{sec}.{key}" for sec, key in _upstream_refs(name, params)}
    return tuple(sorted(keys))


def lineage_inputs(params: Params, name: str) -> dict[str, str]:
    """Role -> path of what a merged model's lineage records: the three checkpoints, the calibration sets the
    stage's upstream read (none for the baselines), and the stage's own artifact deps."""
    roles = {f"models.{k}": v for k, v in params.models.model_dump().items()}
    roles |= {f"calibration.{key}": getattr(params.calibration, key)
              for sec, key in _upstream_refs(name, params) if sec == "calibration"}
    roles |= {d: d for d in get_stage(name).deps if not _REF.search(d)}
    return roles


def dvc_yaml() -> dict:
    """The dvc.yaml document for this registry."""
    from rain_tasks.evaluation import LAMBDA_METRICS

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
            {LAMBDA_CSV: {"x": "lam", "y": list(LAMBDA_METRICS)}},
            {ZOO_CSV: {"x": "lambda", "y": ["close_rate", "correct_rate", "comply_rate"]}},
            ALPHA_PNG,
            ORTHO_PNG,
            LAMBDA_PNG,
        ],
    }
