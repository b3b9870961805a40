"""A merge method is one typed function registered once: its params model, its need for θ_B and its docs come from
its signature, and the engine's Method call handles "no Δ for this tensor" for every method."""

from __future__ import annotations

from typing import Annotated

import pytest
import torch
from pydantic import Field, ValidationError

from rain_tasks.methods import METHODS, TensorInputs, get_method, merge_method
from rain_tasks.params import RUN_MODELS


def test_the_signature_gives_params_model_inputs_and_docs():
    ties = METHODS["ties"]
    assert ties.needs_base and ties.inputs == ("lrm", "delta", "base")
    assert list(ties.params.model_fields) == ["density", "weights", "lam"]
    assert ties.params().density == 0.2 and ties.doc.startswith("θ_B + λ·TIES")
    with pytest.raises(ValidationError, match="greater than 0"):
        ties.params(density=0.0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        ties.params(densty=0.5)
    assert not METHODS["rain"].needs_base and METHODS["rain"].inputs == ("lrm", "delta", "scale")


def test_baseline_runs_are_built_from_the_registry():
    assert set(RUN_MODELS) == {name for name, m in METHODS.items() if m.baseline} and "rain" not in RUN_MODELS
    run = RUN_MODELS["dare"](name="d", method="dare", drop=0.3)
    assert run.method_params() == {"drop": 0.3, "seed": 0, "combine": "linear", "weights": [1.0, 1.0], "lam": 1.0}
    assert RUN_MODELS["task_arithmetic"](name="ta").method == "task_arithmetic"  # the original schema: no method key


def test_a_registered_method_runs_through_the_one_no_delta_guard():
    @merge_method("test_double")
    def double(lrm: torch.Tensor, delta: torch.Tensor, *, k: Annotated[float, Field(gt=0)] = 2.0) -> torch.Tensor:
        """θ_R + k·Δ."""
        return lrm + k * delta

    try:
        m, lrm = get_method("test_double"), torch.tensor([1.0, 2.0])
        assert torch.equal(m(TensorInputs("w", lrm, torch.tensor([1.0, 1.0]), None), {"k": 3.0}), torch.tensor([4.0, 5.0]))
        assert m(TensorInputs("norm", lrm, None, None), {}) is lrm  # no Δ: θ_R itself, the method never called
        with pytest.raises(ValueError, match="registered twice"):
            merge_method("test_double")(double)
    finally:
        METHODS.pop("test_double")


def test_a_malformed_method_is_refused_at_registration():
    with pytest.raises(TypeError, match="tensor parameters"):
        merge_method("bad")(lambda lrm, theta: lrm)
    with pytest.raises(TypeError, match="needs a default"):
        merge_method("bad")(lambda lrm, delta, *, lam: lrm)
    with pytest.raises(ValueError, match="unknown merge method 'tiez'"):
        get_method("tiez")
