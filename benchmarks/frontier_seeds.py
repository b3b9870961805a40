"""RAIN's and task arithmetic's λ frontiers over zoo seeds, on the test prompts (issue 14), from rain_seeds.py's models.

Usage: python benchmarks/frontier_seeds.py --workdir DIR [--out DIR] [--max-eval N]
DIR is a rain_seeds.py working directory (one `seed*` project per seed, its models already made): per seed, RAIN at
merge.lam and each merge.frontier_lams λ (same Δ⊥ and α) and task arithmetic on the Linear modules at each λ, all
through the evaluation code on the TEST prompts. Prints the mean ± sd over seeds per (method, λ) and writes the
frontier table (means and standard deviations) and its figure, compliance against L_think and against
close∧correct, to --out (default DIR).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def seed_frontier(root: Path, max_eval: int | None) -> pd.DataFrame:
    """One seed's frontier: (method, λ) rows with FRONTIER_METRICS on the test prompts."""
    from rain_tasks.evaluate.evaluation import evaluate_models, frontier_table
    from rain_tasks.params import load_params
    from rain_tasks.pipeline.stages import ABLATIONS, BASELINES, MERGED, frontier_name

    p = load_params(root / "params.yaml")
    models = {"RAIN λ {:g}".format(p.merge.lam): (root / MERGED, "RAIN", p.merge.lam)}
    models |= {f"RAIN λ {lam:g}": (root / ABLATIONS / frontier_name(lam), "RAIN", lam) for lam in p.merge.frontier_lams}
    models |= {run.name: (root / BASELINES / run.name, "task arithmetic (linear)", run.lam) for run in p.baselines.runs
               if run.method == "task_arithmetic" and run.scope == "linear"}
    e = p.evaluate
    results = evaluate_models(root / p.models.lrm, {n: m[0] for n, m in models.items()},
                              root / "data/eval/instruction_eval.jsonl", root / "data/eval/reasoning_eval.jsonl",
                              e.max_new_tokens, e.batch_size, e.neighbour_radius, max_eval)
    table = frontier_table(results, {n: (m[1], m[2]) for n, m in models.items()})
    return table.assign(ccc=[results[n]["close_correct_comply_rate"] for n in table["model"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--out", type=Path)
    p.add_argument("--max-eval", type=int)
    args = p.parse_args()
    from rain_tasks.evaluate.evaluation import write_frontier
    from rain_tasks.model.runtime import configure

    configure()
    seeds = sorted(d for d in args.workdir.glob("seed*") if (d / "params.yaml").is_file())
    tables = pd.concat([seed_frontier(d, args.max_eval).assign(seed=d.name) for d in seeds])
    metrics = [c for c in tables.columns if c not in ("model", "method", "lam", "seed")]
    grouped = tables.groupby(["method", "lam"], sort=True)[metrics]
    mean, sd = grouped.mean().reset_index(), grouped.agg(lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    summary = mean.merge(sd.add_suffix("_sd").reset_index(), on=["method", "lam"])
    out = args.out or args.workdir
    write_frontier(summary, out / "frontier_seeds.csv", out / "frontier_seeds.png")
    print(f"### frontier over {[d.name for d in seeds]} (test prompts, mean ± sd)\n")
    print("| method | λ | " + " | ".join(metrics) + " |\n|---|---:|" + "---:|" * len(metrics))
    for _, row in summary.iterrows():
        print(f"| {row['method']} | {row['lam']:g} | " + " | ".join(f"{row[m]:.3g} ± {row[m + '_sd']:.2g}" for m in metrics) + " |")
    print(f"\nwritten: {out / 'frontier_seeds.csv'}, {out / 'frontier_seeds.png'}")


if __name__ == "__main__":
    main()
