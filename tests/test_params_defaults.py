"""Defaults live in one place: params.yaml spells out every key (so DVC tracks every value a stage reads) and the
code's defaults are the same values (a caller that builds params in code gets what the pipeline runs)."""

from __future__ import annotations

from pathlib import Path

import yaml

from rain_tasks.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
#: lists of runs, not defaults: params.yaml configures them, the code starts empty
NOT_DEFAULTS = {"baselines.runs"}


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists and tuples stay leaves, as lists)."""
    if isinstance(node, dict) and node:
        return {k: v for key, sub in node.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): list(node) if isinstance(node, tuple) else node}


def test_params_yaml_spells_out_every_key_with_the_code_default():
    written = _leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    defaults = _leaves(Params().model_dump(mode="json"))
    assert sorted(set(defaults) - set(written)) == [], "keys only the code sets: add them to params.yaml"
    differ = {k: (written[k], defaults[k]) for k in defaults if k not in NOT_DEFAULTS and written[k] != defaults[k]}
    assert differ == {}, "params.yaml and the code defaults disagree (yaml, code)"


def test_params_yaml_loads_to_the_defaults_but_for_the_runs():
    assert load_params(ROOT / "params.yaml").model_dump(exclude={"baselines"}) == Params().model_dump(exclude={"baselines"})
