"""How each stage's time and peak RSS grow with layers and calibration samples, extrapolated, against `rain plan`.

Usage: python benchmarks/growth.py [--workdir DIR] [--hidden 3584 --ffn 18944 --heads 28 --kv-heads 4]
       [--dtype bfloat16] [--layers 1 2 4] [--samples 25 50 100] [--set projection.precision=float32 ...]
       [--to-layers 28 --to-reasoning 150 --to-instruction 365]
Grid: every layer count at the first sample count, every sample count at one layer (a random family, rain_dev/tiny.py,
per point). Each stage runs through `run_stage` in its own process (its peak RSS is that process's VmHWM; its time
excludes the imports). Per stage t = a + L·(b + c·S) is fitted to the grid by least squares (a: fixed costs; S: the
reasoning samples for features and projection, the instruction samples for attention_stats, none for the rest; the
projection's n × n eigenproblems grow faster than S, but five points on a shared machine do not pin a S² term:
it extrapolated to negative times), and peak RSS = r0 + r1·L + r2·S; both are evaluated at --to-layers and the
paper's 150 + 365 samples. `--reuse FILE` refits the points of an earlier run's JSON line. `rain plan`'s
estimate (rain_tasks.pipeline.plan) is printed beside each measured point. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import build_project, model_parser, run_child, status_gib, workdir  # noqa: E402

STAGES = ("task_vectors", "features", "projection", "attention_stats", "alpha", "merge")
#: which sample count drives each stage's cost (None: neither)
SAMPLES_OF = {"features": "reasoning", "projection": "reasoning", "attention_stats": "instruction"}


def child(stage: str, work: Path) -> dict:
    """Run one stage in this process; its seconds and peak RSS (GiB)."""
    from rain_tasks.model.runtime import configure
    from rain_tasks.params import load_params
    from rain_tasks.pipeline.runner import run_stage

    configure()
    params = load_params(work / "params.yaml")
    t0 = time.perf_counter()
    run_stage(stage, params, work)
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": status_gib("VmHWM")}


def plan_estimates(work: Path) -> dict[str, dict]:
    """`rain plan`'s time and peak per stage for the project in `work`."""
    from rain_tasks.params import load_params
    from rain_tasks.pipeline.plan import stage_plans

    _, plans = stage_plans(load_params(work / "params.yaml"), work)
    return {p.stage: {"seconds": p.seconds, "peak_gib": p.peak_bytes / 2**30} for p in plans}


def measure(work: Path, args: argparse.Namespace, layers: int, samples: int) -> dict:
    """Build one grid point and run every stage in its own process."""
    build_project(work, argparse.Namespace(**{**vars(args), "layers": layers, "samples": samples}))
    stages = {stage: run_child(__file__, ["--child", stage, "--workdir", str(work)],
                               f"{stage} at layers {layers}, samples {samples}") for stage in STAGES}
    return {"layers": layers, "samples": samples, "stages": stages, "plan": plan_estimates(work),
            "load_average": os.getloadavg()[0]}


def time_terms(stage: str, layers: int, samples: int) -> list[float]:
    """The regressors of a stage's time model: 1, L and L·S (sample-driven stages)."""
    terms = [1.0, float(layers)]
    if stage in SAMPLES_OF:
        terms.append(float(layers * samples))
    return terms


def rss_terms(stage: str, layers: int, samples: int) -> list[float]:
    """The regressors of a stage's peak RSS model: 1, L, S (sample-driven stages)."""
    return [1.0, float(layers)] + ([float(samples)] if stage in SAMPLES_OF else [])


def fit(points: list[dict], stage: str) -> dict:
    """Least-squares coefficients of the time and RSS models of one stage over the grid points."""
    import numpy as np

    def solve(terms, key: str) -> list[float]:
        x = np.array([terms(stage, p["layers"], p["samples"]) for p in points])
        return np.linalg.lstsq(x, np.array([p["stages"][stage][key] for p in points]), rcond=None)[0].tolist()

    return {"time": solve(time_terms, "seconds"), "rss": solve(rss_terms, "peak_rss_gib")}


def extrapolate(stage: str, model: dict, layers: int, samples: int) -> tuple[float, float]:
    """(seconds, peak RSS GiB) of a fitted stage at `layers` and `samples`."""
    dot = lambda coef, terms: sum(c * t for c, t in zip(coef, terms))  # noqa: E731
    return dot(model["time"], time_terms(stage, layers, samples)), dot(model["rss"], rss_terms(stage, layers, samples))


def main() -> None:
    p = model_parser(__doc__, layers=[1, 2, 4], samples=[25, 50, 100], overrides=True)
    p.add_argument("--to-layers", type=int, default=28)
    p.add_argument("--to-reasoning", type=int, default=150)
    p.add_argument("--to-instruction", type=int, default=365)
    p.add_argument("--reuse", type=Path, help="a file whose last line is an earlier run's JSON: refit its points")
    p.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return

    if args.reuse:
        points = json.loads(args.reuse.read_text().strip().splitlines()[-1])["points"]
    else:
        work = workdir(args.workdir, "rain-growth-")
        grid = [(n, args.samples[0]) for n in args.layers] + [(args.layers[0], s) for s in args.samples[1:]]
        points = [measure(work / f"L{n}_S{s}", args, n, s) for n, s in grid]
    print("| layers | samples | " + " | ".join(f"{s} s (plan) / GiB (plan)" for s in STAGES) + " | load |")
    for pt in points:
        cells = []
        for stage in STAGES:
            m, est = pt["stages"][stage], pt["plan"].get(stage, {})
            plan_s = f"{est['seconds']:.1f}" if est.get("seconds") is not None else "–"
            plan_g = f"{est['peak_gib']:.2f}" if est else "–"
            cells.append(f"{m['seconds']:.1f} ({plan_s}) / {m['peak_rss_gib']:.2f} ({plan_g})")
        print(f"| {pt['layers']} | {pt['samples']} | " + " | ".join(cells) + f" | {pt['load_average']:.1f} |")
    models = {stage: fit(points, stage) for stage in STAGES}
    target = {}
    for stage, model in models.items():
        samples = args.to_instruction if SAMPLES_OF.get(stage) == "instruction" else args.to_reasoning
        seconds, rss = extrapolate(stage, model, args.to_layers, samples)
        target[stage] = {"seconds": seconds, "peak_rss_gib": rss, "time_coef": model["time"], "rss_coef": model["rss"]}
        print(f"{stage}: t = " + " + ".join(f"{c:.3g}·{t}" for c, t in zip(model["time"], ("1", "L", "L·S")))
              + f"; at {args.to_layers} layers, {samples if stage in SAMPLES_OF else '-'} samples: "
              f"{seconds:.0f} s, peak {rss:.1f} GiB")
    print(json.dumps({"points": points, "extrapolated": target, "to": [args.to_layers, args.to_reasoning, args.to_instruction],
                      "model": {k: getattr(args, k) for k in ("hidden", "ffn", "heads", "kv_heads", "dtype")}, "set": args.set}))


if __name__ == "__main__":
    main()
