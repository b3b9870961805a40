"""Evaluation: behaviour on held-out instruction problems, think-format KL, and the comparison report.

Behaviour (think rate, IFEval prompt- and instruction-level strict accuracy, answer accuracy,
`</think>` missing rate) comes from greedy generation (`rain_tasks.generation`); L_think =
mean KL(p_LRM ‖ p_model) of next-token distributions at Ω_think positions of held-out reasoning
traces, teacher forced, and h_drift the relative change of the hidden states there (Stage 1's
end-to-end invariance). The held-out sets must share no prompt with a calibration set
(`contaminated_prompts`), or the numbers would measure memorised calibration data.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from rain_tasks.calibration import load_tokenizer, render, think_positions
from rain_tasks.checkpoint import CPU, atomic_path, forward_dtype, load_causal_lm
from rain_tasks.generation import GREEDY, Sampling, behaviour_metrics, load_model
from rain_tasks.params import EvaluateParams, RuntimeParams
from rain_tasks.runtime import input_device
from rain_tasks.plots import lines
from rain_tasks.schemas import load_records

log = logging.getLogger(__name__)

#: metrics shown in the comparison table, in order, with their headers
TABLE_COLUMNS = {
    "comply_rate": "IF prompt",
    "comply_instruction_rate": "IF instr.",
    "correct_rate": "reasoning acc.",
    "think_rate": "think",
    "missing_close_rate": "`</think>` missing",
    "l_think": "L_think",
    "h_drift": "h drift",
    "merge_time_s": "merge time (s)",
}
#: metrics drawn against λ for the task-arithmetic baselines
LAMBDA_METRICS = ["comply_rate", "correct_rate", "missing_close_rate", "l_think"]


class ContaminationError(ValueError):
    """Held-out evaluation prompts also occur in a calibration set."""


def normalize_prompt(text: str) -> str:
    """The form prompts are compared in: whitespace runs collapsed, case folded."""
    return " ".join(text.split()).casefold()


def contaminated_prompts(eval_prompts: dict[str, list[str]], calibration_prompts: Iterable[str]) -> dict[str, list[str]]:
    """Per held-out set, its prompts that also occur (normalized) in the calibration prompts."""
    seen = {normalize_prompt(t) for t in calibration_prompts}
    return {name: [t for t in prompts if normalize_prompt(t) in seen] for name, prompts in eval_prompts.items()}


def require_uncontaminated(found: dict[str, list[str]]) -> dict[str, int]:
    """The contamination counts per held-out set; raise ContaminationError naming the prompts if any is nonzero."""
    counts = {name: len(prompts) for name, prompts in found.items()}
    if any(counts.values()):
        examples = "; ".join(f"{name}: {prompts[:3]}" for name, prompts in found.items() if prompts)
        raise ContaminationError(
            f"held-out evaluation prompts also occur in a calibration set ({counts}): {examples}. "
            "Remove them from the evaluation files or from the calibration sets before evaluating."
        )
    return counts


def read_merge_times(paths: Iterable[Path]) -> dict[str, float]:
    """Model name -> merge wall seconds, from the merging stages' time files."""
    times: dict[str, float] = {}
    for path in paths:
        times.update({name: entry["merge_time_s"] for name, entry in json.loads(Path(path).read_text()).items()})
    return times


def lambda_table(results: dict[str, dict], runs: list[dict]) -> pd.DataFrame:
    """The task-arithmetic baselines' metrics against λ (one row per run), by scope."""
    rows = [{"model": r["name"], "lam": r["lam"], "scope": r["scope"], **{k: results[r["name"]][k] for k in LAMBDA_METRICS}}
            for r in runs if r["method"] == "task_arithmetic" and r["name"] in results]
    return pd.DataFrame(rows, columns=["model", "lam", "scope", *LAMBDA_METRICS]).sort_values(["scope", "lam"], kind="stable")


def write_lambda_sweep(table: pd.DataFrame, csv_path: Path, png_path: Path) -> bool:
    """Write the λ table (`dvc plots` data) and its line plot; True if some scope has two λ values or more."""
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    lines(table, "lam", LAMBDA_METRICS, png_path, "task arithmetic θ_R + λ·Δ_I against λ", group="scope")
    return bool(len(table)) and int(table.groupby("scope")["lam"].nunique().max()) >= 2


@torch.no_grad()
def _at_omega(model, encoded: list[tuple[list[int], list[int]]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per encoded trace: log next-token distributions [|Ω|, V] and decoder-layer outputs [L, |Ω|, d] at Ω."""
    log_probs, hidden = [], []
    device = input_device(model)
    for ids, omega in encoded:
        out = model(torch.tensor([ids], device=device), output_hidden_states=True)
        log_probs.append(torch.log_softmax(out.logits[0, omega].float(), dim=-1).cpu())
        # hidden_states[0] is the embedding output; 1..L-1 are layer outputs and the last is after the final norm
        hidden.append(torch.stack([h[0, omega].to("cpu", torch.float64) for h in out.hidden_states[1:]]))
    return log_probs, hidden


def _encode_traces(lrm_dir: str | Path, traces: list[dict], radius: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, Ω_think positions) of each trace, rendered with the LRM's tokenizer and template."""
    tok = load_tokenizer(lrm_dir)
    encoded = []
    for row in traces:
        r = render(tok, row["prompt"], row["reasoning"], row["response"])
        encoded.append((r.input_ids, think_positions(r, radius)))
    return encoded


def _invariance(reference: tuple[list[torch.Tensor], torch.Tensor], model, encoded) -> dict[str, float]:
    """L_think and h_drift of one model against the LRM's (log-probs, stacked hidden states) at Ω."""
    ref_p, ref_hidden = reference
    logq, hidden = _at_omega(model, encoded)
    kls = [(p.exp() * (p - q)).sum(-1) for p, q in zip(ref_p, logq)]
    diff = torch.linalg.vector_norm(torch.cat(hidden, dim=1) - ref_hidden, dim=(1, 2))
    drift = diff / torch.linalg.vector_norm(ref_hidden, dim=(1, 2))
    return {"l_think": float(torch.cat(kls).mean()), "h_drift": float(drift.mean())}


def _reference(lrm_dir: str | Path, encoded, runtime: RuntimeParams | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The LRM's log-probs and hidden states at Ω, computed once for every model compared with it."""
    ref_p, ref_h = _at_omega(load_model(lrm_dir, runtime)[0], encoded)
    return ref_p, torch.cat(ref_h, dim=1)


def think_invariance(lrm_dir: str | Path, model_dirs: dict[str, Path], traces: list[dict], radius: int,
                     runtime: RuntimeParams | None = None) -> dict[str, dict]:
    """Per model, teacher forced on the traces, at Ω_think: L_think = mean KL(p_LRM ‖ p_model), and
    h_drift = mean over layers of ‖h_model − h_LRM‖ / ‖h_LRM‖ (both 0 for the LRM itself)."""
    encoded = _encode_traces(lrm_dir, traces, radius)
    reference = _reference(lrm_dir, encoded, runtime)
    return {name: _invariance(reference, load_model(path, runtime)[0], encoded) for name, path in model_dirs.items()}


def evaluate_models(
    lrm_dir: str | Path,
    model_dirs: dict[str, Path],
    instruction_eval: str | Path,
    reasoning_eval: str | Path,
    max_new_tokens: int,
    batch_size: int,
    radius: int,
    max_eval: int | None = None,
    *,
    runtime: RuntimeParams | None = None,
    sampling: Sampling = GREEDY,
) -> dict[str, dict]:
    """Metrics for every model (model_dirs includes the LRM itself under some name); each model is loaded once,
    on `runtime`'s device and dtype, and replies are drawn with `sampling`."""
    problems = load_records(instruction_eval, "instruction_eval")[:max_eval]
    encoded = _encode_traces(lrm_dir, load_records(reasoning_eval, "reasoning")[:max_eval], radius)
    reference = _reference(lrm_dir, encoded, runtime)
    results = {}
    for name, path in tqdm(model_dirs.items(), desc="evaluate", unit="model"):
        model, tok = load_model(path, runtime)
        m = behaviour_metrics(model, tok, problems, max_new_tokens=max_new_tokens, batch_size=batch_size, sampling=sampling)
        results[name] = {**m, **_invariance(reference, model, encoded)}
        log.info("%s: %s", name, {k: results[name][k] for k in TABLE_COLUMNS if k in results[name]})
    return results


def lm_eval_scores(model_dirs: dict[str, Path], tasks: list[str], limit: int | None,
                   include: str | Path | None = None, *, runtime: RuntimeParams | None = None,
                   evaluate: EvaluateParams | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per model, lm-eval harness scores (task -> metric -> value) on the model directory.

    For real checkpoints (`evaluate.lm_eval_tasks` in params.yaml): lm-eval reads task data through
    `datasets`, so offline runs need it in the local datasets cache; `include` adds a folder of task
    YAMLs. Backend (`evaluate.lm_eval_backend`): vLLM where installed and chosen, else HFLM (needs
    lm-eval's [hf] extras beside requirements-eval.txt) on `runtime`'s device and dtype with the
    pipeline's own tokenizer (`load_tokenizer`: HFLM's AutoTokenizer would mangle a non-BPE
    tokenizer.json). Sampling and per-task generation budgets come from `evaluate`.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    evaluate = evaluate or EvaluateParams()
    manager = TaskManager(include_path=str(include) if include else None)
    runs = lm_eval_runs(tasks, evaluate)
    scores = {}
    for name, path in model_dirs.items():
        lm = _lm_eval_model(path, runtime or CPU, evaluate)
        scores[name] = {}
        for task_list, gen_kwargs in runs:
            out = simple_evaluate(model=lm, tasks=task_list, limit=limit, task_manager=manager, log_samples=False,
                                  gen_kwargs=gen_kwargs or None, random_seed=evaluate.seed)
            scores[name] |= {task: {k: float(v) for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                             for task, res in out["results"].items()}
        log.info("lm-eval %s: %s", name, scores[name])
    return scores


def lm_eval_runs(tasks: list[str], evaluate: EvaluateParams) -> list[tuple[list[str], str]]:
    """(tasks, lm-eval gen_kwargs string) per simple_evaluate call: tasks with their own budget run alone."""
    sampling = Sampling(evaluate.temperature, evaluate.top_p, evaluate.num_samples, evaluate.seed)
    common = ",".join(f"{k}={v}" for k, v in sampling.generate_kwargs().items() if k != "num_return_sequences")
    own = [t for t in tasks if t in evaluate.lm_eval_max_new_tokens]
    rest = [t for t in tasks if t not in evaluate.lm_eval_max_new_tokens]
    runs = [([t], f"{common},max_gen_toks={evaluate.lm_eval_max_new_tokens[t]}") for t in own]
    return ([(rest, common)] if rest else []) + runs


def lm_eval_backend(choice: str) -> str:
    """'vllm' or 'hf': auto takes vLLM where it is installed and a GPU is present; vllm refuses when it is missing."""
    available = importlib.util.find_spec("vllm") is not None
    if choice == "vllm" and not available:
        raise RuntimeError("evaluate.lm_eval_backend is vllm but vllm is not installed; install it or use hf / auto")
    return "vllm" if choice == "vllm" or (choice == "auto" and available and torch.cuda.is_available()) else "hf"


def _lm_eval_model(path: Path, runtime: RuntimeParams, evaluate: EvaluateParams):
    """An lm-eval model object for one checkpoint on the chosen backend, device and dtype."""
    dtype = str(forward_dtype(path, runtime)).removeprefix("torch.")
    if lm_eval_backend(evaluate.lm_eval_backend) == "vllm":
        from lm_eval.models.vllm_causallms import VLLM

        return VLLM(pretrained=str(path), dtype=dtype, batch_size="auto", seed=evaluate.seed,
                    tensor_parallel_size=max(1, torch.cuda.device_count()) if runtime.device_map else 1)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=load_causal_lm(path, runtime), tokenizer=load_tokenizer(path), batch_size=evaluate.batch_size)


def format_table(results: dict[str, dict], labels: dict[str, str] | None = None) -> str:
    """Markdown table of the headline metrics, one row per model (with its method label where given)."""
    labels = labels or {}
    head = "| model | method | " + " | ".join(TABLE_COLUMNS.values()) + " |"
    rule = "|---|---|" + "---:|" * len(TABLE_COLUMNS)
    rows = [
        f"| {name} | {labels.get(name, '')} | " + " | ".join(_fmt(m.get(k)) for k in TABLE_COLUMNS) + " |"
        for name, m in results.items()
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
    results: dict[str, dict], metrics_path: Path, plots_path: Path, report_path: Path, context: dict,
    sections: tuple[str, ...] = (), figures: tuple[tuple[str, str], ...] = (),
) -> None:
    """metrics JSON for `dvc metrics`, long CSV for `dvc plots`, the markdown report and its JSON twin
    (report_path with suffix .json), all atomic.

    `context` holds 'merged' (the model's path), 'labels' (model -> method), 'contamination' (counts per
    held-out set) and 'params'; `figures` are (title, path relative to the report) PNGs embedded after
    the table, and `sections` further markdown blocks (e.g. the α summary) after them.
    """
    metrics = {**results, "contamination": context["contamination"]}
    with atomic_path(metrics_path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    rows = ["model,metric,value"] + [f"{n},{k},{m[k]}" for n, m in results.items() for k in TABLE_COLUMNS if k in m]
    with atomic_path(plots_path) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    table = {"columns": TABLE_COLUMNS, "labels": context["labels"], "contamination": context["contamination"],
             "models": results}
    with atomic_path(report_path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(table, indent=2) + "\n")
    report = [
        "# RAIN-Merging evaluation report",
        "",
        f"Merged model: `{context['merged']}`. Held-out prompts found in a calibration set: "
        f"{sum(context['contamination'].values())} ({context['contamination']}).",
        "",
        format_table(results, context["labels"]),
        "",
        "IF prompt / IF instr.: IFEval strict accuracy, prompt level (every instruction followed) and instruction",
        "level; reasoning acc.: the final answer after `</think>` is right; think: emits `<think>`; `</think>` missing:",
        "no `</think>` within the token budget (truncated thinking counts); L_think: mean KL(p_LRM ‖ p_model) at",
        "Ω_think (teacher forced); h drift: mean over layers of ‖h_model − h_LRM‖/‖h_LRM‖ at Ω_think; merge time: wall",
        "seconds of the streamed merge that wrote the model (RAIN's Stage 1–2 statistics not included).",
        "",
        *(f"![{title}]({path})\n" for title, path in figures),
        *sections,
        "Params: `" + json.dumps(context.get("params", {}), sort_keys=True) + "`",
        "",
    ]
    with atomic_path(report_path) as tmp:
        tmp.write_text("\n".join(report))
