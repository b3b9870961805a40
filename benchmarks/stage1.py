"""Stage 1 (features + projection) time and peak RSS on a random model with 7B-like layer widths.

Usage: python benchmarks/stage1.py [--workdir DIR] [--layers 2] [--samples 25] [--paths rows gram]
Each phase runs in its own process so its peak RSS (VmHWM) is its own. The "rows" path keeps
row blocks where a set has fewer rows than its width (the low-rank path); "gram" forces Grams.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import model_parser, run_child, status_gib, workdir  # noqa: E402


def build(work: Path, args: argparse.Namespace) -> None:
    """Write the random LRM, a random task vector in the task_vectors layout, and a reasoning set."""
    import torch
    from rain_dev.tiny import make_tokenizer, reasoning_rows, write_jsonl
    from transformers import AutoConfig, AutoModelForCausalLM

    from rain_tasks.io.checkpoint import save_tensors
    from rain_tasks.io.artifacts import MANIFEST, layer_file

    tok = make_tokenizer()
    cfg = AutoConfig.for_model(
        "qwen2", vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(work / "lrm")
    tok.save_pretrained(work / "lrm")
    for layer in range(args.layers):
        names = [n for n in model.state_dict() if n.startswith(f"model.layers.{layer}.")]
        save_tensors(layer_file(work / "tv", layer), {n: torch.randn(model.state_dict()[n].shape) * 1e-3 for n in names})
    (work / "tv" / MANIFEST).write_text(json.dumps({"num_layers": args.layers}))
    rows = reasoning_rows(args.samples)
    for r in rows:
        r["reasoning"] = " ".join([r["reasoning"]] * 3)
    write_jsonl(work / "reasoning.jsonl", rows)


def run_phase(work: Path, phase: str, path: str) -> dict:
    """Run one phase in this process; return its wall time and peak RSS."""
    from rain_tasks.stage1.features import accumulate_features
    from rain_tasks.params import FeaturesParams, ProjectionParams
    from rain_tasks.stage1.projection import project

    t0 = time.perf_counter()
    if phase == "features":
        accumulate_features(work / "lrm", work / "reasoning.jsonl", FeaturesParams(), work / f"features_{path}", low_rank=path == "rows")
    else:
        project(work / "tv", work / f"features_{path}", ProjectionParams(), work / f"proj_{path}", work / f"report_{path}.parquet")
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": status_gib("VmHWM")}


def main() -> None:
    p = model_parser(__doc__, layers=2, dtype=None)
    p.add_argument("--samples", type=int, default=25, help="12 Ω rows per sample at radius 5")
    p.add_argument("--paths", nargs="+", default=["rows", "gram"], choices=["rows", "gram"])
    p.add_argument("--phase", choices=["build", "features", "projection"], help=argparse.SUPPRESS)
    p.add_argument("--path", choices=["rows", "gram"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase == "build":
        build(args.workdir, args)
        print(json.dumps({"built": str(args.workdir)}))
        return
    if args.phase:
        print(json.dumps(run_phase(args.workdir, args.phase, args.path)))
        return
    work = workdir(args.workdir, "stage1-bench-")
    sizes = [f"--{k}={v}" for k, v in (("layers", args.layers), ("hidden", args.hidden), ("ffn", args.ffn), ("heads", args.heads), ("kv-heads", args.kv_heads), ("samples", args.samples))]
    if not (work / "tv" / "manifest.json").is_file():
        run_child(__file__, ["--workdir", str(work), *sizes, "--phase", "build"], "build")
    print(f"model: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, {args.heads} heads / {args.kv_heads} KV; {args.samples} samples; {work}")
    for path in args.paths:
        for stale in (work / f"features_{path}", work / f"proj_{path}"):
            shutil.rmtree(stale, ignore_errors=True)  # time a full run, not a resumed one
        for phase in ("features", "projection"):
            r = run_child(__file__, ["--workdir", str(work), *sizes, "--phase", phase, "--path", path], f"{path} {phase}")
            print(f"{path:5s} {phase:10s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_gib']:6.2f} GiB", flush=True)
        report = __import__("pandas").read_parquet(work / f"report_{path}.parquet")
        print(report.groupby("module")[["rows", "d_in", "rank_kept", "norm_ratio", "residual_calib"]].mean().round(3).to_string())


if __name__ == "__main__":
    main()
