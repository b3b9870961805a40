"""The pipeline's DAG in one place: each stage's params, inputs, outputs and the library call it makes.

`dvc.yaml` is generated from this registry (`rain dvc-yaml`, checked by a test), the CLI's
`rain stage NAME` runs one entry, and the Prefect flow runs the same entries in order, so
`dvc repro` and the flow cannot drift apart. Each stage body imports the library module it calls when it
runs, so reading the registry (dvc.yaml, the flow's DAG, `rain plan`) loads no model code. Paths are relative to the project root; a dep
written `${models.lrm}` is resolved from params.yaml (DVC templating does the same).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from rain_tasks.params import NEIGHBOUR_NAMES, Params, ReasonAnyParams, param_values
from rain_tasks.pipeline.imports import closure, function_imports, graph, source_files


TV, FEAT, FEAT_HELDOUT, PROJ = "artifacts/task_vectors", "artifacts/features", "artifacts/features_heldout", "artifacts/projected"
ATTN, ALPHA = "artifacts/attention", "artifacts/alpha"
MERGED, BASELINES, ABLATIONS = "models/merged", "models/baselines", "models/ablations"
PAPER_MODEL, PAPER_WORK = "models/paper_preset", "artifacts/paper_preset"
#: METHOD.md's configuration as published, merged beside the configured RAIN: Linear modules only, the two-pass α
#: as solved (about 0.003 per head on the tiny family), the 0.99 energy cap, λ 1
PAPER_PRESET = {
    "projection": {"energy": 0.99, "max_leftover": None, "rank": None, "rel_threshold": None, "ridge": 0.0,
                   "method": "nullspace"},
    "attention": {"curvature_pass": False},
    "alpha": {"variant": "two_pass", "scale": "absolute", "min_t": 0.0},
    "merge": {"lam": 1.0, "scope": "linear"},
}
ORTHO_CSV, ORTHO_PNG = "plots/orthogonality.csv", "plots/orthogonality.png"
EVAL_DIR = "data/eval"
ZOO_MD, ZOO_CSV = "reports/zoo.md", "plots/zoo_sweep.csv"
ALPHA_PNG, ALPHA_METRICS = "plots/alpha_heatmap.png", "metrics/alpha.json"
LAMBDA_CSV, LAMBDA_PNG = "plots/baselines_lambda.csv", "plots/baselines_lambda.png"
FRONTIER_CSV, FRONTIER_PNG = "plots/frontier.csv", "plots/frontier.png"
#: the neighbouring data-aware methods (METHODS-MORE.md): AIM's anchor statistic, ReasonAny's gradient scores, the
#: models and what they are merged from (SAGE's Δ', ReasonAny's masks)
AIM_STATS, GRAD_SCORES = "artifacts/aim_stats.safetensors", "artifacts/grad_scores"
NEIGHBOURS, NEIGHBOUR_WORK = "models/neighbours", "artifacts/neighbours"


class Ablation(NamedTuple):
    """RAIN's merge with one part changed: Stage 1 kept (Δ⊥ instead of Δ_I) or not, and the α it scales by
    (None: α = 1, '': Stage 2's α, else one of alpha.control_alphas at the same mean α)."""

    projected: bool
    alpha: str | None
    label: str


ABLATIONS_BY_NAME = {
    "rain_stage1_only": Ablation(True, None, "RAIN Stage 1 only: θ_R + λ·Δ⊥ (α = 1)"),
    "rain_stage2_only": Ablation(False, "", "RAIN Stage 2 only: θ_R + λ·α⊙Δ_I (no projection)"),
    "rain_uniform_alpha": Ablation(True, "uniform", "RAIN control: every head at the mean α"),
    "rain_permuted_alpha": Ablation(True, "permuted", "RAIN control: α permuted across heads"),
}


@dataclass(frozen=True)
class Stage:
    """One DAG node: what it reads (files and params sections), what it writes, and how."""

    name: str
    run: Callable[[Params, Path], dict | None]  # (params, project root) -> facts for the run record, if any
    deps: tuple[str, ...]
    params: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    desc: str = ""
    outputs: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        object.__setattr__(self, "outputs", self.outs + self.metrics + self.plots)

    @property
    def code(self) -> tuple[str, ...]:
        """Library files whose change must rerun the stage: the import closure of its body (dvc.yaml's code deps)."""
        return body_code(self.run.__name__)


@functools.cache
def body_code(body: str) -> tuple[str, ...]:
    """The library files a stage body of this module loads when it runs: what it imports and, transitively, what
    those import. This registry file itself is left out (every body lives here: any edit would rerun every stage)."""
    return source_files(closure(function_imports(__name__, body), graph()) - {__name__})


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
    from rain_tasks.merge.task_vectors import compute_task_vectors

    compute_task_vectors(r / p.models.base, r / p.models.itm, r / TV)


def _features(p: Params, r: Path) -> None:
    from rain_tasks.model.runtime import load_causal_lm
    from rain_tasks.stage1.features import accumulate_features

    load_lrm = functools.cache(functools.partial(load_causal_lm, r / p.models.lrm, p.runtime))  # one load for both sets
    for calibration, out in ((p.calibration.reasoning, FEAT), (p.calibration.reasoning_heldout, FEAT_HELDOUT)):
        accumulate_features(r / p.models.lrm, r / calibration, p.features, r / out, load_model=load_lrm, runtime=p.runtime)


def _projection(p: Params, r: Path) -> None:
    from rain_tasks.stage1.projection import project

    project(r / TV, r / FEAT, p.projection, r / PROJ, r / "reports/projection.parquet", r / FEAT_HELDOUT,
            r / "metrics/projection.json")


def _attention_stats(p: Params, r: Path) -> None:
    from rain_tasks.stage2.attention import attention_stats

    attention_stats(
        r / p.models.lrm, r / PROJ, r / p.calibration.instruction, p.attention, r / ATTN / "stats.parquet", r / ATTN / "report.json",
        lam=p.merge.lam, other_dir=r / TV if p.merge.scope == "all" else None, runtime=p.runtime,
    )


def _alpha(p: Params, r: Path) -> None:
    from rain_tasks.stage2.alpha import solve_alpha

    solve_alpha(
        r / ATTN / "stats.parquet", r / p.models.lrm, p.alpha, p.attention.prior,
        r / ALPHA / "alpha.parquet", r / ALPHA / "scales.safetensors", r / "plots/alpha_heatmap.csv", r / ALPHA_PNG,
        r / ALPHA / "summary.md", f"../{ALPHA_PNG}", r / ALPHA_METRICS,
    )


def _rain_plan(p: Params, r: Path, projected: bool = True, alpha: str | None = ""):
    """The merge stage's inputs per tensor: Δ⊥ on the Linear modules, Δ_I elsewhere under scope 'all', α scales.

    The ablations change one part: `projected=False` takes the unprojected Δ_I on the Linear modules
    (no Stage 1), `alpha=None` leaves out the α scales, i.e. α = 1 (no Stage 2), and `alpha='uniform'` or
    'permuted' takes a control's scales at the same mean α.
    """
    from rain_tasks.stage2.alpha import control_scales_path
    from rain_tasks.merge.engine import DeltaPlan, SingleFile, TensorDir

    scales = r / ALPHA / "scales.safetensors"
    return DeltaPlan(
        linear=TensorDir(r / (PROJ if projected else TV)),
        other=TensorDir(r / TV) if p.merge.scope == "all" else None,
        scales=None if alpha is None else SingleFile(control_scales_path(scales, alpha) if alpha else scales),
    )


@contextmanager
def _timed(models: dict[str, dict], name: str, **facts: str) -> Iterator[dict[str, str]]:
    """Record the wall time of the block as models[name]['merge_time_s'] (for the run record, rain_tasks.pipeline.runs:
    timings vary run to run, so never in a tracked output), beside `facts` such as the model's lineage digest (the
    block may add facts it learns to the dict it is given)."""
    start, found = time.perf_counter(), dict(facts)
    yield found
    models[name] = {"merge_time_s": round(time.perf_counter() - start, 3), **found}


def _lineage_cores(p: Params, r: Path, name: str) -> Callable[[str, dict], dict]:
    """(method, method_params) -> lineage core of a model that stage `name` merges; its inputs are hashed once
    here, however many models the stage writes."""
    from rain_tasks.audit import lineage

    inputs = lineage.record_inputs(r, lineage_inputs(p, name))
    params = param_values(p, upstream_param_keys(name, p))
    stages = tuple(s.name for s in upstream_stages(name, p))
    return lambda method, method_params: lineage.build_core(inputs, method, method_params, params, stages)


def _merge_recorded(p: Params, r: Path, out: Path, core: dict, plan, row: str, parts: Path | None = None,
                    method=None) -> None:
    """Merge the LRM into `out` as `core` says, with its records: shards naming the lineage, and the model card and
    lineage.json written inside the atomic directory write (`row`: the model's row in the evaluation report;
    `method`: a Method built from data, named core['method'], in place of the registered one)."""
    from rain_tasks.audit import lineage
    from rain_tasks.merge.engine import TensorDir, merge_checkpoint

    merge_checkpoint(r / p.models.lrm, out, method or core["method"], core["method_params"], plan, p.merge.max_shard_size,
                     metadata=lineage.shard_metadata(core), parts=TensorDir(parts) if parts is not None else None,
                     finalize=lambda tmp: lineage.write_records(tmp, core, r, row))


def _merge(p: Params, r: Path, parts: Path | None = None) -> dict:
    """Stage 3 with its lineage and model card; `parts` holds layers already merged by `_merge_layer` tasks."""
    from rain_tasks.io.digest import json_digest

    core, row = _lineage_cores(p, r, "merge")("rain", {"lam": p.merge.lam}), "RAIN"
    models: dict[str, dict] = {}
    with _timed(models, row, lineage=json_digest(core)):  # with `parts`, the assembly only
        _merge_recorded(p, r, r / MERGED, core, _rain_plan(p, r), row, parts)
    return {"models": models}


def _merge_layer(p: Params, r: Path, layer: int, parts: Path) -> None:
    from rain_tasks.merge.engine import merge_layer
    from rain_tasks.io.artifacts import layer_file

    merge_layer(r / p.models.lrm, layer, "rain", {"lam": p.merge.lam}, _rain_plan(p, r), layer_file(parts, layer))


def frontier_name(lam: float) -> str:
    """The ablations' directory of RAIN at λ (the frontier: same Δ⊥ and α, another global scale)."""
    return f"rain_lam_{lam:g}"


def _ablations(p: Params, r: Path) -> dict:
    """RAIN with one part changed (ABLATIONS_BY_NAME) and RAIN at each λ of merge.frontier_lams, each a model under
    models/ablations, same engine."""
    from rain_tasks.io.artifacts import atomic_path
    from rain_tasks.merge.engine import merge_checkpoint

    variants = {name: (p.merge.lam, _rain_plan(p, r, a.projected, a.alpha)) for name, a in ABLATIONS_BY_NAME.items()}
    variants |= {frontier_name(lam): (lam, _rain_plan(p, r)) for lam in p.merge.frontier_lams}
    models: dict[str, dict] = {}
    with atomic_path(r / ABLATIONS) as tmp:
        tmp.mkdir()
        for name, (lam, plan) in variants.items():
            with _timed(models, name):
                merge_checkpoint(r / p.models.lrm, tmp / name, "rain", {"lam": lam}, plan, p.merge.max_shard_size)
    return {"models": models}


def with_overrides(p: Params, overrides: dict[str, dict]) -> Params:
    """`p` with the given keys of its sections replaced (validated like params.yaml)."""
    dumped = p.model_dump()
    return Params.model_validate({**dumped, **{sec: {**dumped[sec], **keys} for sec, keys in overrides.items()}})


def _paper_preset(p: Params, r: Path) -> None:
    """RAIN under PAPER_PRESET from the same task vectors and features: its own Δ⊥, statistics, α and merged model."""
    from rain_tasks.stage2.alpha import solve_alpha
    from rain_tasks.stage2.attention import attention_stats
    from rain_tasks.merge.engine import DeltaPlan, SingleFile, TensorDir, merge_checkpoint
    from rain_tasks.stage1.projection import project

    q, work, lrm = with_overrides(p, PAPER_PRESET), r / PAPER_WORK, r / p.models.lrm
    project(r / TV, r / FEAT, q.projection, work / "projected", work / "projection.parquet")
    attention_stats(lrm, work / "projected", r / q.calibration.instruction, q.attention, work / "stats.parquet",
                    work / "attention.json", lam=q.merge.lam, runtime=p.runtime)
    solve_alpha(work / "stats.parquet", lrm, q.alpha, q.attention.prior, work / "alpha.parquet", work / "scales.safetensors")
    plan = DeltaPlan(linear=TensorDir(work / "projected"), scales=SingleFile(work / "scales.safetensors"))
    merge_checkpoint(lrm, r / PAPER_MODEL, "rain", {"lam": q.merge.lam}, plan, q.merge.max_shard_size)


def _baselines(p: Params, r: Path) -> dict:
    """One model per configured run under models/baselines, each with its lineage and model card like the merge's."""
    from rain_tasks.io.artifacts import atomic_path
    from rain_tasks.io.digest import json_digest

    cores = _lineage_cores(p, r, "baselines")
    models: dict[str, dict] = {}
    with atomic_path(r / BASELINES) as tmp:
        tmp.mkdir()
        for run in p.baselines.runs:
            plan = _task_vector_plan(p, r, run.scope)
            core = cores(run.method, run.method_params())
            with _timed(models, run.name, lineage=json_digest(core)):
                _merge_recorded(p, r, tmp / run.name, core, plan, run.name)
    return {"models": models}


def _aim_stats(p: Params, r: Path) -> None:
    """AIM's anchor statistic: mean |x| per input channel of θ_B or θ_R on the reasoning calibration set."""
    from rain_tasks.data_aware.aim import collect_channel_stats, rendered_token_lists
    from rain_tasks.io.digest import path_digest
    from rain_tasks.io.schemas import load_records

    anchor = r / (p.models.base if p.aim.anchor == "base" else p.models.lrm)
    texts = rendered_token_lists(r / p.models.lrm, load_records(r / p.calibration.reasoning, "reasoning"))
    collect_channel_stats(anchor, texts, p.aim, r / AIM_STATS, runtime=p.runtime,
                          calibration_digest=path_digest(r / p.calibration.reasoning))


def _grad_scores(p: Params, r: Path) -> None:
    """ReasonAny's four sweeps (ITM and θ_B on the instruction set, θ_R and θ_B on the reasoning set), one directory each."""
    from rain_tasks.data_aware.reasonany import SWEEPS, score_sweep, sweep_sequences
    from rain_tasks.io.artifacts import atomic_path
    from rain_tasks.io.digest import path_digest
    from rain_tasks.io.schemas import load_records
    from rain_tasks.model.calibration import load_tokenizer

    tokenizer, sets = load_tokenizer(r / p.models.lrm), ("instruction", "reasoning")
    paths = {key: r / getattr(p.calibration, key) for key in sets}
    data = {key: sweep_sequences(tokenizer, load_records(paths[key], key), p.reasonany) for key in sets}
    with atomic_path(r / GRAD_SCORES) as tmp:
        tmp.mkdir()
        for sweep, (model, dataset) in SWEEPS.items():
            score_sweep(r / getattr(p.models, model), data[dataset], p.reasonany, tmp / sweep, runtime=p.runtime,
                        calibration_digest=path_digest(paths[dataset]))


def _task_vector_plan(p: Params, r: Path, scope: str):
    """Δ_I on the Linear modules (and elsewhere under scope 'all') with θ_B: what the baselines merge from."""
    from rain_tasks.io.checkpoint import Checkpoint
    from rain_tasks.merge.engine import DeltaPlan, TensorDir

    return DeltaPlan(linear=TensorDir(r / TV), other=TensorDir(r / TV) if scope == "all" else None,
                     base=Checkpoint(r / p.models.base))


def _aim_merge(p: Params, r: Path, work: Path):
    """AIM: `aim.wrapped` relaxed column by column towards the anchor by the aim_stats statistic."""
    from rain_tasks.data_aware.aim import load_relaxations
    from rain_tasks.methods import get_method
    from rain_tasks.methods.aim import aim_wrap

    run = p.aim.wrapped
    method = aim_wrap(get_method(run.method), load_relaxations(r / AIM_STATS, p.aim.omega), p.aim.anchor)
    return method, run.method_params(), _task_vector_plan(p, r, run.scope)


def _sage_merge(p: Params, r: Path, work: Path):
    """SAGE: Δ' = Δ_I(I + βC_r)⁻¹ from the Stage 1 features, merged as θ_R + λ·Δ' on the Linear modules."""
    from rain_tasks.merge.engine import DeltaPlan, TensorDir
    from rain_tasks.methods import get_method
    from rain_tasks.stage1.sage import sanitize

    sanitize(r / TV, r / FEAT, p.sage, work / "sage")
    return get_method("task_arithmetic"), {"lam": p.sage.lam}, DeltaPlan(linear=TensorDir(work / "sage"))


def _reasonany_merge(p: Params, r: Path, work: Path):
    """ReasonAny: the masks from the gradient scores, then its merge in the configured direction."""
    from rain_tasks.data_aware.reasonany import SWEEPS, compute_masks, reasonany_method

    q = p.reasonany
    compute_masks({sweep: r / GRAD_SCORES / sweep for sweep in SWEEPS}, q, work / "reasonany_masks")
    method = reasonany_method(work / "reasonany_masks", q.direction)
    return method, {"lam_domain": q.lam_domain, "lam_reasoning": q.lam_reasoning}, _task_vector_plan(p, r, "all")


def neighbour_names(p: Params) -> tuple[str, str, str]:
    """The directories of the AIM, SAGE and ReasonAny models under models/neighbours."""
    return (p.aim.wrapped.name, *NEIGHBOUR_NAMES)


def neighbour_merges(p: Params) -> dict[str, Callable]:
    """Model name under models/neighbours -> (params, root, work dir) -> (method, method params, plan)."""
    return dict(zip(neighbour_names(p), (_aim_merge, _sage_merge, _reasonany_merge), strict=True))


def merge_neighbours(p: Params, r: Path, models_dir: Path, work_dir: Path, cores: Callable[[str, dict], dict] | None = None) -> dict:
    """Each neighbouring method's model into models_dir/<name> (its inputs built under work_dir), with lineage and
    model card when `cores` is given; returns {name: {merge_time_s, lineage}} (preparation included in the time)."""
    from rain_tasks.io.artifacts import atomic_path
    from rain_tasks.io.digest import json_digest
    from rain_tasks.merge.engine import merge_checkpoint

    models: dict[str, dict] = {}
    with atomic_path(work_dir) as work, atomic_path(models_dir) as tmp:
        work.mkdir()
        tmp.mkdir()
        for name, prepare in neighbour_merges(p).items():
            with _timed(models, name) as facts:  # preparation (statistics, masks) included
                method, method_params, plan = prepare(p, r, work)
                if cores is None:
                    merge_checkpoint(r / p.models.lrm, tmp / name, method, method_params, plan, p.merge.max_shard_size)
                else:
                    core = cores(method.name, method_params)
                    _merge_recorded(p, r, tmp / name, core, plan, name, method=method)
                    facts["lineage"] = json_digest(core)
    return models


def _neighbours(p: Params, r: Path) -> dict:
    """AIM-TIES, SAGE and ReasonAny under models/neighbours, each with its lineage and model card like the baselines'."""
    return {"models": merge_neighbours(p, r, r / NEIGHBOURS, r / NEIGHBOUR_WORK, _lineage_cores(p, r, "neighbours"))}


def _orthogonality(p: Params, r: Path) -> None:
    from rain_tasks.stage1.orthogonality import write_orthogonality

    write_orthogonality(r / p.models.base, r / p.models.itm, r / p.models.lrm, p.orthogonality, r / ORTHO_CSV, r / ORTHO_PNG)


def _contamination(p: Params, r: Path) -> dict[str, int]:
    """Held-out prompts found in a calibration set, per evaluation file; raises if there is any."""
    from rain_tasks.evaluate.evaluation import contaminated_prompts, require_uncontaminated
    from rain_tasks.io.schemas import load_records

    held_out = {"instruction_eval": load_records(r / EVAL_DIR / "instruction_eval.jsonl", "instruction_eval"),
                "reasoning_eval": load_records(r / EVAL_DIR / "reasoning_eval.jsonl", "reasoning")}
    if (r / EVAL_DIR / "instruction_val.jsonl").is_file():  # the zoo's validation prompts (for choosing settings)
        held_out["instruction_val"] = load_records(r / EVAL_DIR / "instruction_val.jsonl", "instruction_eval")
    calibration = [*load_records(r / p.calibration.reasoning, "reasoning"),
                   *load_records(r / p.calibration.instruction, "instruction")]
    return require_uncontaminated(contaminated_prompts(
        {name: [row["prompt"] for row in rows] for name, rows in held_out.items()}, (row["prompt"] for row in calibration)))


def neighbour_labels(p: Params) -> dict[str, str]:
    """The report's label of each neighbouring method's model."""
    a, g, q = p.aim, p.sage, p.reasonany
    anchor = "θ_B" if a.anchor == "base" else "θ_R"
    on = "θ_B + λ_X·M_X'⊙Δ_I + λ_R·M_R'⊙Δ_R" if q.direction == "native" else "θ_R + λ_X·M_X'⊙Δ_I"
    aim, sage, reasonany = neighbour_names(p)
    return {aim: f"AIM: {a.wrapped.describe()} relaxed towards {anchor}, ω={a.omega:g}",
            sage: f"SAGE (experimental): θ_R + {g.lam:g}·Δ_I(I + βC_r)⁻¹, β={g.beta:g}",
            reasonany: f"ReasonAny ({q.direction}, {q.granularity} masks): {on}, p={q.p_domain:g}/{q.p_reasoning:g}"}


def _evaluate(p: Params, r: Path) -> None:
    from rain_tasks.evaluate.evaluation import (
        evaluate_models, format_table, frontier_table, lambda_table, lm_eval_scores, write_frontier, write_lambda_sweep,
        write_outputs,
    )
    from rain_tasks.model.generation import Sampling

    contamination = _contamination(p, r)  # before any model runs: contaminated numbers are not worth computing
    labels = {"LRM": "reasoning model θ_R", "ITM": "instruction model θ_I"}
    labels |= {run.name: run.describe() for run in p.baselines.runs}
    labels |= {name: a.label for name, a in ABLATIONS_BY_NAME.items()} | {"RAIN": "RAIN: θ_R + λ·α⊙Δ⊥"}
    labels["paper_preset"] = "RAIN, METHOD.md as published: Linear modules, two-pass α as solved, energy 0.99, λ 1"
    labels |= neighbour_labels(p)
    models = {"LRM": r / p.models.lrm, "ITM": r / p.models.itm}
    models |= {run.name: r / BASELINES / run.name for run in p.baselines.runs}
    models |= {name: r / ABLATIONS / name for name in ABLATIONS_BY_NAME} | {"paper_preset": r / PAPER_MODEL, "RAIN": r / MERGED}
    models |= {name: r / NEIGHBOURS / name for name in neighbour_names(p)}
    frontier = {frontier_name(lam): lam for lam in p.merge.frontier_lams}
    models |= {name: r / ABLATIONS / name for name in frontier}
    labels |= {name: f"RAIN frontier: θ_R + {lam:g}·α⊙Δ⊥" for name, lam in frontier.items()}
    e = p.evaluate
    results = evaluate_models(
        r / p.models.lrm, models, r / EVAL_DIR / "instruction_eval.jsonl", r / EVAL_DIR / "reasoning_eval.jsonl",
        e.max_new_tokens, e.batch_size, e.neighbour_radius, e.max_eval, runtime=p.runtime,
        sampling=Sampling(e.temperature, e.top_p, e.num_samples, e.seed),
    )
    if e.lm_eval_tasks:
        for name, scores in lm_eval_scores(models, e.lm_eval_tasks, e.lm_eval_limit, e.lm_eval_include,
                                           runtime=p.runtime, evaluate=e).items():
            results[name]["lm_eval"] = scores
    runs = [run.model_dump(mode="json") for run in p.baselines.runs]
    figures = [("orthogonality of Δ_R and Δ_I", f"../{ORTHO_PNG}")]
    if write_lambda_sweep(lambda_table(results, runs), r / LAMBDA_CSV, r / LAMBDA_PNG):
        figures.insert(0, ("task arithmetic against λ", f"../{LAMBDA_PNG}"))
    ta = {run.name: (f"task arithmetic ({run.scope})", run.lam) for run in p.baselines.runs if run.method == "task_arithmetic"}
    rain = {name: (f"RAIN ({p.merge.scope})", lam) for name, lam in frontier.items()}
    write_frontier(frontier_table(results, ta | rain), r / FRONTIER_CSV, r / FRONTIER_PNG)
    figures.insert(0, ("frontier: compliance against thinking cost, RAIN and task arithmetic over λ", f"../{FRONTIER_PNG}"))
    context = {"merged": MERGED, "labels": labels, "contamination": contamination, "params": p.model_dump(exclude={"zoo"})}
    write_outputs(results, r / "metrics/eval.json", r / "plots/eval.csv", r / "reports/report.md", context,
                  sections=((r / ALPHA / "summary.md").read_text(),), figures=tuple(figures))
    print(format_table(results, labels))


STAGES: tuple[Stage, ...] = (
    Stage("zoo", _zoo, deps=(), params=("zoo",),
          outs=("models/base", "models/itm", "models/lrm", "data/calibration", EVAL_DIR, ZOO_MD), plots=(ZOO_CSV,),
          desc="build the tiny model family and its calibration/evaluation data; report task arithmetic's λ sweep on it"),
    Stage("task_vectors", _task_vectors, deps=("${models.base}", "${models.itm}"), outs=(TV,),
          desc="Δ_I = θ_ITM − θ_base per layer (fp32)"),
    Stage("orthogonality", _orthogonality, deps=("${models.base}", "${models.itm}", "${models.lrm}"), params=("orthogonality",), plots=(ORTHO_CSV, ORTHO_PNG),
          desc="principal-angle cosines between the top-r singular subspaces of Δ_R and Δ_I per module"),
    Stage("features", _features, deps=("${models.lrm}", "${calibration.reasoning}", "${calibration.reasoning_heldout}"), params=("features", "runtime.dtype"),
          outs=(FEAT, FEAT_HELDOUT), desc="Stage 1: LRM features at Ω_think (calibration and held-out), Gram accumulation"),
    Stage("projection", _projection, deps=(TV, FEAT, FEAT_HELDOUT), params=("projection",),
          outs=(PROJ, "reports/projection.parquet"), metrics=("metrics/projection.json",),
          desc="Stage 1: null-space projection Δ⊥ (or SAGE's damping, projection.method) and its invariance residuals"),
    Stage("attention_stats", _attention_stats, deps=("${models.lrm}", PROJ, TV, "${calibration.instruction}"),
          params=("attention", "merge.lam", "merge.scope", "runtime.dtype"), outs=(ATTN,),
          desc="Stage 2: instruction-attention statistics along the merge's update (passes at 0, p, 2p)"),
    Stage("alpha", _alpha, deps=(ATTN, "${models.lrm}/config.json"), params=("alpha", "attention.prior"),
          outs=(ALPHA,), metrics=(ALPHA_METRICS,), plots=("plots/alpha_heatmap.csv", ALPHA_PNG),
          desc="Stage 2: α per head with its evidence, mapped to modules; uniform and permuted controls"),
    Stage("merge", _merge, deps=("${models.lrm}", PROJ, ALPHA, TV), params=("merge",), outs=(MERGED,),
          desc="Stage 3: θ_R + λ·α⊙Δ⊥, streamed into new shards"),
    Stage("ablations", _ablations, deps=("${models.lrm}", PROJ, ALPHA, TV), params=("merge",),
          outs=(ABLATIONS,),
          desc="the paper's ablations (Stage 1 only, Stage 2 only), α controls (uniform, permuted) and RAIN over λ, same engine"),
    Stage("paper_preset", _paper_preset, deps=("${models.lrm}", TV, FEAT, "${calibration.instruction}"),
          params=("attention", "alpha", "merge.max_shard_size", "runtime.dtype"), outs=(PAPER_WORK, PAPER_MODEL),
          desc="RAIN as METHOD.md publishes it (PAPER_PRESET), beside the configured RAIN in the report"),
    Stage("baselines", _baselines, deps=("${models.lrm}", "${models.base}", TV),
          params=("baselines", "merge.max_shard_size"),
          outs=(BASELINES,),
          desc="task arithmetic, TIES, DARE and SLERP baselines on the same engine"),
    Stage("aim_stats", _aim_stats, deps=("${models.base}", "${models.lrm}", "${calibration.reasoning}"),
          params=tuple(f"aim.{k}" for k in ("anchor", "modules", "block_tokens", "max_samples")) + ("runtime.dtype",),
          outs=(AIM_STATS,), desc="AIM: the anchor's mean |x| per input channel of each Linear module on the reasoning set"),
    Stage("grad_scores", _grad_scores,
          deps=("${models.base}", "${models.itm}", "${models.lrm}", "${calibration.instruction}", "${calibration.reasoning}"),
          params=tuple(f"reasonany.{k}" for k in ReasonAnyParams.SWEEP_KEYS) + ("runtime.dtype",), outs=(GRAD_SCORES,),
          desc="ReasonAny: per-element mean |∇L| of ITM and θ_B on the instruction set, θ_R and θ_B on the reasoning set"),
    Stage("neighbours", _neighbours, deps=("${models.lrm}", "${models.base}", TV, FEAT, AIM_STATS, GRAD_SCORES),
          params=("aim", "sage", "reasonany", "merge.max_shard_size"), outs=(NEIGHBOUR_WORK, NEIGHBOURS),
          desc="AIM-TIES, SAGE (experimental) and ReasonAny, same engine, with lineage and model cards"),
    Stage("evaluate", _evaluate, deps=("${models.lrm}", "${models.itm}", MERGED, ABLATIONS, PAPER_MODEL, BASELINES, NEIGHBOURS,
                                       EVAL_DIR, ALPHA, "${calibration.reasoning}", "${calibration.instruction}", ORTHO_PNG),
          params=("evaluate", "baselines", "aim", "sage", "reasonany", "runtime.dtype"), outs=("reports/report.md", "reports/report.json"), metrics=("metrics/eval.json",),
          plots=("plots/eval.csv", LAMBDA_CSV, LAMBDA_PNG, FRONTIER_CSV, FRONTIER_PNG),
          desc="contamination check, behaviour, L_think and the comparison report"),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def get_stage(name: str) -> Stage:
    """Registry lookup naming the known stages on a typo."""
    try:
        return STAGE_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {[s.name for s in STAGES]}") from None


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
    finish: Callable[[Params, Path, Path], dict | None]


def _projection_layer(p: Params, r: Path, layer: int, parts: Path) -> None:
    """One layer of Δ⊥, written in place: projection's layer files carry their inputs' digests, so the
    serial body skips them (`parts` is not needed)."""
    from rain_tasks.stage1.projection import project_layer_file

    project_layer_file(r / TV, r / FEAT, p.projection, r / PROJ, layer, r / FEAT_HELDOUT)


def _projection_finish(p: Params, r: Path, parts: Path) -> None:
    """The serial body, which keeps the layer files already current and writes the report and manifest."""
    _projection(p, r)


LAYER_SPLITS: dict[str, LayerSplit] = {
    "projection": LayerSplit("project", _projection_layer, _projection_finish),
    "merge": LayerSplit("merge", _merge_layer, _merge),
}


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
    from rain_tasks.evaluate.evaluation import LAMBDA_METRICS

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
            {FRONTIER_CSV: {"x": "l_think", "y": "comply_rate", "template": "scatter"}},
            FRONTIER_PNG,
            ALPHA_PNG,
            ORTHO_PNG,
            LAMBDA_PNG,
        ],
    }
