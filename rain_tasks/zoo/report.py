"""The zoo report: does the ITM's skill transfer under naive task arithmetic, and how do the task vectors relate?

Writes the λ sweep of θ_LRM + λ·Δ_ITM (close rate, correctness, compliance; λ = 0 is the LRM
itself) as a CSV for `dvc plots` and, with the task vectors' norms and cosine, as markdown.
Deterministic (fixed threads, deterministic kernels, greedy decoding), so reruns write the same bytes.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rain_tasks.checkpoint import atomic_path
from rain_tasks.generation import load_model
from rain_tasks.zoo.build import deterministic, task_vector_geometry as geometry_of
from rain_tasks.zoo.probe import task_arithmetic_sweep

#: λ values the zoo stage reports (λ = 0: the LRM itself); seven sweeps of the eval set, about a minute on 2 cores
REPORT_LAMBDAS: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
COLUMNS = ("lambda", "think_rate", "close_rate", "correct_rate", "comply_rate")


def family_properties(lrm: dict, itm: dict, sweep: list[dict]) -> dict[str, bool]:
    """The four properties the default family must have, from behaviour metrics (sweep[0] is λ = 0, the LRM):
    lrm: closes `</think>` ≥ 95 %, correct ≥ 90 %, complies ≤ 20 %; itm: complies ≥ 90 %, never opens `<think>`;
    transfer: task arithmetic raises compliance ≥ 20 points at some λ; breaks: a larger λ closes < 80 %."""
    gains = [i for i, r in enumerate(sweep) if r["comply_rate"] - sweep[0]["comply_rate"] >= 0.20]
    return {
        "lrm": lrm["close_rate"] >= 0.95 and lrm["correct_rate"] >= 0.90 and lrm["comply_rate"] <= 0.20,
        "itm": itm["comply_rate"] >= 0.90 and itm["think_rate"] == 0.0,
        "transfer": bool(gains),
        "breaks": bool(gains) and any(r["close_rate"] < 0.80 for r in sweep[gains[0] + 1:]),
    }


def task_vector_geometry(models_dir: Path) -> dict[str, float]:
    """‖θ_base‖, ‖Δ_ITM‖, ‖Δ_LRM‖ and cos(Δ_ITM, Δ_LRM) of the built family (see zoo.build.task_vector_geometry)."""
    base, itm, lrm = (load_model(Path(models_dir) / name)[0] for name in ("base", "itm", "lrm"))
    return geometry_of(base, itm, lrm)


def write_zoo_report(models_dir: Path, eval_path: Path, lambdas: list[float], md_path: Path,
                     csv_path: Path, max_new_tokens: int = 48, threads: int = 2) -> list[dict]:
    """Sweep task arithmetic over `lambdas` on the instruction eval set; write CSV + markdown; return the rows."""
    with deterministic(threads):
        rows = task_arithmetic_sweep(models_dir, eval_path, list(lambdas), "all", max_new_tokens)
        geometry = task_vector_geometry(models_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([[f"{r[c]:g}" if c == "lambda" else f"{r[c]:.4f}" for c in COLUMNS] for r in rows])
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buffer.getvalue())
    lrm = next((r for r in rows if r["lambda"] == 0), None)
    lines = [
        "# Zoo report: naive task arithmetic θ_LRM + λ·(θ_ITM − θ_base)",
        "",
        f"Held-out instruction prompts: {rows[0]['n'] if rows else 0}; greedy, {max_new_tokens} new tokens; "
        "λ = 0 is the LRM itself.",
        "",
        "| λ | think | `</think>` closed | correct | complies | Δ comply vs LRM |",
        "|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['lambda']:g} | {r['think_rate']:.3f} | {r['close_rate']:.3f} | {r['correct_rate']:.3f} | "
          f"{r['comply_rate']:.3f} | "
          + (f"{r['comply_rate'] - lrm['comply_rate']:+.3f}" if lrm else "–") + " |" for r in rows),
        "",
        "Task vectors (all parameters): "
        f"‖θ_base‖ {geometry['norm_base']:.2f}, ‖Δ_ITM‖ {geometry['norm_delta_itm']:.3f}, "
        f"‖Δ_LRM‖ {geometry['norm_delta_lrm']:.3f}, cos(Δ_ITM, Δ_LRM) {geometry['cosine_delta_itm_lrm']:.3f}.",
        "",
    ]
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(lines))
    return rows
