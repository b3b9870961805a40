"""In-memory merge probes of the tiny family: does the ITM's skill transfer into the LRM, and does the thinking matter?

For the tiny family only: it holds all three models in memory. Real checkpoints go through
the project's streaming merge engine instead (the same per-tensor merge methods, `rain_tasks.methods.METHODS`).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rain_tasks.io.arch import module_of
from rain_tasks.model.generation import generate, load_model
from rain_tasks.evaluate.behaviour import behaviour_metrics, score_outputs
from rain_tasks.methods import METHODS, TensorInputs
from rain_tasks.zoo.tasks import think_block

#: what a forced-closed reply starts with: an empty thinking block, closed at once
FORCED_CLOSED = think_block("")


def forced_closed_metrics(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict],
                          max_new_tokens: int, batch_size: int = 64) -> dict:
    """Behaviour metrics when every reply is made to start with `<think>` and `</think>` at once (no chain):
    how well the model answers without thinking (compare correct_rate with `behaviour_metrics`)."""
    texts = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size, reply_prefix=FORCED_CLOSED)
    return score_outputs(rows, [FORCED_CLOSED + text for text in texts])


def _rows(eval_path: Path) -> list[dict]:
    """The JSON lines of an instruction-eval file."""
    return [json.loads(line) for line in Path(eval_path).read_text().splitlines() if line.strip()]


def merge_sweep(models_dir: Path, eval_path: Path, runs: list[dict], max_new_tokens: int = 48) -> list[dict]:
    """Behaviour metrics of each merge run (baselines-section form: method, scope and the method's params) of the
    family's θ_R, θ_I, θ_B, merged per tensor in memory by the registered merge method."""
    models_dir = Path(models_dir)
    unknown = sorted({r["method"] for r in runs} - set(METHODS))
    bad_scope = sorted({r.get("scope", "all") for r in runs} - {"all", "linear"})
    if unknown or bad_scope:
        raise ValueError(f"unknown merge methods {unknown} or scopes {bad_scope}; methods: {sorted(METHODS)}, "
                         "scopes: all, linear")
    lrm, tokenizer = load_model(models_dir / "lrm")
    base = {k: v.float() for k, v in load_model(models_dir / "base")[0].state_dict().items()}
    itm = load_model(models_dir / "itm")[0].state_dict()
    theta_r = {k: v.clone() for k, v in lrm.state_dict().items()}  # load_state_dict writes in place
    rows = _rows(eval_path)
    results = []
    for run in runs:
        linear_only = run.get("scope", "all") == "linear"
        method = METHODS[run["method"]]
        params = method.params.model_validate({k: v for k, v in run.items() if k not in ("method", "scope")})
        merged = {}
        for k, v in theta_r.items():
            delta = None if linear_only and module_of(k) is None else itm[k].float() - base[k]
            merged[k] = method(TensorInputs(k, v.float(), delta, None, base[k]), params).to(v.dtype)
        lrm.load_state_dict(merged)
        results.append({**run, **behaviour_metrics(lrm, tokenizer, rows, max_new_tokens)})
    lrm.load_state_dict(theta_r)
    return results


def task_arithmetic_sweep(models_dir: Path, eval_path: Path, lambdas: list[float],
                          scope: str = "all", max_new_tokens: int = 48) -> list[dict]:
    """Behaviour metrics of θ_R + λ(θ_I − θ_B) for each λ; scope "all" or "linear" (decoder Linear layers)."""
    if scope not in ("all", "linear"):
        raise ValueError(f"scope must be 'all' or 'linear', not {scope!r}")
    runs = [{"method": "task_arithmetic", "lam": lam, "scope": scope} for lam in lambdas]
    return [{"lambda": r["lam"], **r} for r in merge_sweep(models_dir, eval_path, runs, max_new_tokens)]
