"""Stage 1 end to end on the tiny family: the projected merge leaves the LRM's computation at Ω_think
(nearly) unchanged, exactly on the calibration traces with the whole feature energy protected and far
less than task arithmetic at the same λ on held-out traces."""

from __future__ import annotations

import pandas as pd
import pytest

from rain_tasks.evaluation import think_invariance
from rain_tasks.features import accumulate_features
from rain_tasks.merge import DeltaPlan, TensorDir, merge_checkpoint
from rain_tasks.params import FeaturesParams, ProjectionParams
from rain_tasks.projection import project
from rain_tasks.task_vectors import compute_task_vectors
from tiny import reasoning_rows, write_jsonl

CALIBRATION, HELDOUT = reasoning_rows(20), reasoning_rows(60)[40:]
RADIUS = 3


@pytest.fixture(scope="module")
def merges(tiny_family, tmp_path_factory):
    """Task arithmetic and RAIN without Stage 2 (α = 1) on the same Linear modules at λ = 1,
    projected with 99.9 % and with all of the feature energy protected."""
    root = tmp_path_factory.mktemp("invariance")
    lrm = tiny_family["lrm"]
    compute_task_vectors(tiny_family["base"], tiny_family["itm"], root / "tv")
    accumulate_features(lrm, write_jsonl(root / "cal.jsonl", CALIBRATION), FeaturesParams(neighbour_radius=RADIUS), root / "feat")
    models = {"LRM": lrm, "task_arithmetic": root / "tv"}
    for energy in (0.999, 1.0):
        project(root / "tv", root / "feat", ProjectionParams(energy=energy), root / f"proj{energy}", root / f"report{energy}.parquet")
        models[f"energy {energy}"] = root / f"proj{energy}"
    for name, delta in list(models.items())[1:]:
        merge_checkpoint(lrm, root / name, "rain", {"lam": 1.0}, DeltaPlan(linear=TensorDir(delta)), "1MB")
        models[name] = root / name
    return models, root


def test_full_energy_projection_is_invariant_on_the_calibration_traces(tiny_family, merges):
    models, _ = merges
    result = think_invariance(tiny_family["lrm"], models, CALIBRATION, RADIUS)
    assert result["LRM"] == {"l_think": 0.0, "h_drift": 0.0}
    assert result["task_arithmetic"]["h_drift"] > 0.1  # the ITM update does move the LRM where it thinks
    assert result["energy 1.0"]["h_drift"] < 1e-3 * result["task_arithmetic"]["h_drift"]
    assert result["energy 1.0"]["l_think"] < 1e-6


def test_projection_keeps_hidden_states_at_omega_on_heldout_traces(tiny_family, merges):
    models, root = merges
    result = think_invariance(tiny_family["lrm"], models, HELDOUT, RADIUS)
    ta, rain = result["task_arithmetic"], result["energy 0.999"]
    assert rain["h_drift"] < 0.2 * ta["h_drift"] and rain["l_think"] < 0.2 * ta["l_think"]  # 5x less, at least
    kept = pd.read_parquet(root / "report0.999.parquet")["norm_ratio"]
    assert kept.mean() > 0.05  # and the projected update is not simply zero
