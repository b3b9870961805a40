"""In-memory task-arithmetic probe of the tiny family: does the ITM's skill transfer into the LRM?

For the tiny family only: it holds all three models in memory. Real checkpoints go through
the project's streaming merge engine instead.
"""

from __future__ import annotations

import json
from pathlib import Path


from rain_tasks.arch import module_of
from rain_tasks.generation import behaviour_metrics, load_model


def task_arithmetic_sweep(models_dir: Path, eval_path: Path, lambdas: list[float],
                          scope: str = "all", max_new_tokens: int = 48) -> list[dict]:
    """Behaviour metrics of θ_R + λ(θ_I − θ_B) for each λ; scope "all" or "linear" (decoder Linear layers)."""
    if scope not in ("all", "linear"):
        raise ValueError(f"scope must be 'all' or 'linear', not {scope!r}")
    models_dir = Path(models_dir)
    lrm, tokenizer = load_model(models_dir / "lrm")
    base = load_model(models_dir / "base")[0].state_dict()
    itm = load_model(models_dir / "itm")[0].state_dict()
    theta_r = {k: v.clone() for k, v in lrm.state_dict().items()}  # load_state_dict writes in place
    delta = {k: itm[k].float() - base[k].float() for k in theta_r
             if scope == "all" or module_of(k) is not None}
    rows = [json.loads(line) for line in Path(eval_path).read_text().splitlines() if line.strip()]
    results = []
    for lam in lambdas:
        merged = {k: (v.float() + lam * delta[k]).to(v.dtype) if k in delta else v
                  for k, v in theta_r.items()}
        lrm.load_state_dict(merged)
        metrics = behaviour_metrics(lrm, tokenizer, rows, max_new_tokens)
        results.append({"lambda": lam, "scope": scope, **metrics})
    return results
