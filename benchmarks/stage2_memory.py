"""Peak RSS of Stage 2 attention statistics on one long (~4k-token) sample: recompute vs eager path.

Each mode runs `attention_stats` (both passes) in a fresh child process that reports its peak RSS
(ru_maxrss) before and after the call, so the two figures do not share allocator state.
Usage: .venv/bin/python benchmarks/stage2_memory.py [--tokens 4000] [--layers 2] [--heads 4] [--kv-heads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def long_row(tokens: int) -> dict:
    """One instruction-set row whose rendering is about `tokens` tokens (long reasoning, 2 spans)."""
    from rain_dev.tiny import instruction_rows

    filler = " ".join(["step", "the", "result", "is", "next"] * (tokens // 5))
    response = "hello world " * 20 + "answer is 3 DONE"
    row = {**instruction_rows(1)[0], "reason": filler, "response": response}
    return {**row, "unrelated_response_spans": ["hello world"]}


def child(mode: str, work: Path) -> dict:
    """Run attention_stats once in `mode`; report peak RSS before/after and the wall time."""
    import pandas as pd

    from rain_tasks.stage2.attention import attention_stats
    from rain_tasks.params import AttentionParams

    before = peak_rss_mib()
    start = time.perf_counter()
    params = AttentionParams(mode=mode, max_tokens=8192)
    out = attention_stats(work / "lrm", work / "projected", work / "instruction.jsonl", params, work / f"{mode}.parquet", work / f"{mode}.json")
    report = json.loads((work / f"{mode}.json").read_text())
    return {
        "mode": mode,
        "tokens": report["tokens"]["max"],
        "peak_rss_before_mib": round(before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "seconds": round(time.perf_counter() - start, 1),
        "a0_sum": float(pd.read_parquet(out)["a0"].sum()),
    }


def prepare(work: Path, tokens: int, layers: int, heads: int, kv_heads: int) -> None:
    """Write a tiny model family, its task vectors (standing in for Δ⊥) and the long sample."""
    from rain_dev.tiny import make_family, write_jsonl

    from rain_tasks.merge.task_vectors import compute_task_vectors

    fam = make_family(work, layers=layers, heads=heads, kv_heads=kv_heads, hidden=8 * heads)
    compute_task_vectors(fam["base"], fam["itm"], work / "projected")
    write_jsonl(work / "instruction.jsonl", [long_row(tokens)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.tokens, args.layers, args.heads, args.kv_heads)
        results = []
        for mode in ("recompute", "eager"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, str(work)], capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    shape = f"{args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads"
    print(f"Stage 2 attention_stats peak RSS ({shape}, both passes):")
    for r in results:
        print(f"  {r['mode']:<9} T={r['tokens']}  peak {r['peak_rss_mib']:8.1f} MiB  (after imports {r['peak_rss_before_mib']:.1f})  {r['seconds']} s")
    if abs(results[0]["a0_sum"] - results[1]["a0_sum"]) > 1e-6 * max(1.0, abs(results[1]["a0_sum"])):
        raise SystemExit(f"paths disagree: {results}")


if __name__ == "__main__":
    main()
