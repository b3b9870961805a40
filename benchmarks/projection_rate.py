"""The projection's throughput constant: `rain plan`'s projection work over its measured seconds, at widths where work dominates.

At plan_check.py's hidden 64 the projection's work (65-wide Grams) is well under a GFLOP, so its time there is fixed
costs (reading the statistics and Δ, the report), not work; its constant is fitted here instead. Per point (hidden, FFN, heads, KV heads, layers, samples): a random
family and calibration sets (_common.build_project, bf16 checkpoints), task_vectors and features once, then the
projection stage --repeats times, each in its own process (growth.py --child, its layer files removed first), and
the median taken. The constant is Σ planned work / Σ median seconds over the points; --write stores it as
`projection_<precision>_flops_per_s` (with `projection_<precision>_source`; the precision is projection.precision,
float64 unless --set says otherwise) of the plan's throughput entry, which plan_check.py --calibrate keeps. Prints a
table and one JSON line.

    nice python benchmarks/projection_rate.py WORKDIR [--point 1024 4096 16 4 2 25 ...] [--repeats 3]
        [--set projection.precision=float32] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
GROWTH = ROOT / "benchmarks" / "growth.py"

from _common import build_project, run_child  # noqa: E402
#: hidden, FFN, heads, KV heads, layers, reasoning samples: two widths where the work dominates, and the 7B widths
DEFAULT_POINTS = [[1024, 4096, 16, 4, 2, 25], [1024, 4096, 16, 4, 2, 50], [2048, 8192, 16, 4, 1, 25], [3584, 18944, 28, 4, 1, 25]]


def stage_child(stage: str, work: Path) -> dict:
    """One stage in its own process (growth.py --child): its seconds and peak RSS (GiB)."""
    return run_child(str(GROWTH), ["--child", stage, "--workdir", str(work)], f"{stage} in {work}")


def measure_point(work: Path, point: list[int], repeats: int, overrides: list[str]) -> dict:
    """Build one point, run its inputs once and the projection `repeats` times; the plan beside the median."""
    from rain_tasks.params import load_params
    from rain_tasks.pipeline.plan import stage_plans
    from rain_tasks.pipeline.stages import PROJ

    hidden, ffn, heads, kv_heads, layers, samples = point
    build_project(work, argparse.Namespace(hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, dtype="bfloat16",
                                   layers=layers, samples=samples, set=overrides))
    for stage in ("task_vectors", "features"):
        stage_child(stage, work)
    runs = []
    for _ in range(repeats):
        shutil.rmtree(work / PROJ, ignore_errors=True)  # a current layer file would be skipped
        runs.append({**stage_child("projection", work), "load_average": os.getloadavg()[0]})
    plan = {p.stage: p for p in stage_plans(load_params(work / "params.yaml"), work)[1]}["projection"]
    return {"point": point, "runs": runs, "seconds": statistics.median(r["seconds"] for r in runs),
            "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in runs),
            "precision": load_params(work / "params.yaml").projection.precision, "plan_flops": plan.flops, "plan_peak_gib": plan.peak_bytes / 2**30}


def write_constant(rate: float, precision: str, points: list[dict], overrides: list[str]) -> None:
    """Store the fitted rate for this working precision, and how it was measured, in the plan's cpu/float32 throughput entry."""
    from rain_tasks.pipeline.plan import THROUGHPUT, projection_key

    table = json.loads(THROUGHPUT.read_text()) if THROUGHPUT.is_file() else {}
    if "cpu/float32" not in table:
        sys.exit(f"{THROUGHPUT} has no cpu/float32 entry to add the projection's constant to: run plan_check.py --calibrate first")
    widths = "; ".join("hidden {}, FFN {}, {}/{} heads, L {}, {} samples".format(*p["point"]) + f" (median of {len(p['runs'])})"
                       for p in points)
    table["cpu/float32"] |= {
        projection_key(precision): rate,
        f"projection_{precision}_source": (f"benchmarks/projection_rate.py on {platform.processor() or platform.machine()}, {os.cpu_count()} "
                              f"cores, {time.strftime('%Y-%m-%d')}, {' '.join(overrides) or 'default params'}: {widths}"),
    }
    THROUGHPUT.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--point", type=int, nargs=6, action="append", metavar=("HIDDEN", "FFN", "HEADS", "KV", "LAYERS", "SAMPLES"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=[], help="params overrides, e.g. projection.precision=float32")
    ap.add_argument("--write", action="store_true", help="store the fitted constant in rain_tasks/pipeline/throughput.json")
    args = ap.parse_args()
    points = [measure_point(args.work / "_".join(map(str, p)), p, args.repeats, args.set)
              for p in args.point or DEFAULT_POINTS]
    rate = sum(p["plan_flops"] for p in points) / sum(p["seconds"] for p in points)
    print("| hidden | FFN | heads | KV | layers | samples | work (TFLOP) | measured s (median) | plan s at the fitted rate "
          "| GFLOP/s | peak GiB | plan GiB | load (max) |")
    print("|" + "---:|" * 13)
    for p in points:
        print("| " + " | ".join(map(str, p["point"])) + f" | {p['plan_flops'] / 1e12:.3f} | {p['seconds']:.1f} | "
              f"{p['plan_flops'] / rate:.1f} | "
              f"{p['plan_flops'] / p['seconds'] / 1e9:.1f} | {p['peak_rss_gib']:.2f} | {p['plan_peak_gib']:.2f} | "
              f"{max(r['load_average'] for r in p['runs']):.1f} |")
    precision = points[0]["precision"]
    print(f"fitted projection_{precision}_flops_per_s: {rate:.4g}")
    if args.write:
        write_constant(rate, precision, points, args.set)
    print(json.dumps({"points": points, f"projection_{precision}_flops_per_s": rate, "set": args.set}))


if __name__ == "__main__":
    main()
