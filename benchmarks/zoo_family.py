"""Does the tiny family tell merges apart? Build it on several seeds and measure it by the evaluation code.

Usage: python benchmarks/zoo_family.py [--seeds 0 1 2] [--project .] [--set KEY=JSON ...] [--workdir DIR]
Zoo parameters come from the project's params.yaml, with `--set` overrides (e.g. --set num_steps=3). Per seed: build
time; on the held-out test prompts the LRM thinking, the LRM with its thinking block forced closed at once, and the
ITM; each data-free baseline's best setting of rain_tasks.zoo.report.BASELINE_GRID chosen on the validation prompts
and scored on the test prompts; and the largest principal cosine between the top-8 subspaces of Δ_R and Δ_I per
module beside the same measure for random subspaces of that size. Prints markdown tables and one JSON line.
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

def geometry(models: Path) -> list[dict]:
    """Per module: largest principal cosine of the top-8 subspaces of Δ_R and Δ_I, and chance."""
    from rain_tasks.params import OrthogonalityParams
    from rain_tasks.stage1.orthogonality import module_geometry, orthogonality_table

    return module_geometry(orthogonality_table(models / "base", models / "itm", models / "lrm", OrthogonalityParams()))


def measure(seed: int, zoo: dict, work: Path, max_new_tokens: int) -> dict:
    from rain_tasks.zoo import ZooParams, build_zoo
    from rain_tasks.zoo.build import deterministic
    from rain_tasks.zoo.report import VALIDATION_FILE, chosen_baselines, family_behaviour, thinking_matters

    params = ZooParams(**{**zoo, "seed": seed})
    t0 = time.perf_counter()
    summary = build_zoo(params, work / "models", work / "data")
    build_s = time.perf_counter() - t0
    test, val = work / "data/eval/instruction_eval.jsonl", work / "data/eval" / VALIDATION_FILE
    with deterministic(params.threads):
        behaviour = family_behaviour(work / "models", test, max_new_tokens)
        baselines = chosen_baselines(work / "models", val, test, max_new_tokens=max_new_tokens)
    return {"seed": seed, "build_s": build_s, "summary": summary, **behaviour, "baselines": baselines,
            "thinking_matters": thinking_matters(behaviour["lrm"], behaviour["lrm_forced_closed"]),
            "geometry": geometry(work / "models")}


def _cells(m: dict) -> str:
    return (f"{m['close_rate']:.3f} | {m['correct_rate']:.3f} | {m['comply_rate']:.3f} | "
            f"{m['comply_instruction_rate']:.3f} | {m['close_correct_comply_rate']:.3f}")


def report(r: dict) -> str:
    head = "| model | setting (chosen on validation) | closed | correct | complies (prompt) | complies (instr.) | all three |"
    lines = [f"### seed {r['seed']}: built in {r['build_s']:.0f} s; thinking matters: {r['thinking_matters']}", "",
             head, "|---|---|---:|---:|---:|---:|---:|",
             f"| LRM thinking | | {_cells(r['lrm'])} |",
             f"| LRM forced closed | | {_cells(r['lrm_forced_closed'])} |",
             f"| ITM | | {_cells(r['itm'])} |",
             *(f"| {b['method']} | {b['setting']} | {_cells(b['test'])} |" for b in r["baselines"]), "",
             "| module | max cos (top-8, Δ_R vs Δ_I) | median over layers | random subspaces |", "|---|---:|---:|---:|",
             *(f"| {g['module']} | {g['cos_max']:.3f} | {g['cos_median']:.3f} | {g['random_max']:.3f} |"
               for g in r["geometry"]), ""]
    return "\n".join(lines)


def spread(results: list[dict]) -> str:
    """Mean ± sd over seeds of the main figures."""
    def ms(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"
    rows = [("LRM thinking", [r["lrm"] for r in results]), ("LRM forced closed", [r["lrm_forced_closed"] for r in results]),
            ("ITM", [r["itm"] for r in results])]
    for method in dict.fromkeys(b["method"] for r in results for b in r["baselines"]):
        rows.append((f"{method} (best on val)", [b["test"] for r in results for b in r["baselines"] if b["method"] == method]))
    keys = ("close_rate", "correct_rate", "comply_rate", "comply_instruction_rate", "close_correct_comply_rate")
    return "\n".join([f"### {len(results)} seeds, mean ± sd", "",
                      "| model | closed | correct | complies (prompt) | complies (instr.) | all three |",
                      "|---|---:|---:|---:|---:|---:|",
                      *(f"| {name} | " + " | ".join(ms([m[k] for m in ms_]) for k in keys) + " |" for name, ms_ in rows)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="zoo parameter overrides")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    from rain_tasks.model.runtime import configure

    configure()
    zoo = yaml.safe_load((args.project / "params.yaml").read_text())["zoo"]
    zoo |= {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rain-zoo-family-"))
    results = []
    for seed in args.seeds:
        results.append(measure(seed, zoo, work / f"seed_{seed}", args.max_new_tokens))
        print(report(results[-1]), flush=True)
    print(spread(results), flush=True)
    print(json.dumps({"workdir": str(work), "zoo": zoo, "results": results}, default=str))


if __name__ == "__main__":
    main()
