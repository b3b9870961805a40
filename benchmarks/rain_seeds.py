"""RAIN against its controls and the data-free baselines over zoo seeds (issues 14 and 19), with spread.

Usage: python benchmarks/rain_seeds.py [--seeds 0 1 2] [--project .] [--set KEY=JSON ...] [--lambdas 0.3 0.5 …]
       [--frontier 1 3 4] [--max-eval N] [--workdir DIR] [--family-from DIR]
Per seed: the zoo built with that seed (zoo parameters from the project's params.yaml with `--set` overrides; the zoo
must write validation prompts, `zoo.n_val` > 0), then through `run_stage` every stage that makes a model (RAIN, its
ablations, controls and λ frontier, the paper preset, and task arithmetic on the Linear modules at each λ). Every
choice reads the VALIDATION prompts only: task arithmetic's λ (both scopes), RAIN's λ among merge.lam and the
frontier, each data-free baseline's setting of rain_tasks.zoo.report.BASELINE_GRID (TIES, DARE, SLERP, task
arithmetic on all parameters) and each neighbouring data-aware method's setting of NEIGHBOUR_GRID (AIM-TIES, SAGE,
ReasonAny, merged by the `neighbours` stage's code from the stages' statistics), by closed∧correct∧comply. Every figure shown is on the TEST prompts: the LRM thinking
and with its thinking forced closed, the ITM, each model through the evaluation code. Prints a per-seed table, the
mean and standard deviation over seeds, α's split-half reliability, and one JSON line. `--family-from` takes each
seed's built family (models/ and data/) from an earlier working directory instead of building it, after checking
that it was built with the same zoo parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

MODEL_STAGES = ("task_vectors", "features", "projection", "attention_stats", "alpha", "merge", "ablations",
                "paper_preset", "baselines", "aim_stats", "grad_scores", "neighbours")
#: params overrides swept per neighbouring method (index into rain_tasks.pipeline.stages.neighbour_names)
NEIGHBOUR_GRID: dict[str, tuple[int, tuple[dict, ...]]] = {
    "AIM-TIES": (0, tuple({"aim": {"omega": w}} for w in (0.2, 0.4, 0.6))),
    "SAGE": (1, tuple({"sage": {"beta": b}} for b in (10.0, 100.0, 1000.0))),
    "ReasonAny": (2, tuple({"reasonany": {"granularity": g, "p_domain": q, "p_reasoning": q}}
                           for g in ("tensor", "element") for q in (0.05, 0.2))),
}
SHOWN = ("close_rate", "correct_rate", "comply_rate", "close_correct_comply_rate", "l_think", "kl_close",
         "early_close_mass", "kl_own")
FAMILY = ("close_rate", "correct_rate", "comply_rate", "close_correct_comply_rate")


def seed_project(project: Path, work: Path, seed: int, zoo: dict, lambdas: list[float], frontier: list[float]) -> Path:
    """A working project: the tracked files' params with the zoo overrides, zoo.seed, RAIN's frontier, and task
    arithmetic on the Linear modules at each λ."""
    from rain_tasks.pipeline.stages import dvc_yaml

    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["zoo"] |= zoo | {"seed": seed}
    params["merge"]["frontier_lams"] = frontier
    params["baselines"]["runs"] = [{"name": f"ta_linear_{lam:g}", "method": "task_arithmetic", "lam": lam,
                                    "scope": "linear"} for lam in lambdas]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml(), sort_keys=False))
    return work


def take_family(source: Path, root: Path, zoo: dict) -> None:
    """Copy an earlier run's built family (models/, data/) into `root`, refusing one built with other zoo params."""
    import shutil

    built = yaml.safe_load((source / "params.yaml").read_text())["zoo"]
    if built != zoo:
        raise SystemExit(f"{source} was built with other zoo params: "
                         f"{ {k: (built.get(k), zoo.get(k)) for k in zoo if built.get(k) != zoo.get(k)} }")
    for part in ("models", "data"):
        shutil.copytree(source / part, root / part, dirs_exist_ok=True)


def neighbour_grid(p, root: Path, out: Path) -> tuple[dict[str, dict[str, Path]], dict[str, float]]:
    """Every NEIGHBOUR_GRID setting merged under `out` the way the `neighbours` stage merges it: {method: {setting:
    model dir}} and each model's merge time in seconds (preparation included)."""
    from rain_tasks.merge.engine import merge_checkpoint
    from rain_tasks.pipeline.stages import neighbour_merges, neighbour_names, with_overrides

    models: dict[str, dict[str, Path]] = {}
    seconds: dict[str, float] = {}
    for label, (index, settings) in NEIGHBOUR_GRID.items():
        for overrides in settings:
            q = with_overrides(p, overrides)
            name = neighbour_names(q)[index]
            setting = " ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                               for sec in overrides.values() for k, v in sec.items())
            key = f"{label} ({setting})"
            target = out / key.replace(" ", "_").replace("(", "").replace(")", "")
            (work := target.parent / f"{target.name}.work").mkdir(parents=True)
            t0 = time.perf_counter()
            method, method_params, plan = neighbour_merges(q)[name](q, root, work)
            merge_checkpoint(root / q.models.lrm, target, method, method_params, plan, q.merge.max_shard_size)
            seconds[key] = round(time.perf_counter() - t0, 3)
            models.setdefault(label, {})[key] = target
    return models, seconds


def _best(names: list[str], on_val: dict) -> str:
    """The name with the highest close∧correct∧comply on validation (ties: lower L_think)."""
    return max(names, key=lambda n: (on_val[n]["close_correct_comply_rate"], -on_val[n]["l_think"]))


def measure(project: Path, work: Path, seed: int, zoo: dict, lambdas: list[float], frontier: list[float],
            max_eval: int | None, family_from: Path | None = None) -> dict:
    from rain_tasks.evaluate.evaluation import evaluate_models
    from rain_tasks.params import OrthogonalityParams, load_params
    from rain_tasks.pipeline.runner import run_stage
    from rain_tasks.pipeline.stages import ABLATIONS, ABLATIONS_BY_NAME, BASELINES, MERGED, PAPER_MODEL, frontier_name
    from rain_tasks.zoo import build_zoo
    from rain_tasks.zoo.build import deterministic
    from rain_tasks.zoo.report import chosen_baselines, family_behaviour, thinking_matters
    from rain_tasks.stage1.orthogonality import module_geometry, orthogonality_table

    root = seed_project(project, work, seed, zoo, lambdas, frontier)
    p = load_params(root / "params.yaml")
    val, test = root / "data/eval/instruction_val.jsonl", root / "data/eval/instruction_eval.jsonl"
    times = {}
    t0 = time.perf_counter()
    if family_from:
        take_family(family_from / root.name, root, yaml.safe_load((root / "params.yaml").read_text())["zoo"])
    else:
        build_zoo(p.zoo, root / "models", root / "data")
    times["zoo"] = round(time.perf_counter() - t0, 1)
    if not val.is_file():
        raise SystemExit("the zoo wrote no validation prompts: set zoo.n_val > 0 (--set n_val=200)")
    e = p.evaluate
    with deterministic(p.zoo.threads):
        behaviour = family_behaviour(root / "models", test, e.max_new_tokens)
        grid = chosen_baselines(root / "models", val, test, max_new_tokens=e.max_new_tokens)
    times["zoo_baselines"] = round(time.perf_counter() - t0 - times["zoo"], 1)
    for name in MODEL_STAGES:
        t0 = time.perf_counter()
        run_stage(name, p, root)
        times[name] = round(time.perf_counter() - t0, 1)
    ta = {run.name: root / BASELINES / run.name for run in p.baselines.runs}
    rain = {f"RAIN λ {p.merge.lam:g}": root / MERGED} | {f"RAIN λ {lam:g}": root / ABLATIONS / frontier_name(lam)
                                                        for lam in frontier}
    traces = root / "data/eval/reasoning_eval.jsonl"
    args = (traces, e.max_new_tokens, e.batch_size, e.neighbour_radius, max_eval)
    t0 = time.perf_counter()
    neighbours, merge_s = neighbour_grid(p, root, root / "neighbour_grid")
    times["neighbour_grid"] = round(time.perf_counter() - t0, 1)
    grid_models = {key: path for settings in neighbours.values() for key, path in settings.items()}
    on_val = evaluate_models(root / p.models.lrm, ta | rain | grid_models, val, *args)
    chosen = {"ta_linear": _best(list(ta), on_val), "RAIN": _best(list(rain), on_val)}
    chosen |= {label: _best(list(settings), on_val) for label, settings in neighbours.items()}
    models = {"LRM": root / p.models.lrm, "RAIN (default λ)": root / MERGED, "RAIN (val λ)": rain[chosen["RAIN"]],
              "paper_preset": root / PAPER_MODEL} | {name: root / ABLATIONS / name for name in ABLATIONS_BY_NAME}
    models["ta_linear (val λ)"] = ta[chosen["ta_linear"]]
    models |= {f"{label} (val)": grid_models[chosen[label]] for label in neighbours}
    on_test = evaluate_models(root / p.models.lrm, models, test, *args)
    alpha = json.loads((root / "metrics/alpha.json").read_text())
    return {"seed": seed, "stage_s": times, "chosen": chosen, "alpha": alpha, "neighbour_merge_s": merge_s,
            "rows": {n: {k: on_test[n][k] for k in SHOWN} for n in models},
            "val": {n: {k: on_val[n][k] for k in SHOWN} for n in on_val},
            "family": {k: {m: v[m] for m in FAMILY} for k, v in behaviour.items()},
            "thinking_matters": thinking_matters(behaviour["lrm"], behaviour["lrm_forced_closed"]),
            "baselines": [{"method": b["method"], "setting": b["setting"], **{m: b["test"][m] for m in FAMILY}}
                          for b in grid],
            "geometry": module_geometry(orthogonality_table(*(root / "models" / m for m in ("base", "itm", "lrm")),
                                                            OrthogonalityParams()))}


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def seed_tables(r: dict) -> str:
    """One seed's tables: the family, the data-free baselines as chosen, RAIN and its controls."""
    lines = [f"### seed {r['seed']} (chosen on validation: {r['chosen']}; thinking matters: {r['thinking_matters']}; "
             f"α split-half Spearman {r['alpha']['split_half_spearman']:.3f}, significant heads "
             f"{r['alpha']['significant_share']:.2f})", "", "| model | setting | " + " | ".join(FAMILY) + " |",
             "|---|---|" + "---:|" * len(FAMILY)]
    lines += [f"| {k} | | " + " | ".join(f"{v[m]:.3f}" for m in FAMILY) + " |" for k, v in r["family"].items()]
    lines += [f"| {b['method']} | {b['setting']} | " + " | ".join(f"{b[m]:.3f}" for m in FAMILY) + " |"
              for b in r["baselines"]]
    lines += ["", "| model | " + " | ".join(SHOWN) + " |", "|---|" + "---:|" * len(SHOWN)]
    lines += [f"| {n} | " + " | ".join(f"{row[k]:.3g}" for k in SHOWN) + " |" for n, row in r["rows"].items()]
    lines += ["", "| module | max cos (top-8, Δ_R vs Δ_I) | median | random |", "|---|---:|---:|---:|"]
    lines += [f"| {g['module']} | {g['cos_max']:.3f} | {g['cos_median']:.3f} | {g['random_max']:.3f} |"
              for g in r["geometry"]]
    return "\n".join(lines) + "\n"


def spread_table(results: list[dict]) -> str:
    """Mean ± sd over seeds of every model's and baseline's test figures."""
    seeds = [r["seed"] for r in results]
    lines = [f"### mean ± sd over seeds {seeds} (test prompts)", "", "| model | " + " | ".join(SHOWN) + " |",
             "|---|" + "---:|" * len(SHOWN)]
    for name in results[0]["rows"]:
        lines.append(f"| {name} | " + " | ".join(_mean_sd([r["rows"][name][k] for r in results]) for k in SHOWN) + " |")
    lines += ["", "| family / baseline (best on val) | " + " | ".join(FAMILY) + " |", "|---|" + "---:|" * len(FAMILY)]
    for name in results[0]["family"]:
        lines.append(f"| {name} | " + " | ".join(_mean_sd([r["family"][name][k] for r in results]) for k in FAMILY) + " |")
    for method in dict.fromkeys(b["method"] for b in results[0]["baselines"]):
        rows = [b for r in results for b in r["baselines"] if b["method"] == method]
        lines.append(f"| {method} | " + " | ".join(_mean_sd([b[k] for b in rows]) for k in FAMILY) + " |")
    lines.append("\nα split-half Spearman: " + _mean_sd([r["alpha"]["split_half_spearman"] for r in results]))
    lines.append("\n" + merge_times(results))
    return "\n".join(lines)


#: the stages RAIN's merge consists of, and the statistic each neighbouring method needs before its merge
RAIN_STAGES = ("features", "projection", "attention_stats", "alpha", "merge")
STATISTIC = {"AIM-TIES": "aim_stats", "SAGE": "features", "ReasonAny": "grad_scores"}


def merge_times(results: list[dict]) -> str:
    """Wall seconds (mean over seeds) from the task vectors on: RAIN's stages, each neighbour at its chosen setting
    plus the statistic stage it reads (SAGE reads Stage 1's features)."""
    rain = _mean_sd([sum(r["stage_s"][s] for s in RAIN_STAGES) for r in results])
    parts = [f"RAIN {rain}"]
    for label, stage in STATISTIC.items():
        parts.append(f"{label} {_mean_sd([r['neighbour_merge_s'][r['chosen'][label]] + r['stage_s'][stage] for r in results])}")
    return "merge time, s (statistics included): " + "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="zoo parameter overrides")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0, 1.5, 2.0],
                   help="task arithmetic's λ on the Linear modules")
    p.add_argument("--frontier", type=float, nargs="+", default=[1.0, 3.0, 4.0], help="RAIN's other λ")
    p.add_argument("--max-eval", type=int)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--family-from", type=Path, help="an earlier working directory whose seed*/ families to reuse")
    args = p.parse_args()

    from rain_tasks.model.runtime import configure

    configure()
    zoo = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rain-seeds-"))
    results = []
    for s in args.seeds:
        results.append(measure(args.project.resolve(), work / f"seed{s}", s, zoo, args.lambdas, args.frontier,
                               args.max_eval, args.family_from))
        print(seed_tables(results[-1]), flush=True)
        (work / "results.json").write_text(json.dumps(results))
    print(spread_table(results))
    print(json.dumps({"workdir": str(work), "zoo": zoo, "results": results}))


if __name__ == "__main__":
    main()
