"""The zoo report: does thinking matter, does the ITM's skill transfer, and how far do data-free merges get?

Writes the λ sweep of θ_LRM + λ·Δ_ITM on the held-out test prompts (close rate, correctness, compliance; λ = 0 is
the LRM itself) as a CSV for `dvc plots`, and as markdown: the LRM thinking against the LRM with its thinking
block forced closed at once, the ITM, and (where the family has a validation split) each data-free baseline's
best setting chosen on the validation prompts and scored on the test prompts, with the task vectors' norms and cosine.
Deterministic (fixed threads, deterministic kernels, greedy decoding), so reruns write the same bytes.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rain_tasks.io.artifacts import write_text
from rain_tasks.model.generation import load_model
from rain_tasks.evaluate.behaviour import behaviour_metrics
from rain_tasks.io.schemas import load_records
from rain_tasks.zoo.build import deterministic, task_vector_geometry as geometry_of
from rain_tasks.zoo.probe import forced_closed_metrics, merge_sweep, task_arithmetic_sweep

#: λ values the zoo stage reports (λ = 0: the LRM itself); seven sweeps of the eval set, about a minute on 2 cores
REPORT_LAMBDAS: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
COLUMNS = ("lambda", "think_rate", "close_rate", "correct_rate", "comply_rate")
VALIDATION_FILE = "instruction_val.jsonl"
#: the data-free baselines' settings swept on the validation prompts (the baselines section's run form)
BASELINE_GRID: tuple[dict, ...] = (
    *({"method": "task_arithmetic", "lam": lam, "scope": "all"} for lam in (0.3, 0.5, 0.7, 1.0, 1.5, 2.0)),
    *({"method": "ties", "density": d, "weights": [1.0, 1.0], "lam": lam, "scope": "all"}
      for d in (0.3, 0.7) for lam in (1.0, 1.5)),
    *({"method": "dare", "drop": p, "seed": 0, "combine": c, "weights": [1.0, 1.0], "lam": 1.0, "scope": "all"}
      for c in ("linear", "ties") for p in (0.3, 0.7)),
    *({"method": "slerp", "t": t, "dot_threshold": 0.9995, "scope": "all"} for t in (0.3, 0.5, 0.7)),
)
_SETTING_KEYS = ("lam", "density", "drop", "combine", "t")


def thinking_matters(thinking: dict, forced_closed: dict, margin: float = 0.30) -> bool:
    """The LRM thinking is ≥ 90 % correct and with its thinking block forced closed ≥ `margin` less accurate."""
    return thinking["correct_rate"] >= 0.90 and forced_closed["correct_rate"] <= thinking["correct_rate"] - margin


def setting(run: dict) -> str:
    """A baseline run's swept setting, e.g. 'lam 1 density 0.3'."""
    return " ".join(f"{k} {run[k]:g}" if isinstance(run[k], float) else f"{k} {run[k]}" for k in _SETTING_KEYS if k in run)


def best_on_validation(validation: list[dict]) -> dict[str, int]:
    """Per merge method, the index of the run with the highest close∧correct∧comply rate on the validation prompts
    (ties: higher compliance, then the earlier run)."""
    best: dict[str, int] = {}
    for i, run in enumerate(validation):
        held = best.get(run["method"])
        key = (run["close_correct_comply_rate"], run["comply_rate"])
        if held is None or key > (validation[held]["close_correct_comply_rate"], validation[held]["comply_rate"]):
            best[run["method"]] = i
    return best


def chosen_baselines(models_dir: Path, val_path: Path, test_path: Path, grid: tuple[dict, ...] = BASELINE_GRID,
                     max_new_tokens: int = 64) -> list[dict]:
    """Each method's best setting of `grid` on the validation prompts, scored on the test prompts:
    rows {method, setting, val: metrics, test: metrics}."""
    validation = merge_sweep(models_dir, val_path, list(grid), max_new_tokens)
    best = list(best_on_validation(validation).values())
    tests = merge_sweep(models_dir, test_path, [grid[i] for i in best], max_new_tokens)
    return [{"method": grid[i]["method"], "setting": setting(grid[i]), "val": validation[i], "test": test}
            for i, test in zip(best, tests, strict=True)]


def task_vector_geometry(models_dir: Path) -> dict[str, float]:
    """‖θ_base‖, ‖Δ_ITM‖, ‖Δ_LRM‖ and cos(Δ_ITM, Δ_LRM) of the built family (see zoo.build.task_vector_geometry)."""
    base, itm, lrm = (load_model(Path(models_dir) / name)[0] for name in ("base", "itm", "lrm"))
    return geometry_of(base, itm, lrm)


def family_behaviour(models_dir: Path, eval_path: Path, max_new_tokens: int = 64) -> dict[str, dict]:
    """LRM (thinking), LRM with the thinking block forced closed, and ITM behaviour on an instruction-eval file."""
    rows = load_records(eval_path, "instruction_eval")
    lrm, tok = load_model(Path(models_dir) / "lrm")
    itm, itm_tok = load_model(Path(models_dir) / "itm")
    return {"lrm": behaviour_metrics(lrm, tok, rows, max_new_tokens),
            "lrm_forced_closed": forced_closed_metrics(lrm, tok, rows, max_new_tokens),
            "itm": behaviour_metrics(itm, itm_tok, rows, max_new_tokens)}


def _metric_cells(m: dict) -> str:
    """close | correct | complies (prompt) | complies (instruction) | all three, as markdown cells."""
    return (f"{m['close_rate']:.3f} | {m['correct_rate']:.3f} | {m['comply_rate']:.3f} | "
            f"{m['comply_instruction_rate']:.3f} | {m['close_correct_comply_rate']:.3f}")


def write_zoo_report(models_dir: Path, eval_path: Path, lambdas: list[float], md_path: Path,
                     csv_path: Path, max_new_tokens: int = 64, threads: int = 2) -> list[dict]:
    """Sweep task arithmetic over `lambdas` on the instruction eval set, measure the family (and, with a validation
    file beside `eval_path`, the baselines chosen on it); write CSV + markdown; return the sweep rows."""
    val_path = Path(eval_path).parent / VALIDATION_FILE
    with deterministic(threads):
        rows = task_arithmetic_sweep(models_dir, eval_path, list(lambdas), "all", max_new_tokens)
        behaviour = family_behaviour(models_dir, eval_path, max_new_tokens)
        chosen = chosen_baselines(models_dir, val_path, eval_path, max_new_tokens=max_new_tokens) if val_path.is_file() else []
        geometry = task_vector_geometry(models_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([[f"{r[c]:g}" if c == "lambda" else f"{r[c]:.4f}" for c in COLUMNS] for r in rows])
    write_text(csv_path, buffer.getvalue())
    lrm = next((r for r in rows if r["lambda"] == 0), None)
    header = ["| model | `</think>` closed | correct | complies (prompt) | complies (instruction) | all three |",
              "|---|---:|---:|---:|---:|---:|"]
    lines = [
        "# Zoo report",
        "",
        f"Held-out test prompts: {rows[0]['n'] if rows else 0}; greedy, {max_new_tokens} new tokens.",
        "",
        "## Does thinking matter?",
        "",
        *header,
        f"| LRM, thinking | {_metric_cells(behaviour['lrm'])} |",
        f"| LRM, thinking block forced closed | {_metric_cells(behaviour['lrm_forced_closed'])} |",
        f"| ITM | {_metric_cells(behaviour['itm'])} |",
        "",
        f"Thinking matters (LRM ≥ 0.9 correct, forced closed ≥ 30 points less): "
        f"{thinking_matters(behaviour['lrm'], behaviour['lrm_forced_closed'])}.",
        "",
        "## Naive task arithmetic θ_LRM + λ·(θ_ITM − θ_base) (λ = 0 is the LRM)",
        "",
        "| λ | think | `</think>` closed | correct | complies | Δ comply vs LRM |",
        "|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['lambda']:g} | {r['think_rate']:.3f} | {r['close_rate']:.3f} | {r['correct_rate']:.3f} | "
          f"{r['comply_rate']:.3f} | "
          + (f"{r['comply_rate'] - lrm['comply_rate']:+.3f}" if lrm else "–") + " |" for r in rows),
        "",
    ]
    if chosen:
        lines += [
            f"## Data-free baselines, each setting chosen on the {chosen[0]['val']['n']} validation prompts "
            "(highest close∧correct∧comply), scored on the test prompts",
            "",
            "| method | setting | `</think>` closed | correct | complies (prompt) | complies (instruction) | all three |",
            "|---|---|---:|---:|---:|---:|---:|",
            *(f"| {c['method']} | {c['setting']} | {_metric_cells(c['test'])} |" for c in chosen),
            "",
        ]
    lines += [
        "Task vectors (all parameters): "
        f"‖θ_base‖ {geometry['norm_base']:.2f}, ‖Δ_ITM‖ {geometry['norm_delta_itm']:.3f}, "
        f"‖Δ_LRM‖ {geometry['norm_delta_lrm']:.3f}, cos(Δ_ITM, Δ_LRM) {geometry['cosine_delta_itm_lrm']:.3f}.",
        "",
    ]
    write_text(md_path, "\n".join(lines))
    return rows
