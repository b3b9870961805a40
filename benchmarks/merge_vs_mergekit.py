"""Merge wall time and peak RSS of our streaming task arithmetic against mergekit's, on the same three checkpoints.

Usage: python benchmarks/merge_vs_mergekit.py [--workdir DIR] [--hidden 3584 --ffn 18944 --layers 2
       --heads 28 --kv-heads 4] [--dtype bfloat16] [--shard-size 1GB] [--repeats 3]
Both sides compute θ_R + 1·(θ_I − θ_B) over every tensor and write sharded safetensors of the LRM's dtype;
each runs in its own process (peak RSS is that process's VmHWM; the working set is the peak minus
the RSS once both libraries are imported, the same for every side). Ours is two processes as in the pipeline:
the task-vector extraction (Δ = θ_I − θ_B, fp32 per layer), then the merge; mergekit does both in one go, and so
does `ours_direct` (Δ from ITM and base per tensor, rain_tasks.io.checkpoint.Difference). With --repeats N the
sides run in turn N times and each figure is the median. mergekit (a test dependency: `pip install --no-deps -r requirements-test.txt`)
runs on CPU with lazy unpickling.
Goal (issue 7): time ≤ mergekit's; peak RSS ≤ 2 × the largest tensor + one output shard.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import build_family, machine, model_parser, run_child, status_gib, workdir  # noqa: E402

#: the processes measured, in the order they run (the extraction must precede `ours`)
SIDES = ("mergekit", "task_vectors", "ours", "ours_direct")


def child(side: str, work: Path, shard_size: str) -> dict:
    """Run one side in this process; return its wall time and its RSS once imports are done (GiB)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from rain_tasks.io.checkpoint import Checkpoint
    from rain_tasks.merge.engine import DeltaPlan, TensorDir, merge_checkpoint
    from rain_tasks.merge.task_vectors import compute_task_vectors

    ckpt = work / "ckpt"
    seconds: dict[str, float] = {"baseline_rss_gib": status_gib("VmRSS")}  # once every library is imported
    t0 = time.perf_counter()
    if side == "task_vectors":
        shutil.rmtree(work / "tv", ignore_errors=True)  # computed afresh, not reused from an earlier run
        compute_task_vectors(ckpt / "base", ckpt / "itm", work / "tv")
    elif side == "ours":
        tv = TensorDir(work / "tv")
        plan = DeltaPlan(linear=tv, other=tv, base=Checkpoint(ckpt / "base"))
        merge_checkpoint(ckpt / "lrm", work / "out_ours", "task_arithmetic", {"lam": 1.0}, plan, max_shard_size=shard_size)
    elif side == "ours_direct":
        from rain_tasks.io.checkpoint import Difference

        delta = Difference(Checkpoint(ckpt / "itm"), Checkpoint(ckpt / "base"))
        plan = DeltaPlan(linear=delta, other=delta)
        merge_checkpoint(ckpt / "lrm", work / "out_direct", "task_arithmetic", {"lam": 1.0}, plan, max_shard_size=shard_size)
    else:
        config = {"merge_method": "task_arithmetic", "base_model": str(ckpt / "base"),
                  "models": [{"model": str(ckpt / m), "parameters": {"weight": 1.0}} for m in ("lrm", "itm")],
                  "parameters": {"normalize": False, "lambda": 1.0}, "dtype": _dtype(ckpt / "lrm")}
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=True,
                               out_shard_size=_bytes(shard_size))
        run_merge(MergeConfiguration.model_validate(config), str(work / "out_mergekit"), options)
    seconds["seconds"] = time.perf_counter() - t0
    seconds["peak_rss_gib"] = status_gib("VmHWM")
    return seconds


def _dtype(model_dir: Path) -> str:
    """The checkpoint's dtype name as config.json gives it (transformers 5: `dtype`, older: `torch_dtype`)."""
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("dtype") or config["torch_dtype"]


def _bytes(size: str) -> int:
    from rain_tasks.io.checkpoint import parse_size

    return parse_size(size)


def run_side(side: str, work: Path, shard_size: str) -> dict:
    """Run `side` in a fresh process; its wall times and peak RSS (GiB)."""
    result = run_child(__file__, ["--child", side, "--workdir", str(work), "--shard-size", shard_size], side)
    return {**result, "working_rss_gib": result["peak_rss_gib"] - result["baseline_rss_gib"]}


def median_run(runs: list[dict]) -> dict:
    """Each figure's median over the runs of one side."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def largest_tensor_gib(model_dir: Path) -> float:
    from rain_tasks.io.checkpoint import Checkpoint

    ckpt = Checkpoint(model_dir)
    return max(ckpt.get(n).nbytes for n in ckpt.names()) / 2**30


def main() -> None:
    p = model_parser(__doc__, layers=2)
    p.add_argument("--shard-size", default="1GB")
    p.add_argument("--repeats", type=int, default=1, help="run the sides in turn this many times; report medians")
    p.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.shard_size)))
        return

    work = workdir(args.workdir, "rain-merge-bench-")
    build_family(work, args)
    runs = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side in SIDES:  # in turn, so a drift in the machine's speed reaches every side alike
            runs[side].append(run_side(side, work, args.shard_size))
    mergekit, tv, ours, direct = (median_run(runs[side]) for side in SIDES)
    largest, shard = largest_tensor_gib(work / "ckpt/lrm"), _bytes(args.shard_size) / 2**30
    budget = 2 * largest + shard
    result = {"model": {k: getattr(args, k) for k in ("hidden", "ffn", "layers", "heads", "kv_heads", "dtype")},
              "ours_merge": ours, "ours_task_vectors": tv, "ours_direct": direct, "mergekit": mergekit,
              "repeats": args.repeats, "largest_tensor_gib": largest,
              "shard_gib": shard, "rss_goal_gib": budget,
              "machine": machine()}
    for label, r in (("mergekit task_arithmetic", mergekit), ("ours: task vectors", tv), ("ours: merge", ours),
                     ("ours: merge from ITM and base", direct)):
        print(f"{label}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"({r['working_rss_gib']:.2f} GiB above its state after imports)")
    print(f"time ours/mergekit: merge {ours['seconds'] / mergekit['seconds']:.2f}x, with task vectors "
          f"{(ours['seconds'] + tv['seconds']) / mergekit['seconds']:.2f}x, from ITM and base "
          f"{direct['seconds'] / mergekit['seconds']:.2f}x; RSS goal 2 x largest tensor "
          f"({largest:.3f} GiB) + one shard ({shard:.2f} GiB) = {budget:.2f} GiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
