"""Evaluation: behaviour on held-out instruction problems, think-format KL, and the comparison report.

Behaviour (think / close / correct / comply rates) comes from greedy generation
(`rain_tasks.generation`); L_think = mean KL(p_LRM ‖ p_model) of next-token distributions at
Ω_think positions of held-out reasoning traces, teacher forced, and h_drift the relative change of
the hidden states there (Stage 1's end-to-end invariance).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from rain_tasks.calibration import load_tokenizer, render, think_positions
from rain_tasks.checkpoint import atomic_path
from rain_tasks.generation import behaviour_metrics, load_model
from rain_tasks.schemas import load_records

log = logging.getLogger(__name__)

#: metrics shown in the comparison table, in order, with their headers
TABLE_COLUMNS = {
    "think_rate": "think",
    "close_rate": "close </think>",
    "correct_rate": "correct",
    "comply_rate": "comply",
    "l_think": "L_think",
    "h_drift": "h drift",
}


@torch.no_grad()
def _at_omega(model, encoded: list[tuple[list[int], list[int]]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per encoded trace: log next-token distributions [|Ω|, V] and decoder-layer outputs [L, |Ω|, d] at Ω."""
    log_probs, hidden = [], []
    for ids, omega in encoded:
        out = model(torch.tensor([ids]), output_hidden_states=True)
        log_probs.append(torch.log_softmax(out.logits[0, omega].float(), dim=-1))
        # hidden_states[0] is the embedding output; 1..L-1 are layer outputs and the last is after the final norm
        hidden.append(torch.stack([h[0, omega].double() for h in out.hidden_states[1:]]))
    return log_probs, hidden


def think_invariance(lrm_dir: str | Path, model_dirs: dict[str, Path], traces: list[dict], radius: int) -> dict[str, dict]:
    """Per model, teacher forced on the traces, at Ω_think: L_think = mean KL(p_LRM ‖ p_model), and
    h_drift = mean over layers of ‖h_model − h_LRM‖ / ‖h_LRM‖ (both 0 for the LRM itself)."""
    tok = load_tokenizer(lrm_dir)
    encoded = []
    for row in traces:
        r = render(tok, row["prompt"], row["reasoning"], row["response"])
        encoded.append((r.input_ids, think_positions(r, radius)))
    ref_p, ref_h = _at_omega(load_model(lrm_dir)[0], encoded)
    ref_hidden = torch.cat(ref_h, dim=1)
    result = {}
    for name, path in model_dirs.items():
        logq, hidden = _at_omega(load_model(path)[0], encoded)
        kls = [(p.exp() * (p - q)).sum(-1) for p, q in zip(ref_p, logq)]
        diff = torch.linalg.vector_norm(torch.cat(hidden, dim=1) - ref_hidden, dim=(1, 2))
        drift = diff / torch.linalg.vector_norm(ref_hidden, dim=(1, 2))
        result[name] = {"l_think": float(torch.cat(kls).mean()), "h_drift": float(drift.mean())}
    return result


def evaluate_models(
    lrm_dir: str | Path,
    model_dirs: dict[str, Path],
    instruction_eval: str | Path,
    reasoning_eval: str | Path,
    max_new_tokens: int,
    batch_size: int,
    radius: int,
    max_eval: int | None = None,
) -> dict[str, dict]:
    """Metrics for every model (model_dirs includes the LRM itself under some name)."""
    problems = load_records(instruction_eval, "instruction_eval")[:max_eval]
    traces = load_records(reasoning_eval, "reasoning")[:max_eval]
    invariance = think_invariance(lrm_dir, model_dirs, traces, radius)
    results = {}
    for name, path in tqdm(model_dirs.items(), desc="evaluate", unit="model"):
        model, tok = load_model(path)
        m = behaviour_metrics(model, tok, problems, max_new_tokens=max_new_tokens, batch_size=batch_size)
        results[name] = {**m, **invariance[name]}
        log.info("%s: %s", name, {k: results[name][k] for k in TABLE_COLUMNS})
    return results


def format_table(results: dict[str, dict]) -> str:
    """Markdown table of the headline metrics, one row per model."""
    head = "| model | " + " | ".join(TABLE_COLUMNS.values()) + " |"
    rule = "|---|" + "---:|" * len(TABLE_COLUMNS)
    rows = [
        f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in TABLE_COLUMNS) + " |" for name, m in results.items()
    ]
    return "\n".join([head, rule, *rows])


def _fmt(v) -> str:
    """Three decimals, four for small nonzero values; float noise around 0 prints as 0."""
    if not isinstance(v, float):
        return "n/a" if v is None else str(v)
    if abs(v) < 5e-5:
        return "0.000"
    return f"{v:.4f}" if abs(v) < 0.01 else f"{v:.3f}"


def write_outputs(
    results: dict[str, dict], metrics_path: Path, plots_path: Path, report_path: Path, context: dict, sections: tuple[str, ...] = ()
) -> None:
    """metrics JSON for `dvc metrics`, long CSV for `dvc plots`, and the markdown report (all atomic).

    `sections` are further markdown blocks (e.g. the α summary) placed after the comparison table.
    """
    with atomic_path(metrics_path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = ["model,metric,value"] + [f"{n},{k},{m[k]}" for n, m in results.items() for k in TABLE_COLUMNS]
    with atomic_path(plots_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    report = [
        "# RAIN-Merging evaluation report",
        "",
        f"Merged model: `{context['merged']}`",
        "",
        format_table(results),
        "",
        "think: emits `<think>`; close: emits `</think>` within the token budget; correct: final answer right;",
        "comply: the format instruction is followed; L_think: mean KL(p_LRM ‖ p_model) at Ω_think (teacher forced);",
        "h drift: mean over layers of ‖h_model − h_LRM‖/‖h_LRM‖ of the hidden states at Ω_think (teacher forced).",
        "",
        *sections,
        "Params: `" + json.dumps(context.get("params", {}), sort_keys=True) + "`",
        "",
    ]
    with atomic_path(report_path) as tmp:
        tmp.write_text("\n".join(report))
