"""Per-layer attribution of RAIN's merge: merge one layer's share λ·α⊙Δ⊥ at a time and measure what it changes.

Usage: python benchmarks/layer_attribution.py [--project .] [--split val|test] [--max-eval N]
Reads a project whose stages ran up to alpha (`dvc repro alpha`, or `make demo`): its Δ⊥ (artifacts/projected), α
scales (artifacts/alpha) and params (merge.lam). For each layer l, θ_R + λ·α⊙Δ⊥ on layer l's Linear modules only
(the other layers stay θ_R), then the same with α = 1, evaluated by the evaluation code. Prints per layer its mean
α, the compliance gained over the LRM and L_think, with α and with α = 1, and the Spearman correlation across layers
between mean α and each layer's compliance gain per unit of L_think: whether Stage 2 gives more of the update to
the layers whose share buys instruction following cheaply.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

SPLITS = {"val": "data/eval/instruction_val.jsonl", "test": "data/eval/instruction_eval.jsonl"}


def one_layer(projected: Path, layer: int, dest: Path) -> Path:
    """A Δ⊥ directory holding layer `layer` only (a link): every other tensor gets no update in the merge."""
    from rain_tasks.io.artifacts import MANIFEST, layer_file

    dest.mkdir(parents=True)
    layer_file(dest, layer).symlink_to(layer_file(projected, layer).resolve())
    (dest / MANIFEST).symlink_to((projected / MANIFEST).resolve())
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--split", choices=sorted(SPLITS), default="val")
    p.add_argument("--max-eval", type=int)
    args = p.parse_args()

    from scipy.stats import spearmanr

    from rain_tasks.io.arch import read_shape
    from rain_tasks.evaluate.evaluation import evaluate_models
    from rain_tasks.merge.engine import DeltaPlan, SingleFile, TensorDir, merge_checkpoint
    from rain_tasks.model.runtime import configure

    configure()
    project = args.project.resolve()
    params = yaml.safe_load((project / "params.yaml").read_text())
    lam, lrm = params["merge"]["lam"], project / params["models"]["lrm"]
    projected, scales = project / "artifacts/projected", project / "artifacts/alpha/scales.safetensors"
    alpha = pd.read_parquet(project / "artifacts/alpha/alpha.parquet").groupby("layer")["alpha"].mean()
    work = Path(tempfile.mkdtemp(prefix="rain-layers-"))
    models = {"LRM": lrm}
    for layer in range(read_shape(lrm).num_layers):
        delta = TensorDir(one_layer(projected, layer, work / f"delta{layer}"))
        for tag, scale in (("alpha", SingleFile(scales)), ("alpha1", None)):
            merge_checkpoint(lrm, work / f"{tag}{layer}", "rain", {"lam": lam}, DeltaPlan(linear=delta, scales=scale), "1GB")
            models[f"{tag}{layer}"] = work / f"{tag}{layer}"
    e = params["evaluate"]
    res = evaluate_models(lrm, models, project / SPLITS[args.split], project / "data/eval/reasoning_eval.jsonl",
                          e["max_new_tokens"], e["batch_size"], e["neighbour_radius"], args.max_eval)
    base = res["LRM"]["comply_rate"]
    rows = []
    for layer, mean_alpha in alpha.items():
        a, one = res[f"alpha{layer}"], res[f"alpha1{layer}"]
        rows.append({"layer": layer, "mean_alpha": mean_alpha, "gain": a["comply_rate"] - base, "l_think": a["l_think"],
                     "gain_alpha1": one["comply_rate"] - base, "l_think_alpha1": one["l_think"],
                     "efficiency_alpha1": (one["comply_rate"] - base) / max(one["l_think"], 1e-12)})
    table = pd.DataFrame(rows)
    print(f"λ = {lam}, {args.split} prompts; compliance of the LRM {base:.3f}")
    print("| layer | mean α | compliance gain (α) | L_think (α) | gain (α = 1) | L_think (α = 1) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layer']} | {r['mean_alpha']:.3f} | {r['gain']:+.3f} | {r['l_think']:.2e} | {r['gain_alpha1']:+.3f} | "
              f"{r['l_think_alpha1']:.2e} |")
    rho = spearmanr(table["mean_alpha"], table["efficiency_alpha1"]).statistic if len(table) > 2 else np.nan
    print(f"Spearman(mean α, compliance gain per L_think at α = 1) across layers: {rho:.3f}")


if __name__ == "__main__":
    main()
