"""The neighbouring methods in the DAG: the `neighbours` stage's models against their definitions on the mini
project's own artifacts, their lineage, run record and evaluation rows; and the engine leaving a tensor without a Δ
at θ_B for ReasonAny's native direction."""

from __future__ import annotations

import json

import pytest
import torch

from rain_tasks.audit.lineage import verify_lineage
from rain_tasks.data_aware.aim import load_relaxations
from rain_tasks.data_aware.reasonany import DOMAIN, REASONING, reasonany_method, write_tensor_dir
from rain_tasks.io.arch import module_of
from rain_tasks.io.checkpoint import Checkpoint, load_tensors
from rain_tasks.merge.engine import DeltaPlan, TensorDir, merge_checkpoint
from rain_tasks.methods import TensorInputs
from rain_tasks.params import Params, load_params
from rain_tasks.pipeline.runs import read_runs
from rain_tasks.pipeline.stages import AIM_STATS, BASELINES, NEIGHBOUR_WORK, NEIGHBOURS, neighbour_names


def _all(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a per-layer tensor directory."""
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_tensors(f).items()}


@pytest.mark.slow
def test_neighbour_models_follow_their_definitions_and_are_reported(mini_repro):
    """AIM-TIES = the TIES baseline relaxed by the stage's statistic; SAGE = θ_R + λΔ'; ReasonAny = θ_B + Δ on its
    masks; each with a verified lineage, a merge time in the run record and a row in metrics/eval.json."""
    root = mini_repro[0]
    p = load_params(root / "params.yaml")
    aim_name, sage_name, reasonany_name = neighbour_names(p)
    ties = next(run for run in p.baselines.runs if run.method == "ties")
    assert ties.method_params() == p.aim.wrapped.method_params() and ties.scope == p.aim.wrapped.scope
    base, lrm, itm = (Checkpoint(root / getattr(p.models, m)) for m in ("base", "lrm", "itm"))
    aim, ties_model = Checkpoint(root / NEIGHBOURS / aim_name), Checkpoint(root / BASELINES / ties.name)
    r = load_relaxations(root / AIM_STATS, p.aim.omega)
    assert len(r) == 7 * sum(1 for n in base.names() if n.endswith("q_proj.weight"))
    for name in base.names():
        b = base.get(name)
        want = (ties_model.get(name) - b) * r[name] if name in r else ties_model.get(name) - b
        torch.testing.assert_close(aim.get(name) - b, want, rtol=0, atol=1e-6)

    sage, delta = Checkpoint(root / NEIGHBOURS / sage_name), _all(root / NEIGHBOUR_WORK / "sage")
    for name in lrm.names():
        want = lrm.get(name) + p.sage.lam * delta[name] if name in delta else lrm.get(name)
        torch.testing.assert_close(sage.get(name), want, rtol=0, atol=1e-6)
    assert set(delta) == {n for n in lrm.names() if module_of(n) is not None}

    ra, masks = Checkpoint(root / NEIGHBOURS / reasonany_name), root / NEIGHBOUR_WORK / "reasonany_masks"
    dom, rea = _all(masks / DOMAIN), _all(masks / REASONING)
    q = p.reasonany
    for name in base.names():
        b, m_x, m_r = base.get(name), dom[name].expand(base.shape(name)), rea[name].expand(base.shape(name))
        want = torch.where(m_x, q.lam_domain * (itm.get(name) - b), torch.where(m_r, q.lam_reasoning * (lrm.get(name) - b), 0.0))
        torch.testing.assert_close(ra.get(name) - b, want, rtol=0, atol=1e-6)

    [run] = read_runs(root, "neighbours")
    metrics = json.loads((root / "metrics/eval.json").read_text())
    report = (root / "reports/report.md").read_text()
    for name in (aim_name, sage_name, reasonany_name):
        assert verify_lineage(root / NEIGHBOURS / name, root).ok, name
        assert run["models"][name]["merge_time_s"] > 0
        assert {"close_rate", "correct_rate", "comply_rate", "l_think"} <= set(metrics[name])
        assert f"| {name} " in report or f"{name} |" in report, name
    assert "SAGE (experimental)" in report and "AIM: ties" in report


def test_native_reasonany_leaves_tensors_without_a_delta_at_the_base(tiny_family, tiny_task_vectors, tmp_path):
    """Scope 'linear' (no Δ for norms and embeddings): native ReasonAny gives θ_B there, ours θ_R; on the Linear
    modules θ_B + Δ on the masks either way for native."""
    base, lrm, itm = (Checkpoint(tiny_family[m]) for m in ("base", "lrm", "itm"))
    gen = torch.Generator().manual_seed(0)
    draw = {n: torch.rand(base.shape(n), generator=gen) for n in base.names()}
    write_tensor_dir({n: d < 0.3 for n, d in draw.items()}, tmp_path / "masks" / DOMAIN, {})
    write_tensor_dir({n: d > 0.8 for n, d in draw.items()}, tmp_path / "masks" / REASONING, {})
    plan = DeltaPlan(TensorDir(tiny_task_vectors), base=Checkpoint(tiny_family["base"]))
    lams = {"lam_domain": 1.0, "lam_reasoning": 1.0}
    for direction in ("native", "lrm"):
        merge_checkpoint(tiny_family["lrm"], tmp_path / direction, reasonany_method(tmp_path / "masks", direction), lams, plan)
    native, ours = Checkpoint(tmp_path / "native"), Checkpoint(tmp_path / "lrm")
    untouched = [n for n in base.names() if module_of(n) is None]
    assert untouched
    for name in untouched:
        assert torch.equal(native.get(name), base.get(name)), name
        assert torch.equal(ours.get(name), lrm.get(name)), name
    for name in (n for n in base.names() if module_of(n) is not None):
        b, m_x, m_r = base.get(name), draw[name] < 0.3, draw[name] > 0.8
        want = torch.where(m_x, itm.get(name), torch.where(m_r, lrm.get(name), b))
        torch.testing.assert_close(native.get(name), want, rtol=0, atol=1e-6)
    method = reasonany_method(tmp_path / "masks", "native")
    with pytest.raises(ValueError, match="needs the base checkpoint"):
        method(TensorInputs(untouched[0], lrm.get(untouched[0]), None, None, None), lams)


def test_neighbour_params_are_refused_up_front():
    """Bad values of the three sections fail at params validation; a block longer than the model's positions at the
    input check, naming the key and the limit."""
    from pydantic import ValidationError

    from rain_tasks.pipeline.validation import neighbour_problems

    [problem] = neighbour_problems(Params.model_validate({"aim": {"block_tokens": 512}}), {"max_position_embeddings": 160})
    assert "aim.block_tokens" in str(problem) and "at most 160" in str(problem)
    assert neighbour_problems(Params.model_validate({"aim": {"block_tokens": 160}}), {"max_position_embeddings": 160}) == []

    for bad in ({"aim": {"omega": 1.5}}, {"aim": {"anchor": "itm"}}, {"aim": {"modules": ["q_proj", "lm_head"]}},
                {"aim": {"wrapped": {"name": "sage", "method": "ties"}}}, {"aim": {"wrapped": {"name": "x", "method": "nope"}}},
                {"sage": {"beta": -1.0}}, {"reasonany": {"granularity": "row"}}, {"reasonany": {"direction": "itm"}},
                {"reasonany": {"p_domain": 1.5}}):
        with pytest.raises(ValidationError):
            Params.model_validate(bad)
