"""TIES, DARE and SLERP against their definitions on hand-checkable tensors, and streamed through the engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rain_tasks.io.arch import module_of
from rain_tasks.methods.ops import combine_task_vectors, dare_drop, elect_sign_mask, slerp, tensor_seed, trim_top_magnitude
from rain_tasks.io.checkpoint import Checkpoint, read_metadata
from rain_tasks.merge.engine import DeltaPlan, TensorDir, merge_checkpoint
from rain_tasks.methods import METHODS, TensorInputs
from rain_tasks.params import RUN_MODELS, BaselinesParams, ModelsParams, load_params
from rain_tasks.pipeline.stages import BASELINES
from rain_tasks.pipeline.runner import run_stage

T = torch.tensor
ROOT = Path(__file__).resolve().parents[1]

TaskArithmeticRun, TiesRun, DareRun, SlerpRun = (RUN_MODELS[m] for m in ("task_arithmetic", "ties", "dare", "slerp"))


def _inputs(base, delta_r, delta_i, name: str = "model.layers.0.self_attn.q_proj.weight") -> TensorInputs:
    """TensorInputs for θ_B = base, θ_R = base + Δ_R, Δ_I."""
    base = T(base)
    return TensorInputs(name, base + T(delta_r), T(delta_i), None, base)


# --- the pieces ---------------------------------------------------------------------------------


def test_trim_keeps_the_top_density_magnitudes():
    d = T([0.1, -3.0, 2.0, -0.5])
    assert torch.equal(trim_top_magnitude(d, 0.5), T([0.0, -3.0, 2.0, 0.0]))
    assert torch.equal(trim_top_magnitude(d, 0.1), T([0.0, -3.0, 0.0, 0.0]))  # at least one entry survives
    assert torch.equal(trim_top_magnitude(d, 1.0), d)
    assert torch.equal(trim_top_magnitude(d.reshape(2, 2), 0.75), T([[0.0, -3.0], [2.0, -0.5]]))


def test_sign_election_and_disjoint_mean():
    deltas = T([[1.0, -2.0, 3.0, 0.0], [2.0, 1.0, -4.0, 0.0]])  # sums 3, -1, -1, 0 -> signs +, -, -, +
    assert torch.equal(elect_sign_mask(deltas), T([[True, True, False, False], [True, False, True, False]]))
    ones = T([1.0, 1.0])
    assert torch.equal(combine_task_vectors(deltas, ones, consensus=True, normalize=True), T([1.5, -2.0, -4.0, 0.0]))
    assert torch.equal(combine_task_vectors(deltas, ones, consensus=True, normalize=False), T([3.0, -2.0, -4.0, 0.0]))
    assert torch.equal(combine_task_vectors(deltas, ones, consensus=False, normalize=False), T([3.0, -1.0, -1.0, 0.0]))
    # weights enter the election and the mean: w = (1, 0.5) -> weighted sums 2, -1.5, 1, 0
    weighted = combine_task_vectors(deltas, T([1.0, 0.5]), consensus=True, normalize=True)
    assert torch.allclose(weighted, T([2.0 / 1.5, -2.0, 3.0, 0.0]))


def test_dare_drops_at_rate_p_and_rescales_survivors():
    d = torch.linspace(0.5, 1.5, 200_000)
    out = dare_drop(d, 0.3, seed=7)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01  # binomial sd 0.001
    assert torch.allclose(out[kept], d[kept] / 0.7)
    assert abs(out.mean().item() / d.mean().item() - 1.0) < 0.01  # unbiased
    assert torch.equal(dare_drop(d, 0.0, seed=7), d)


def test_dare_is_bit_identical_per_seed_and_name_and_independent_of_order_and_global_rng():
    d = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    first = [dare_drop(d, 0.5, tensor_seed(3, n)) for n in (a, b)]
    torch.manual_seed(12345)  # the global generator plays no part
    second = [dare_drop(d, 0.5, tensor_seed(3, n)) for n in (b, a)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0], first[1])  # another tensor name, another mask
    assert not torch.equal(first[0], dare_drop(d, 0.5, tensor_seed(4, a)))  # another seed, another mask
    assert tensor_seed(3, a, 0) != tensor_seed(3, a, 1)  # Δ_R and Δ_I get independent masks


def test_slerp_hand_cases():
    s2 = math.sqrt(0.5)
    assert torch.allclose(slerp(0.5, T([1.0, 0.0]), T([0.0, 1.0])), T([s2, s2]))
    assert torch.allclose(slerp(1 / 3, T([2.0, 0.0]), T([0.0, 2.0])), T([math.sqrt(3.0), 1.0]))  # sin(π/3)·2, sin(π/6)·2
    assert torch.allclose(slerp(0.0, T([3.0, 1.0]), T([-1.0, 2.0])), T([3.0, 1.0]))
    assert torch.allclose(slerp(1.0, T([3.0, 1.0]), T([-1.0, 2.0])), T([-1.0, 2.0]))
    # nearly colinear, antipodal or zero: linear interpolation
    assert torch.allclose(slerp(0.25, T([1.0, 2.0]), T([2.0, 4.0])), T([1.25, 2.5]))
    assert torch.allclose(slerp(0.5, T([1.0, 0.0]), T([-1.0, 0.0])), T([0.0, 0.0]))
    assert torch.allclose(slerp(0.5, T([0.0, 0.0]), T([2.0, 4.0])), T([1.0, 2.0]))
    # a whole matrix is one vector: the midpoint of two orthogonal unit matrices has unit norm
    m = slerp(0.5, T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 0.0], [0.0, 1.0]]))
    assert m.shape == (2, 2) and math.isclose(m.norm().item(), 1.0, rel_tol=1e-6)


# --- the registered methods on one tensor ------------------------------------------------------------


def test_ties_method_is_base_plus_lambda_disjoint_mean_of_trimmed_task_vectors():
    # Δ_R = [1, -2, 3, 0] -> trimmed [0, -2, 3, 0]; Δ_I = [2, 1, -4, 0] -> [2, 0, -4, 0]
    # elected signs of [2, -2, -1, 0]: +, -, -, + -> disjoint mean [2, -2, -4, 0]
    x = _inputs([10.0, 20.0, 30.0, 40.0], [1.0, -2.0, 3.0, 0.0], [2.0, 1.0, -4.0, 0.0])
    out = METHODS["ties"](x, {"density": 0.5, "weights": [1.0, 1.0], "lam": 0.5})
    assert torch.equal(out, T([11.0, 19.0, 28.0, 40.0]))


def test_dare_method_without_drop_is_task_arithmetic_or_ties_without_trim():
    x = _inputs([10.0, 20.0, 30.0, 40.0], [1.0, -2.0, 3.0, 0.0], [2.0, 1.0, -4.0, 0.0])
    params = {"drop": 0.0, "seed": 0, "weights": [1.0, 1.0], "lam": 1.0}
    assert torch.equal(METHODS["dare"](x, {**params, "combine": "linear"}), T([13.0, 19.0, 29.0, 40.0]))
    assert torch.equal(METHODS["dare"](x, {**params, "combine": "ties"}), T([13.0, 18.0, 26.0, 40.0]))


def test_slerp_method_interpolates_lrm_and_itm():
    x = _inputs([0.0, 0.0], [1.0, 0.0], [0.0, 1.0])  # θ_R = e1, θ_I = e2
    s2 = math.sqrt(0.5)
    assert torch.allclose(METHODS["slerp"](x, {"t": 0.5, "dot_threshold": 0.9995}), T([s2, s2]))


def test_methods_leave_tensors_without_update_alone_and_refuse_a_plan_without_base():
    lrm = T([1.0, 2.0])
    untouched = TensorInputs("model.norm.weight", lrm, None, None, None)
    params = {"ties": {"density": 0.5, "weights": [1, 1], "lam": 1.0}, "slerp": {"t": 0.5, "dot_threshold": 0.9995},
              "dare": {"drop": 0.5, "seed": 0, "combine": "linear", "weights": [1, 1], "lam": 1.0}}
    for method, p in params.items():
        assert torch.equal(METHODS[method](untouched, p), lrm)
        with pytest.raises(ValueError, match="needs the base checkpoint"):
            METHODS[method](TensorInputs("w", lrm, T([0.5, 0.5]), None, None), p)


# --- params ---------------------------------------------------------------------------------------


def test_baseline_runs_parse_per_method_and_keep_the_old_schema():
    runs = BaselinesParams.model_validate({"runs": [
        {"name": "old", "lam": 0.5, "scope": "linear"},  # written before `method` existed
        {"name": "t", "method": "ties", "density": 0.3},
        {"name": "d", "method": "dare", "drop": 0.9, "combine": "ties"},
        {"name": "s", "method": "slerp", "t": 0.3},
    ]}).runs
    assert [type(r) for r in runs] == [TaskArithmeticRun, TiesRun, DareRun, SlerpRun]
    assert runs[0].method_params() == {"lam": 0.5}
    assert runs[2].method_params() == {"drop": 0.9, "seed": 0, "combine": "ties", "weights": [1.0, 1.0], "lam": 1.0}
    assert set(runs[3].method_params()) == {"t", "dot_threshold"}
    for bad, msg in (
        ({"name": "x", "method": "tiez"}, "does not match any of the expected tags"),
        ({"name": "x", "method": "dare", "drop": 1.0}, "less than 1"),
        ({"name": "x", "method": "ties", "density": 0.0}, "greater than 0"),
        ({"name": "x", "method": "slerp", "lam": 1.0}, "Extra inputs are not permitted"),
    ):
        with pytest.raises(ValueError, match=msg):
            BaselinesParams.model_validate({"runs": [bad]})
    with pytest.raises(ValueError, match="unique"):
        BaselinesParams.model_validate({"runs": [{"name": "a"}, {"name": "a", "method": "slerp"}]})


# --- streamed through the engine on the tiny family -------------------------------------------------------

RUNS = [
    TiesRun(name="ties", method="ties", density=0.3, weights=(1.0, 0.7), lam=0.9),
    DareRun(name="dare_linear", method="dare", drop=0.4, seed=5, combine="linear", lam=1.0),
    DareRun(name="dare_ties", method="dare", drop=0.4, seed=5, combine="ties", lam=1.0),
    SlerpRun(name="slerp", method="slerp", t=0.4),
]


def _plan(tiny_family, task_vectors, scope: str) -> DeltaPlan:
    tv = TensorDir(task_vectors)
    return DeltaPlan(linear=tv, other=tv if scope == "all" else None, base=Checkpoint(tiny_family["base"]))


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.name)
@pytest.mark.parametrize("scope", ["linear", "all"])
def test_each_method_streams_the_tiny_family(tiny_family, tiny_task_vectors, tmp_path, run, scope):
    """Every tensor of the sharded output is the method applied to that tensor read from base/ITM/LRM; the model loads."""
    out = tmp_path / run.name
    merge_checkpoint(tiny_family["lrm"], out, run.method, run.method_params(), _plan(tiny_family, tiny_task_vectors, scope),
                     max_shard_size=20_000)
    base, itm, lrm = (Checkpoint(tiny_family[k]) for k in ("base", "itm", "lrm"))
    merged = Checkpoint(out)
    assert merged.names() == lrm.names() and len(merged.shards) >= 2
    changed = 0
    for name in lrm.names():
        theta_r = lrm.get(name).float()
        if scope == "linear" and module_of(name) is None:
            expected = theta_r
        else:
            theta_b = base.get(name).float()
            x = TensorInputs(name, theta_r, itm.get(name).float() - theta_b, None, theta_b)
            expected = METHODS[run.method](x, run.method_params())
        assert torch.equal(merged.get(name), expected), name
        changed += not torch.equal(merged.get(name), theta_r)
    assert changed > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_dare_merge_is_bit_identical_across_runs_and_changes_with_the_seed(tiny_family, tiny_task_vectors, tmp_path):
    plan = _plan(tiny_family, tiny_task_vectors, "all")
    run = RUNS[1]
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        merge_checkpoint(tiny_family["lrm"], tmp_path / name, "dare", {**run.method_params(), "seed": seed}, plan, 20_000)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    a, c = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "c")
    assert not torch.equal(a.get("model.layers.0.mlp.up_proj.weight"), c.get("model.layers.0.mlp.up_proj.weight"))


def test_baselines_stage_runs_every_configured_run(tiny_family, tmp_path):
    """The `baselines` stage with params.yaml's runs: one loadable model per run, tagged with its method and params."""
    project = load_params(ROOT / "params.yaml")
    models = ModelsParams(**{k: str(tiny_family[k]) for k in ("base", "itm", "lrm")})
    params = project.model_copy(update={"models": models})
    run_stage("task_vectors", params, tmp_path)
    run_stage("baselines", params, tmp_path)
    assert {r.method for r in params.baselines.runs} == {"task_arithmetic", "ties", "dare", "slerp"}
    for run in params.baselines.runs:
        out = tmp_path / BASELINES / run.name
        meta = read_metadata(out / Checkpoint(out).shards[0])
        assert meta["merge_method"] == run.method
        assert json.loads(meta["merge_params"]) == run.method_params()
