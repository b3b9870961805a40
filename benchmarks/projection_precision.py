"""Projection in float32 against float64, the randomized solver against the exact one, and Δ⊥ stored in bfloat16
against float32, at 7B layer widths.

Usage: python benchmarks/projection_precision.py [--workdir DIR] [--hidden 3584 --ffn 18944 --heads 28 --kv-heads 4
       --layers 1] [--dtype bfloat16] [--samples 25]
On one random family (rain_dev/tiny.py) through the stage machinery (task_vectors, features): the projection at
precision float64 (the default) and float32, each with solver exact (the default) and randomized, each timed; per
block the rank kept and the residuals of every variant against float64 exact; Δ⊥'s relative difference; then RAIN's merge (λ = merge.lam, α = 1) from float32 Δ⊥ stored in
float32 and in the LRM's dtype, and the merged tensors' difference in units of the output dtype's spacing (ULPs).
A --workdir that already holds a project (params.yaml) is reused as it is. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import build_project, model_parser, workdir  # noqa: E402

REPORT_COLUMNS = ("energy_protected", "norm_ratio", "residual_calib", "residual_calib_inliers", "residual_heldout")


def ulp_distance(a, b):
    """|a − b| in units of the spacing of their (16-bit float) dtype: the distance between their ordered bit patterns."""
    import torch

    def ordered(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)  # sign-magnitude -> one increasing integer line

    return (ordered(a) - ordered(b)).abs()


def main() -> None:
    args = model_parser(__doc__, layers=1, dtypes=("bfloat16", "float16"), samples=25).parse_args()

    import pandas as pd
    import torch
    from rain_tasks.io.artifacts import layer_file
    from rain_tasks.io.checkpoint import Checkpoint, load_tensors
    from rain_tasks.merge.engine import DeltaPlan, TensorDir, merge_checkpoint
    from rain_tasks.model.runtime import configure
    from rain_tasks.params import load_params
    from rain_tasks.pipeline.runner import run_stage
    from rain_tasks.pipeline.stages import FEAT, FEAT_HELDOUT, TV
    from rain_tasks.stage1.projection import project

    configure()
    work = workdir(args.workdir, "rain-precision-")
    if not (work / "params.yaml").is_file():
        build_project(work, args)
    params = load_params(work / "params.yaml")
    for stage in ("task_vectors", "features"):
        run_stage(stage, params, work)
    variants = {"f64": {}, "f32": {"precision": "float32"}, "f32_16bit": {"precision": "float32", "dtype": args.dtype},
                "f64_randomized": {"solver": "randomized"}, "f32_randomized": {"precision": "float32", "solver": "randomized"}}
    seconds, reports = {}, {}
    for tag, overrides in variants.items():
        q = params.projection.model_copy(update=overrides)
        t0 = time.perf_counter()
        project(work / TV, work / FEAT, q, work / f"proj_{tag}", work / f"report_{tag}.parquet", work / FEAT_HELDOUT)
        seconds[tag] = time.perf_counter() - t0
        reports[tag] = pd.read_parquet(work / f"report_{tag}.parquet")
    exact, fast = reports["f64"], reports["f32"]

    def delta_rel(tag: str) -> float:
        """The largest ‖Δ⊥_tag − Δ⊥_f64‖/‖Δ⊥_f64‖ over the tensors."""
        return max(float((a[n] - b[n]).norm() / a[n].norm())
                   for layer in range(args.layers)
                   for a, b in [(load_tensors(layer_file(work / "proj_f64", layer)), load_tensors(layer_file(work / f"proj_{tag}", layer)))]
                   for n in a if a[n].norm() > 0)

    def against_exact(tag: str) -> dict:
        """Blocks whose rank differs from float64 exact's (and by how much at most), report columns' largest gaps, Δ⊥'s."""
        other = reports[tag]
        return {"rank_differs": int((other["rank_kept"] != exact["rank_kept"]).sum()),
                "rank_gap_max": int((other["rank_kept"] - exact["rank_kept"]).abs().max()),
                "max_abs_diff": {c: float((other[c] - exact[c]).abs().max()) for c in REPORT_COLUMNS},
                "max_rel_diff_delta_perp": delta_rel(tag)}
    lrm = work / "ckpt/lrm"
    for tag in ("f32", "f32_16bit"):
        merge_checkpoint(lrm, work / f"merged_{tag}", "rain", {"lam": params.merge.lam},
                         DeltaPlan(linear=TensorDir(work / f"proj_{tag}")), "2GB")
    a, b = Checkpoint(work / "merged_f32"), Checkpoint(work / "merged_f32_16bit")
    ulps = torch.cat([ulp_distance(a.get(n), b.get(n)).flatten() for n in a.names()])
    result = {
        "model": {k: getattr(args, k) for k in ("hidden", "ffn", "layers", "heads", "kv_heads", "dtype", "samples")},
        "projection_s": seconds,
        "blocks": len(exact), **against_exact("f32"),
        "randomized": {tag: against_exact(tag) for tag in ("f64_randomized", "f32_randomized")},
        "report_16bit_equals_f32": bool(reports["f32_16bit"].equals(fast)),
        "merged_ulps": {"elements": int(ulps.numel()), "differ": int((ulps > 0).sum()),
                        "max": int(ulps.max()), "over_1": int((ulps > 1).sum())},
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
