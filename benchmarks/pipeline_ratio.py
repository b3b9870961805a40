"""Full RAIN pipeline time against task arithmetic on the same models, measured in one run, with the per-stage split.

Usage: python benchmarks/pipeline_ratio.py [--workdir DIR] [--hidden 128 --ffn 256 --layers 4 --heads 4 --kv-heads 2]
       [--dtype float32|bfloat16] [--samples 50] [--phases] [--set projection.precision=float32 ...]
Both sides run through the same stage machinery (`run_stage`: up-front checks, lineage, atomic
writes) on one random base/ITM/LRM family (rain_dev/tiny.py): RAIN = task_vectors, features,
projection, attention_stats, alpha, merge; task arithmetic = task_vectors and the baselines
stage with one task_arithmetic run. The up-front check each stage does (validation.preflight)
is also timed alone. Prints a table and one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import build_project, machine, model_parser, workdir  # noqa: E402

RAIN_STAGES = ("task_vectors", "features", "projection", "attention_stats", "alpha", "merge")
TA_STAGES = ("task_vectors", "baselines")


def timed_stages(work: Path, stages: tuple[str, ...], phases: dict[str, dict] | None = None) -> dict[str, float]:
    """Wall seconds of each stage, run in order in this process; with `phases`, also each stage's phase split."""
    from phases import PhaseClock
    from rain_tasks.params import load_params
    from rain_tasks.pipeline.runner import run_stage

    params, seconds = load_params(work / "params.yaml"), {}
    for name in stages:
        clock = PhaseClock()
        with clock.running() if phases is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            run_stage(name, params, work)
            seconds[name] = time.perf_counter() - t0
        if phases is not None:
            phases[name] = clock.split(seconds[name])
    return seconds


def preflight_seconds(work: Path) -> float:
    """One up-front check (what every stage pays before its work), on the finished project."""
    from rain_tasks.params import load_params
    from rain_tasks.pipeline.stages import get_stage
    from rain_tasks.pipeline.validation import preflight

    t0 = time.perf_counter()
    preflight(get_stage("task_vectors"), load_params(work / "params.yaml"), work)
    return time.perf_counter() - t0


def main() -> None:
    p = model_parser(__doc__, widths={"hidden": 128, "ffn": 256, "heads": 4, "kv_heads": 2}, layers=4, dtype="float32",
                     samples=50, overrides=True)
    p.add_argument("--phases", action="store_true",
                   help="also split each RAIN stage into phases (wraps library functions: a little overhead)")
    args = p.parse_args()

    from rain_tasks.model.runtime import configure

    configure()
    work = workdir(args.workdir, "rain-bench-")
    rain_dir, ta_dir = work / "rain", work / "ta"
    for d in (rain_dir, ta_dir):
        build_project(d, args)
    preflight_seconds(ta_dir)  # warm-up: imports and first-call costs are paid before either side is timed
    ta = timed_stages(ta_dir, TA_STAGES)
    split: dict[str, dict] | None = {} if args.phases else None
    rain = timed_stages(rain_dir, RAIN_STAGES, split)
    check = preflight_seconds(rain_dir)
    result = {
        "model": {k: getattr(args, k) for k in ("hidden", "ffn", "layers", "heads", "kv_heads", "dtype")},
        "samples": args.samples, "set": args.set, "rain_s": rain, "ta_s": ta, "preflight_s": check,
        "ratio": sum(rain.values()) / sum(ta.values()), "phases_s": split,
        "machine": machine(f"RAIN_THREADS={os.environ.get('RAIN_THREADS', '2')}",
                           f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"),
    }
    for side, stages in (("RAIN", rain), ("task arithmetic", ta)):
        print(f"{side}: {sum(stages.values()):.2f} s = " + " + ".join(f"{n} {s:.2f}" for n, s in stages.items()))
    for stage, phase_s in (split or {}).items():
        slowest = max(phase_s, key=phase_s.get)
        print(f"  {stage}: " + ", ".join(f"{p} {s:.2f}" for p, s in phase_s.items()) + f"  [slowest: {slowest}]")
    print(f"up-front check per stage: {check:.2f} s; RAIN / task arithmetic = {result['ratio']:.2f}x (paper: 22.5x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
