"""The whole pipeline on a random 7B-width triplet in bf16 on a CUDA device: per-stage time and peak device memory.

Writes base / ITM / LRM with Qwen2-7B's widths (hidden 3584, 28 heads over 4 KV heads, FFN 18944,
biased q/k/v) but `--layers` decoder layers (default 4; 28 is the real depth) and a small vocabulary,
in bf16, plus synthetic calibration sets of realistic lengths (reasoning ~1.5k tokens, instruction up
to `--long` tokens), then runs task_vectors, features, projection, attention_stats, alpha and merge
with runtime device cuda / dtype bfloat16, each stage timed with torch.cuda.max_memory_allocated
reset in between. On a machine without CUDA it says so and exits 0.

    python benchmarks/device_pipeline.py WORKDIR [--layers 4] [--long 10000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
STAGES = ("task_vectors", "features", "projection", "attention_stats", "alpha", "merge")
WORDS = "the a of to and we need first next result answer is step so then".split()  # all in the tiny vocabulary


def write_triplet(root: Path, layers: int) -> dict[str, Path]:
    """Random 7B-width base/ITM/LRM in bf16 (ITM and LRM = base + small seeded deltas) with the tiny tokenizer."""
    from rain_dev.tiny import make_family

    return make_family(root, hidden=3584, layers=layers, heads=28, kv_heads=4, ffn=18944, dtype=torch.bfloat16,
                       chat_template=_r1_template())


def _r1_template() -> str:
    from rain_dev.tiny import CHAT_TEMPLATE

    return CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")


def _text(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())


def write_calibration(root: Path, long: int) -> dict[str, Path]:
    """Reasoning rows of ~1.5k words and instruction rows from 500 words up to `long` words (one word = one token)."""
    reasoning = [{"prompt": f"add {i} and 2", "reasoning": _text(1500, i), "response": f"answer is {i + 2}"} for i in range(16)]
    from rain_dev.tiny import instruction_rows

    instruction = [{**row, "id": i, "reason": _text(n, 100 + i)} for i, (row, n) in enumerate(zip(instruction_rows(4), [500, 2000, 5000, long]))]
    paths = {"reasoning": root / "reasoning.jsonl", "instruction": root / "instruction.jsonl"}
    for kind, rows in (("reasoning", reasoning), ("instruction", instruction)):
        paths[kind].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--long", type=int, default=10000)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("device_pipeline: needs a CUDA GPU (torch sees none); nothing was run. "
              "Run it on a GPU machine: python benchmarks/device_pipeline.py WORKDIR")
        return 0
    from rain_tasks.params import load_params
    from rain_tasks.model.runtime import configure
    from rain_tasks.pipeline.stages import get_stage

    configure()
    torch.use_deterministic_algorithms(True, warn_only=True)
    root = args.work
    models = write_triplet(root / "models", args.layers)
    calib = write_calibration(root, args.long)
    params = {
        "models": {k: str(v) for k, v in models.items()},
        "calibration": {"reasoning": str(calib["reasoning"]), "reasoning_heldout": str(calib["reasoning"]),
                        "instruction": str(calib["instruction"])},
        "runtime": {"device": "cuda", "dtype": "bfloat16"},
        "merge": {"max_shard_size": "5GB"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = load_params(root / "params.yaml")
    print(f"| stage | seconds | peak device memory (GiB) |  ({torch.cuda.get_device_name()}, {args.layers} layers of Qwen2-7B width, bf16)")
    print("|---|---:|---:|")
    for name in STAGES:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        get_stage(name).run(p, root)
        torch.cuda.synchronize()
        print(f"| {name} | {time.perf_counter() - t:.1f} | {torch.cuda.max_memory_allocated() / 2**30:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
