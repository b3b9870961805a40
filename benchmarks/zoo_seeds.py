"""Build the zoo on several seeds and measure the family properties issue 8 asks of each (by the evaluation code).

Usage: python benchmarks/zoo_seeds.py [--seeds 0 1 2] [--project .] [--workdir DIR]
Every other zoo parameter comes from the project's params.yaml. Per seed: build time, ‖Δ‖s and their cosine,
LRM and ITM behaviour (64 new tokens, as tests/test_family.py), task arithmetic's λ sweep (the zoo report's λs
and budget) and whether the four properties hold (rain_dev.checks.family_properties).
Prints markdown tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def measure(seed: int, zoo: dict, work: Path) -> dict:
    from rain_tasks.model.generation import load_model
    from rain_tasks.evaluate.behaviour import behaviour_metrics
    from rain_tasks.io.schemas import load_records
    from rain_tasks.zoo import ZooParams, build_zoo
    from rain_tasks.zoo.probe import task_arithmetic_sweep
    from rain_tasks.zoo.report import REPORT_LAMBDAS, task_vector_geometry
    from rain_dev.checks import family_properties

    t0 = time.perf_counter()
    build_zoo(ZooParams(**{**zoo, "seed": seed}), work / "models", work / "data")
    build_s = time.perf_counter() - t0
    eval_path = work / "data/eval/instruction_eval.jsonl"
    rows = load_records(eval_path, "instruction_eval")
    behaviour = {name: behaviour_metrics(*load_model(work / "models" / name), rows, max_new_tokens=64)
                 for name in ("lrm", "itm")}
    sweep = task_arithmetic_sweep(work / "models", eval_path, list(REPORT_LAMBDAS))
    return {"seed": seed, "build_s": build_s, **task_vector_geometry(work / "models"), **behaviour, "sweep": sweep,
            "properties": family_properties(behaviour["lrm"], behaviour["itm"], sweep)}


def report(r: dict) -> str:
    lrm, itm = r["lrm"], r["itm"]
    lines = [
        f"### seed {r['seed']}: built in {r['build_s']:.0f} s; ‖Δ_ITM‖ {r['norm_delta_itm']:.2f}, ‖Δ_LRM‖ "
        f"{r['norm_delta_lrm']:.2f} (‖θ_base‖ {r['norm_base']:.1f}), cos {r['cosine_delta_itm_lrm']:.3f}; "
        f"properties {r['properties']}",
        f"LRM: close {lrm['close_rate']:.3f}, correct {lrm['correct_rate']:.3f}, complies {lrm['comply_rate']:.3f}; "
        f"ITM: complies {itm['comply_rate']:.3f}, thinks {itm['think_rate']:.3f}",
        "",
        "| λ | `</think>` closed | correct | complies | Δ comply |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {s['lambda']:g} | {s['close_rate']:.3f} | {s['correct_rate']:.3f} | {s['comply_rate']:.3f} | "
          f"{s['comply_rate'] - r['sweep'][0]['comply_rate']:+.3f} |" for s in r["sweep"]),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    from rain_tasks.model.runtime import configure

    configure()
    zoo = yaml.safe_load((args.project / "params.yaml").read_text())["zoo"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rain-zoo-seeds-"))
    results = []
    for seed in args.seeds:
        results.append(measure(seed, zoo, work / f"seed_{seed}"))
        print(report(results[-1]), flush=True)
    print(json.dumps({"workdir": str(work), "results": results}))


if __name__ == "__main__":
    main()
