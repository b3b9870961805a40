"""RAIN against its controls and task arithmetic over zoo seeds: what issue 14 asks the report to show, with spread.

Usage: python benchmarks/rain_seeds.py [--seeds 0 1 2] [--project .] [--lambdas 0.5 1 1.5 2] [--max-eval N] [--workdir DIR]
Per seed: the zoo built with that seed (every other zoo and stage parameter from the project's params.yaml; the zoo
must write validation prompts, `zoo.n_val` > 0), then through `run_stage` every stage that makes a model (RAIN,
its ablations, controls and λ frontier, the paper preset, and task arithmetic on both scopes at each λ), evaluated
by the evaluation code. Task arithmetic's λ is chosen per seed and scope on the VALIDATION prompts (by
closed∧correct∧comply); every figure shown is on the TEST prompts. Prints a per-seed table, the mean and
standard deviation over seeds, α's split-half reliability, and one JSON line.
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

MODEL_STAGES = ("zoo", "task_vectors", "features", "projection", "attention_stats", "alpha", "merge", "ablations",
                "paper_preset", "baselines")
SHOWN = ("close_rate", "correct_rate", "comply_rate", "close_correct_comply_rate", "l_think", "kl_close",
         "early_close_mass", "kl_own")
ROWS = ("LRM", "RAIN", "paper_preset", "rain_uniform_alpha", "rain_permuted_alpha", "rain_stage1_only", "ta_linear (val λ)",
        "ta_all (val λ)")


def seed_project(project: Path, work: Path, seed: int, lambdas: list[float]) -> Path:
    """A working project: the tracked files' params with zoo.seed and task arithmetic at each λ on both scopes."""
    from rain_tasks.pipeline.stages import dvc_yaml

    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["zoo"]["seed"] = seed
    params["baselines"]["runs"] = [{"name": f"ta_{scope}_{lam:g}", "method": "task_arithmetic", "lam": lam, "scope": scope}
                                   for scope in ("linear", "all") for lam in lambdas]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml(), sort_keys=False))
    return work


def measure(project: Path, work: Path, seed: int, lambdas: list[float], max_eval: int | None) -> dict:
    from rain_tasks.evaluate.evaluation import evaluate_models
    from rain_tasks.params import load_params
    from rain_tasks.pipeline.stages import ABLATIONS, ABLATIONS_BY_NAME, BASELINES, MERGED, PAPER_MODEL
    from rain_tasks.pipeline.runner import run_stage

    root = seed_project(project, work, seed, lambdas)
    p = load_params(root / "params.yaml")
    times = {}
    for name in MODEL_STAGES:
        t0 = time.perf_counter()
        run_stage(name, p, root)
        times[name] = round(time.perf_counter() - t0, 1)
    val, test = root / "data/eval/instruction_val.jsonl", root / "data/eval/instruction_eval.jsonl"
    if not val.is_file():
        raise SystemExit("the zoo wrote no validation prompts: set zoo.n_val > 0 in params.yaml")
    ta = {run.name: root / BASELINES / run.name for run in p.baselines.runs}
    models = {"LRM": root / p.models.lrm, "RAIN": root / MERGED, "paper_preset": root / PAPER_MODEL}
    models |= {name: root / ABLATIONS / name for name in ABLATIONS_BY_NAME}
    e, traces = p.evaluate, root / "data/eval/reasoning_eval.jsonl"
    on_val = evaluate_models(root / p.models.lrm, ta, val, traces, e.max_new_tokens, e.batch_size, e.neighbour_radius, max_eval)
    chosen = {scope: max((n for n in ta if n.startswith(f"ta_{scope}_")),
                         key=lambda n: (on_val[n]["close_correct_comply_rate"], -on_val[n]["l_think"])) for scope in ("linear", "all")}
    on_test = evaluate_models(root / p.models.lrm, models | {chosen[s]: ta[chosen[s]] for s in chosen}, test, traces,
                              e.max_new_tokens, e.batch_size, e.neighbour_radius, max_eval)
    rows = {name: on_test[name] for name in models} | {f"ta_{s} (val λ)": on_test[chosen[s]] for s in chosen}
    alpha = json.loads((root / "metrics/alpha.json").read_text())
    return {"seed": seed, "stage_s": times, "chosen": chosen, "rows": {n: {k: rows[n][k] for k in SHOWN} for n in rows},
            "alpha": alpha}


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    p.add_argument("--max-eval", type=int)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()

    from rain_tasks.model.runtime import configure

    configure()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rain-seeds-"))
    results = [measure(args.project.resolve(), work / f"seed{s}", s, args.lambdas, args.max_eval) for s in args.seeds]
    for r in results:
        print(f"### seed {r['seed']} (task arithmetic λ on validation: {r['chosen']}; α split-half Spearman "
              f"{r['alpha']['split_half_spearman']:.3f}, significant heads {r['alpha']['significant_share']:.2f})")
        print("| model | " + " | ".join(SHOWN) + " |\n|---|" + "---:|" * len(SHOWN))
        for name in ROWS:
            print(f"| {name} | " + " | ".join(f"{r['rows'][name][k]:.3g}" for k in SHOWN) + " |")
        print()
    print(f"### mean ± sd over seeds {args.seeds} (test prompts)")
    print("| model | " + " | ".join(SHOWN) + " |\n|---|" + "---:|" * len(SHOWN))
    for name in ROWS:
        print(f"| {name} | " + " | ".join(_mean_sd([r["rows"][name][k] for r in results]) for k in SHOWN) + " |")
    print("α split-half Spearman: " + _mean_sd([r["alpha"]["split_half_spearman"] for r in results]))
    print(json.dumps({"workdir": str(work), "results": results}))


if __name__ == "__main__":
    main()
