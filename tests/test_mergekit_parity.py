"""Our TIES, DARE and SLERP against mergekit 0.1.5 on the tiny family written to disk (offline, local dirs).

Same inputs, same parameters; mergekit merges with base_model = θ_B for TIES/DARE (models: LRM and
ITM) and base_model = θ_R for SLERP. Tolerances:
- TIES, SLERP, and DARE with drop 0: every tensor allclose at atol 1e-6, rtol 1e-5 (fp32; the two
  implementations order their fp32 operations differently, and our SLERP forms θ_I as θ_B + Δ_I,
  about one ulp away from the ITM's stored weights).
- DARE with drop p > 0: the masks come from different generators, and mergekit 0.1.5 rescales
  survivors to keep each task vector's L1 norm where DARE (and we) use 1/(1−p), so only statistics
  are compared, pooled over the whole model (≈ 20k entries): the share of entries where both task
  vectors were dropped (p², binomial sd ≈ 0.003; tolerance 0.02), the regression coefficient of the
  merged update on its expectation w_R·Δ_R + w_I·Δ_I (1, sd ≈ 0.01; tolerance 0.05) and the ratio of
  the two implementations' update norms (1; tolerance 0.05).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

mergekit_merge = pytest.importorskip(
    "mergekit.merge", reason="mergekit is not installed (test dependency: pip install --no-deps -r requirements-test.txt)"
)
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

from rain_tasks.io.checkpoint import Checkpoint  # noqa: E402
from rain_tasks.merge.engine import DeltaPlan, TensorDir, merge_checkpoint  # noqa: E402
from rain_tasks.params import RUN_MODELS  # noqa: E402

TiesRun, DareRun, SlerpRun = (RUN_MODELS[m] for m in ("ties", "dare", "slerp"))

ATOL, RTOL = 1e-6, 1e-5
WEIGHTS = (1.0, 0.7)


@pytest.fixture(scope="module")
def family(tiny_family, tiny_task_vectors) -> dict[str, Path]:
    return {**tiny_family, "tv": tiny_task_vectors}


def _ours(family, run, out: Path) -> Checkpoint:
    tv = TensorDir(family["tv"])
    plan = DeltaPlan(linear=tv, other=tv, base=Checkpoint(family["base"]))
    merge_checkpoint(family["lrm"], out, run.method, run.method_params(), plan, max_shard_size=20_000)
    return Checkpoint(out)


def _mergekit(config: dict, out: Path) -> Checkpoint:
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    mergekit_merge.run_merge(MergeConfiguration.model_validate({**config, "dtype": "float32"}), str(out), options)
    return Checkpoint(out)


def _task_vector_config(family, method: str, lam: float, **per_model) -> dict:
    """mergekit's generalized task arithmetic: base_model θ_B, models LRM (w_R) and ITM (w_I)."""
    models = [{"model": str(family[k]), "parameters": {"weight": w, **per_model}} for k, w in zip(("lrm", "itm"), WEIGHTS)]
    return {"merge_method": method, "base_model": str(family["base"]), "models": models, "parameters": {"lambda": lam}}


def _assert_same(ours: Checkpoint, theirs: Checkpoint) -> None:
    assert set(theirs.names()) == set(ours.names())
    for name in ours.names():
        torch.testing.assert_close(ours.get(name), theirs.get(name), atol=ATOL, rtol=RTOL, msg=name)


def test_ties_matches_mergekit(family, tmp_path):
    run = TiesRun(name="ties", method="ties", density=0.3, weights=WEIGHTS, lam=0.9)
    theirs = _mergekit(_task_vector_config(family, "ties", run.lam, density=run.density), tmp_path / "mk")
    _assert_same(_ours(family, run, tmp_path / "ours"), theirs)


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_without_drop_matches_mergekit(family, tmp_path, combine):
    run = DareRun(name="dare", method="dare", drop=0.0, combine=combine, weights=WEIGHTS, lam=0.9)
    theirs = _mergekit(_task_vector_config(family, f"dare_{combine}", run.lam, density=1.0), tmp_path / "mk")
    _assert_same(_ours(family, run, tmp_path / "ours"), theirs)


def _updates(family, merged: Checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled over every tensor: the merged update θ − θ_B and its DARE expectation w_R·Δ_R + w_I·Δ_I."""
    base, lrm, itm = (Checkpoint(family[k]) for k in ("base", "lrm", "itm"))
    updates, expected = [], []
    for name in base.names():
        theta_b = base.get(name).float()
        updates.append((merged.get(name).float() - theta_b).reshape(-1))
        expected.append((WEIGHTS[0] * (lrm.get(name).float() - theta_b) + WEIGHTS[1] * (itm.get(name).float() - theta_b)).reshape(-1))
    return torch.cat(updates).double(), torch.cat(expected).double()


def test_dare_linear_with_drop_matches_mergekit_in_distribution(family, tmp_path):
    p = 0.5
    run = DareRun(name="dare", method="dare", drop=p, seed=0, combine="linear", weights=WEIGHTS, lam=1.0)
    ours = _updates(family, _ours(family, run, tmp_path / "ours"))
    theirs = _updates(family, _mergekit(_task_vector_config(family, "dare_linear", 1.0, density=1 - p), tmp_path / "mk"))
    assert torch.equal(ours[1], theirs[1]) and ours[1].numel() > 10_000
    for update, expected in (ours, theirs):
        assert abs((update == 0).double().mean().item() - p * p) < 0.02
        assert abs((update @ expected).item() / (expected @ expected).item() - 1.0) < 0.05
    assert abs(ours[0].norm().item() / theirs[0].norm().item() - 1.0) < 0.05


def test_slerp_matches_mergekit(family, tmp_path):
    run = SlerpRun(name="slerp", method="slerp", t=0.3)
    config = {"merge_method": "slerp", "base_model": str(family["lrm"]),
              "models": [{"model": str(family["lrm"])}, {"model": str(family["itm"])}], "parameters": {"t": run.t}}
    _assert_same(_ours(family, run, tmp_path / "ours"), _mergekit(config, tmp_path / "mk"))
