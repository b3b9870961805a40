"""Typed params, one model per `params.yaml` section; unknown keys and out-of-range values are refused."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rain_tasks.zoo.config import ZooParams


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsParams(_Section):
    """Where the three checkpoints are (the zoo's outputs by default)."""

    base: str = "models/base"
    itm: str = "models/itm"
    lrm: str = "models/lrm"


class CalibrationParams(_Section):
    reasoning: str = "data/calibration/reasoning.jsonl"
    instruction: str = "data/calibration/instruction.jsonl"


class FeaturesParams(_Section):
    """Stage 1 feature capture at Ω_think."""

    neighbour_radius: int = Field(5, ge=0)
    key_mass: float = Field(0.9, gt=0.0, le=1.0)
    k_mode: Literal["keys", "bilinear"] = "keys"
    max_samples: int | None = Field(None, ge=1)
    max_tokens: int = Field(4096, ge=16)


class ProjectionParams(_Section):
    """Stage 1 protected subspace: by energy fraction, fixed rank, or relative eigenvalue threshold."""

    energy: float = Field(0.99, gt=0.0, le=1.0)
    rank: int | None = Field(None, ge=0)
    rel_threshold: float | None = Field(None, gt=0.0, lt=1.0)
    ridge: float = Field(0.0, ge=0.0)


class AttentionParams(_Section):
    """Stage 2 statistics: pass 1 runs on θ_R + prior·Δ⊥."""

    prior: float = 1.0
    max_samples: int | None = Field(None, ge=1)
    max_tokens: int = Field(4096, ge=16)
    mode: Literal["auto", "eager", "recompute"] = "auto"

    @model_validator(mode="after")
    def _finite(self):
        if not math.isfinite(self.prior):
            raise ValueError("attention.prior must be finite")
        return self


class AlphaParams(_Section):
    """Stage 2 closed-form α per (layer, head)."""

    variant: Literal["two_pass", "anchor_only", "post_only"] = "two_pass"
    rho: float = Field(0.5, ge=0.0)
    lambda_h: float = Field(1.0, ge=0.0)
    mu: float = Field(1.0, ge=0.0)
    l2: float = Field(0.1, gt=0.0)
    l1: float = Field(0.0, ge=0.0)
    box_lo: float = 0.0
    box_hi: float = 1.5

    @model_validator(mode="after")
    def _box(self):
        if not (math.isfinite(self.box_lo) and math.isfinite(self.box_hi)) or self.box_lo > self.box_hi:
            raise ValueError(f"alpha box must satisfy box_lo <= box_hi (got [{self.box_lo}, {self.box_hi}])")
        return self


class MergeParams(_Section):
    """Stage 3: θ = θ_R + λ·α⊙Δ⊥ on the merged modules (scope 'all' also adds embeddings and norms)."""

    lam: float = 1.0
    scope: Literal["linear", "all"] = "linear"
    max_shard_size: str = "2GB"

    @model_validator(mode="after")
    def _finite(self):
        if not math.isfinite(self.lam):
            raise ValueError("merge.lam must be finite")
        return self


class BaselineSpec(_Section):
    """One baseline merge evaluated beside RAIN."""

    name: str
    method: Literal["task_arithmetic"] = "task_arithmetic"
    lam: float = 1.0
    scope: Literal["linear", "all"] = "all"


class BaselinesParams(_Section):
    runs: list[BaselineSpec] = Field(default_factory=list)


class EvaluateParams(_Section):
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    max_eval: int | None = Field(None, ge=1)
    neighbour_radius: int = Field(5, ge=0)


class Params(_Section):
    """All of params.yaml."""

    zoo: ZooParams = Field(default_factory=ZooParams)
    models: ModelsParams = Field(default_factory=ModelsParams)
    calibration: CalibrationParams = Field(default_factory=CalibrationParams)
    features: FeaturesParams = Field(default_factory=FeaturesParams)
    projection: ProjectionParams = Field(default_factory=ProjectionParams)
    attention: AttentionParams = Field(default_factory=AttentionParams)
    alpha: AlphaParams = Field(default_factory=AlphaParams)
    merge: MergeParams = Field(default_factory=MergeParams)
    baselines: BaselinesParams = Field(default_factory=BaselinesParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse and validate params.yaml; errors name the offending key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found (run from the project root or pass --params)")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ValueError(f"{path}: invalid params:\n  " + "\n  ".join(lines)) from None
