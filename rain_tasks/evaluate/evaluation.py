"""Evaluation: behaviour on held-out instruction problems, think-format KL, and the comparison report.

Behaviour (think rate, IFEval prompt- and instruction-level strict accuracy, answer accuracy,
`</think>` missing rate) comes from greedy generation (`rain_tasks.model.generation`); L_think =
mean KL(p_LRM ‖ p_model) of next-token distributions at Ω_think positions of held-out reasoning
traces, teacher forced, and h_drift the relative change of the hidden states there (Stage 1's
end-to-end invariance). Because Stage 1 constrains exactly Ω, three metrics look elsewhere: the KL
at the `</think>`-predicting position alone, the `</think>` probability mass over the other thinking
positions (closing early), and the KL on the thinking the model itself generates. The held-out sets must share no prompt with a calibration set
(`contaminated_prompts`), or the numbers would measure memorised calibration data.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from tqdm import tqdm

from rain_tasks.model.calibration import load_tokenizer, render_sample, think_positions, think_token_ids
from rain_tasks.io.artifacts import atomic_path, write_json, write_text
from rain_tasks.model.runtime import CPU, forward_dtype, input_device, load_causal_lm
from rain_tasks.model.generation import GREEDY, Sampling, generate_ids, load_model
from rain_tasks.evaluate.behaviour import behaviour_metrics
from rain_tasks.params import EvaluateParams, RuntimeParams
from rain_tasks.io.plots import lines, scatter_lines
from rain_tasks.io.schemas import load_records

log = logging.getLogger(__name__)

#: metrics shown in the comparison table, in order, with their headers
TABLE_COLUMNS = {
    "comply_rate": "IF prompt",
    "comply_instruction_rate": "IF instr.",
    "correct_rate": "reasoning acc.",
    "close_correct_rate": "closed ∧ correct",
    "think_rate": "think",
    "missing_close_rate": "`</think>` missing",
    "l_think": "L_think",
    "kl_close": "KL at `</think>`",
    "early_close_mass": "early close mass",
    "kl_own": "KL own thinking",
    "h_drift": "h drift",
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


def lambda_table(results: dict[str, dict], runs: list[dict]) -> pd.DataFrame:
    """The task-arithmetic baselines' metrics against λ (one row per run), by scope."""
    rows = [{"model": r["name"], "lam": r["lam"], "scope": r["scope"], **{k: results[r["name"]][k] for k in LAMBDA_METRICS}}
            for r in runs if r["method"] == "task_arithmetic" and r["name"] in results]
    return pd.DataFrame(rows, columns=["model", "lam", "scope", *LAMBDA_METRICS]).sort_values(["scope", "lam"], kind="stable")


FRONTIER_METRICS = ["comply_rate", "close_correct_rate", "l_think", "kl_own"]


def frontier_table(results: dict[str, dict], models: dict[str, tuple[str, float]]) -> pd.DataFrame:
    """One row per (method, λ) model: the compliance, the share of replies that close `</think>` and are correct,
    and the thinking costs; `models` maps model name -> (method, λ)."""
    rows = [{"model": name, "method": method, "lam": lam, **{k: results[name].get(k) for k in FRONTIER_METRICS}}
            for name, (method, lam) in models.items() if name in results]
    return pd.DataFrame(rows, columns=["model", "method", "lam", *FRONTIER_METRICS]).sort_values(["method", "lam"], kind="stable")


def write_frontier(table: pd.DataFrame, csv_path: Path, png_path: Path) -> None:
    """The frontier table (`dvc plots` data) and its figure: compliance against L_think and against close∧correct."""
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    scatter_lines(table, ["l_think", "close_correct_rate"], "comply_rate", "method", "lam", png_path,
                  "compliance against thinking cost, over λ")


def write_lambda_sweep(table: pd.DataFrame, csv_path: Path, png_path: Path) -> bool:
    """Write the λ table (`dvc plots` data) and its line plot; True if some scope has two λ values or more."""
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    lines(table, "lam", LAMBDA_METRICS, png_path, "task arithmetic θ_R + λ·Δ_I against λ", group="scope")
    return bool(len(table)) and int(table.groupby("scope")["lam"].nunique().max()) >= 2


class Trace(NamedTuple):
    """A held-out reasoning trace as the LRM sees it: token ids, Ω_think, the position that predicts `</think>`,
    and the other thinking positions (where predicting `</think>` would close the block early)."""

    ids: list[int]
    omega: list[int]
    close_pred: int
    early: list[int]


class AtOmega(NamedTuple):
    """One model's teacher-forced view of the traces: log next-token distributions at Ω and at the `</think>`-
    predicting position, decoder-layer outputs at Ω, and p(`</think>`) summed over each trace's other thinking positions."""

    log_probs: list[torch.Tensor]  # per trace [|Ω|, V]
    close_log_probs: torch.Tensor  # [traces, V]
    hidden: list[torch.Tensor]  # per trace [L, |Ω|, d]
    early_close_mass: torch.Tensor  # [traces]


@torch.no_grad()
def at_omega(model, traces: list[Trace], close_id: int) -> AtOmega:
    """The model's distributions and hidden states on the traces (see AtOmega), gathered on the CPU."""
    log_probs, close, hidden, early = [], [], [], []
    device = input_device(model)
    for t in traces:
        out = model(torch.tensor([t.ids], device=device), output_hidden_states=True)
        logits = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()
        log_probs.append(logits[t.omega])
        close.append(logits[t.close_pred])
        early.append(logits[t.early, close_id].exp().sum())
        # hidden_states[0] is the embedding output; 1..L-1 are layer outputs and the last is after the final norm
        hidden.append(torch.stack([h[0, t.omega].to("cpu", torch.float64) for h in out.hidden_states[1:]]))
    return AtOmega(log_probs, torch.stack(close), hidden, torch.stack(early))


def encode_traces(lrm_dir: str | Path, traces: list[dict], radius: int) -> tuple[list[Trace], int]:
    """Each trace rendered with the LRM's tokenizer and template (see Trace), and the `</think>` token id."""
    tok = load_tokenizer(lrm_dir)
    encoded = []
    for row in traces:
        r = render_sample(tok, row["prompt"], row["reasoning"], row["response"])
        omega = think_positions(r, radius)
        early = [p for p in range(r.think_open + 1, r.think_close - 1) if p not in set(omega)]
        encoded.append(Trace(r.input_ids, omega, r.think_close - 1, early))
    return encoded, think_token_ids(tok)[1]


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis, from log-probabilities."""
    return (p.exp() * (p - q)).sum(-1)


def invariance(reference: AtOmega, model, traces: list[Trace], close_id: int) -> dict[str, float]:
    """Thinking-format metrics of one model against the LRM's view of the traces: L_think (KL at Ω), h_drift (hidden
    states at Ω), kl_close (KL at the `</think>`-predicting position alone) and early_close_mass (mean over traces
    of Σ p(`</think>`) at the other thinking positions: a merge that pins Ω can still close the block early)."""
    view = at_omega(model, traces, close_id)
    ref_hidden = torch.cat(reference.hidden, dim=1)
    diff = torch.linalg.vector_norm(torch.cat(view.hidden, dim=1) - ref_hidden, dim=(1, 2))
    drift = diff / torch.linalg.vector_norm(ref_hidden, dim=(1, 2))
    return {
        "l_think": float(torch.cat([_kl(p, q) for p, q in zip(reference.log_probs, view.log_probs)]).mean()),
        "h_drift": float(drift.mean()),
        "kl_close": float(_kl(reference.close_log_probs, view.close_log_probs).mean()),
        "early_close_mass": float(view.early_close_mass.mean()),
    }


@torch.no_grad()
def own_generation_kl(reference_model, model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> float:
    """Mean KL(p_LRM ‖ p_model) over the thinking tokens (up to and including the first `</think>`) of the model's
    OWN greedy continuations, both teacher forced on them: the thinking it really produces, not only LRM traces."""
    close_id = think_token_ids(tokenizer)[1]
    kls = []
    for prompt, generated in generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size):
        thinking = generated[: generated.index(close_id) + 1] if close_id in generated else generated
        if not thinking:
            continue
        at = slice(len(prompt) - 1, len(prompt) - 1 + len(thinking))  # the positions predicting the thinking tokens
        p, q = (torch.log_softmax(m(torch.tensor([prompt + thinking], device=input_device(m))).logits[0, at].float(), -1).cpu()
                for m in (reference_model, model))
        kls.append(_kl(p, q))
    return float(torch.cat(kls).mean()) if kls else float("nan")


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
    the LRM once more as the reference of the KL on each model's own generations; all on `runtime`'s device and
    dtype, and replies are drawn with `sampling`."""
    problems = load_records(instruction_eval, "instruction_eval")[:max_eval]
    traces = load_records(reasoning_eval, "reasoning")[:max_eval]
    encoded, close_id = encode_traces(lrm_dir, traces, radius)
    lrm = load_model(lrm_dir, runtime)[0]
    reference = at_omega(lrm, encoded, close_id)
    results = {}
    for name, path in tqdm(model_dirs.items(), desc="evaluate", unit="model"):
        model, tok = load_model(path, runtime)
        m = behaviour_metrics(model, tok, problems, max_new_tokens=max_new_tokens, batch_size=batch_size, sampling=sampling)
        kl_own = own_generation_kl(lrm, model, tok, [t["prompt"] for t in traces], max_new_tokens, batch_size)
        results[name] = {**m, **invariance(reference, model, encoded, close_id), "kl_own": kl_own}
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
    write_json(metrics_path, metrics)
    rows = ["model,metric,value"] + [f"{n},{k},{m[k]}" for n, m in results.items() for k in TABLE_COLUMNS if k in m]
    write_text(plots_path, "\n".join(rows) + "\n")
    table = {"columns": TABLE_COLUMNS, "labels": context["labels"], "contamination": context["contamination"],
             "models": results}
    write_json(report_path.with_suffix(".json"), table, sort_keys=False)
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
        "Ω_think (teacher forced); h drift: mean over layers of ‖h_model − h_LRM‖/‖h_LRM‖ at Ω_think.",
        "Merge wall times are in the merging stages' run records (`.rain/runs/`), not here: this report depends on",
        "its inputs only.",
        "",
        *(f"![{title}]({path})\n" for title, path in figures),
        *sections,
        "Params: `" + json.dumps(context.get("params", {}), sort_keys=True) + "`",
        "",
    ]
    write_text(report_path, "\n".join(report))
