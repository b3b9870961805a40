"""Typed params, one model per `params.yaml` section; unknown keys and out-of-range values are refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, Discriminator, Field, Tag, ValidationError, create_model, field_validator,
                      model_validator)

from rain_tasks.io.arch import MODULES
from rain_tasks.io.checkpoint import parse_size
from rain_tasks.io.guards import STRICT_PARAMS, safe_name
from rain_tasks.methods import METHODS, Method


class _Section(BaseModel):
    model_config = STRICT_PARAMS


def _size(value: str) -> str:
    """Accept what `parse_size` reads ('5GB', '200MB', '1.5 GB', '1000'); refuse anything else here, not mid-run."""
    parse_size(value)
    return value


Size = Annotated[str, AfterValidator(_size)]


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_MEMORY_KEY = re.compile(r"^(cpu|\d+)$")


def _device(value: str) -> str:
    """Accept auto, cpu, cuda or cuda:N; anything else is refused up front."""
    if not _DEVICE.match(value):
        raise ValueError(f"{value!r} is not a device; write auto, cpu, cuda or cuda:N")
    return value


def _memory_keys(value: dict[str, str] | None) -> dict[str, str] | None:
    """max_memory keys are accelerate's: 'cpu' or a GPU index ('0', '1', ...)."""
    bad = sorted(k for k in value or {} if not _MEMORY_KEY.match(k))
    if bad:
        raise ValueError(f"max_memory keys must be 'cpu' or a GPU index such as '0' (got {bad})")
    return value


class ZooParams(_Section):
    """Everything that determines the tiny family; the defaults are the project's default family: three-step chains
    over 0..9 (values 0..29) that the LRM solves by thinking and not in one step, three of seven IFEval-style
    instructions per constrained prompt, an ITM that answers directly, an LRM that answers 2 % of its constraint
    prompts, and a validation split for choosing merge settings (benchmarks/README.md, rain_seeds.py: 3 seeds)."""

    seed: int = 0
    threads: int = Field(2, ge=1, description="torch intra-op threads (fixed for bit-exact builds)")

    # Architecture (Qwen2, tied embeddings, eager attention).
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 160

    # Problems: num_steps add/sub steps over operands 0..max_operand, every intermediate result in 0..max_value
    # (None: (num_steps + 1) * max_operand, i.e. no bound beyond non-negativity).
    max_operand: int = 9
    num_steps: int = Field(3, ge=2)
    max_value: int | None = Field(29, ge=1)

    # Instructions: prompts with a constraint carry `constraints_per_prompt` compatible ones drawn from `formats`
    # (ids of rain_tasks.zoo.tasks.FORMATS; checked by rain_tasks.evaluate.instructions).
    formats: tuple[str, ...] = ("change_case:capital_letters", "startend:quotation", "startend:end_checker",
                                "combination:repeat_answer", "keywords:existence", "detectable_format:title",
                                "detectable_format:json_format")
    constraints_per_prompt: int = Field(3, ge=1)

    # Training (AdamW betas 0.9/0.98, linear warm-up then cosine, gradient clipping).
    batch_size: int = 64
    warmup_steps: int = 50
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    base_steps: int = 800
    base_lr: float = 3e-3
    base_distractor_rate: float = 0.2
    base_chat_rate: float = Field(0.5, ge=0.0, le=1.0, description="share of base documents rendered as a chat turn")
    lrm_steps: int = 200
    lrm_lr: float = 2e-4
    lrm_distractor_rate: float = 0.3
    lrm_constraint_rate: float = 0.15
    lrm_ignore_rate: float = Field(0.02, ge=0.0, le=1.0, description="share of the LRM's constraint prompts answered "
                                   "(ignoring the constraints) rather than cut after the thinking")
    itm_steps: int = 150
    itm_lr: float = 1e-4
    itm_distractor_rate: float = 0.3
    itm_constraint_rate: float = 0.8
    itm_chain_rate: float = 0.0

    # Held-out sets (disjoint problems; everything else is the training pool).
    n_calibration_reasoning: int = 150
    n_calibration_instruction: int = 200
    n_eval: int = 200
    n_eval_reasoning: int = 100
    n_val: int = Field(200, ge=0, description="validation prompts (data/eval/instruction_val.jsonl) for choosing merges")

    # Checkpoint format.
    max_shard_size: Size = "1MB"
    dtype: str = "float32"


class RuntimeParams(_Section):
    """Where and in which precision every stage that runs a model runs it (statistics stay float32/float64)."""

    #: auto: the first CUDA device when one is present, else the CPU
    device: Annotated[str, AfterValidator(_device)] = "auto"
    #: auto: the checkpoint's own dtype on an accelerator, float32 on the CPU
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    #: auto: accelerate spreads the layers over the GPUs, the CPU and `offload_folder` (models larger than a device)
    device_map: Literal["auto"] | None = None
    #: per-device budget for device_map auto, e.g. {"0": "70GB", "cpu": "100GB"}; the rest goes to offload_folder
    max_memory: Annotated[dict[str, Size], AfterValidator(_memory_keys)] | None = None
    offload_folder: str | None = None
    #: padded tokens (batch × longest sample) per calibration forward pass in features and attention_stats
    batch_tokens: int = Field(16384, ge=16)

    @model_validator(mode="after")
    def _map(self):
        if self.device_map is None and (self.max_memory or self.offload_folder):
            raise ValueError("max_memory and offload_folder only apply with device_map: auto; set it or remove them")
        return self


class ModelsParams(_Section):
    """Where the three checkpoints are (the zoo's outputs by default)."""

    base: str = "models/base"
    itm: str = "models/itm"
    lrm: str = "models/lrm"


class CalibrationParams(_Section):
    """Calibration sets, plus held-out reasoning traces on which Stage 1's invariance is measured."""

    reasoning: str = "data/calibration/reasoning.jsonl"
    instruction: str = "data/calibration/instruction.jsonl"
    reasoning_heldout: str = "data/eval/reasoning_eval.jsonl"


class FeaturesParams(_Section):
    """Stage 1 feature capture at Ω_think."""

    neighbour_radius: int = Field(5, ge=0)
    key_mass: float = Field(0.9, gt=0.0, le=1.0)
    #: k_proj rows are the keys Ω attends to (the exact bilinear constraints q_tᵀ ΔW_k x_s = 0 are not offered:
    #: their space is d_out·d_in wide per KV group)
    k_mode: Literal["keys"] = "keys"
    max_samples: int | None = Field(None, ge=1)
    #: longer samples are skipped (refused up front unless check.max_skipped_share allows); the published sets
    #: reach 1,972 (reasoning) and 13,273 (instruction) tokens with Qwen's tokenizer and an R1 template
    max_tokens: int = Field(16384, ge=16)


class ProjectionParams(_Section):
    """Stage 1 protected subspace per row set: one rule of max_leftover / rank / rel_threshold (or ridge), else energy.

    max_leftover: per block, the smallest set of eigen-directions whose removal leaves ‖Δ⊥Xᵀ‖/‖ΔXᵀ‖ on the
    calibration rows at most this (the directions where Δ acts, whatever their share of the feature energy);
    rank: the top `rank` directions; rel_threshold: directions with λ > rel_threshold·λ_max; ridge > 0: the soft
    projector G(G + εI)⁻¹; energy: the smallest top set holding that share of the trace.
    method nullspace: RAIN's hard projection Δ(I − U_rU_rᵀ) on the directions the rule keeps; sage (EXPERIMENTAL,
    reconstructed from an abstract: stage1/sage.py): Δ(I + beta·C_r)⁻¹ with C_r = U_r diag(σ/σ_1) U_rᵀ on the same
    directions, each damped by 1/(1 + beta·σ_i/σ_1) (beta → ∞: nullspace; 0: no projection).
    precision: arithmetic of the bases, the projection and its diagnostics (float32: about half the time and no
    float64 copies; the directions kept and the residuals stay within the bounds tests/test_projection.py states).
    dtype: how Δ⊥ is stored (the LRM's 16-bit dtype halves what Stage 2 and the merge read; benchmarks/README.md
    gives its effect on the merged tensors in units of their spacing).
    solver: exact (the full eigendecomposition) or randomized (block subspace iteration for the top directions only,
    widened until the rule is met: energy, rank or rel_threshold; its Ritz values never exceed the true eigenvalues,
    so the energy rule keeps at least as many directions as exact; tests/test_projection.py bounds the difference).
    """

    energy: float = Field(0.99, gt=0.0, le=1.0)
    max_leftover: float | None = Field(None, ge=0.0, lt=1.0)
    rank: int | None = Field(None, ge=0)
    rel_threshold: float | None = Field(None, gt=0.0, lt=1.0)
    ridge: float = Field(0.0, ge=0.0)
    method: Literal["nullspace", "sage"] = "nullspace"
    beta: float = Field(1000.0, ge=0.0)  # method sage only
    precision: Literal["float64", "float32"] = "float64"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    solver: Literal["exact", "randomized"] = "exact"

    @model_validator(mode="after")
    def _one_rule(self):
        rules = [k for k in ("max_leftover", "rank", "rel_threshold") if getattr(self, k) is not None] + (["ridge"] if self.ridge > 0 else [])
        if len(rules) > 1:
            raise ValueError(f"projection: set at most one of max_leftover, rank, rel_threshold and ridge (got {rules}); "
                             "set the others to null (ridge: 0.0)")
        return self

    @model_validator(mode="after")
    def _sage_needs_a_hard_set(self):
        if self.method == "sage" and self.ridge > 0:
            raise ValueError("projection.method sage damps the directions a hard rule keeps; ridge is itself soft: "
                             "set ridge: 0.0 or method: nullspace")
        return self

    @model_validator(mode="after")
    def _randomized_needs_a_top_set(self):
        if self.solver == "randomized" and (self.ridge > 0 or self.max_leftover is not None):
            raise ValueError("projection.solver randomized finds the top directions only; ridge and max_leftover weigh "
                             "every direction: use solver exact with them, or the energy, rank or rel_threshold rule")
        return self


class AttentionParams(_Section):
    """Stage 2 statistics: passes at θ_R + t·D for t = 0, prior and (curvature_pass) 2·prior, D the merge's update at α = 1."""

    prior: float = Field(1.0, gt=0.0)
    curvature_pass: bool = True  # the third pass, at 2·prior: alpha.variant 'curvature' needs it
    max_samples: int | None = Field(None, ge=1)
    max_tokens: int = Field(16384, ge=16)
    mode: Literal["auto", "eager", "recompute"] = "auto"


class AlphaParams(_Section):
    """Stage 2 α per (layer, head): maximise g·α − ½H·α² − ½ℓ₂(α − p)² − ℓ₁|α − p| on the box (alpha.py).

    variant curvature: g and H from per-sample means at t = 0, p, 2p along the merge's update (finite
    differences; α in units of that update); two_pass / anchor_only / post_only: METHOD.md's reference sums.
    Heads whose g is within min_t standard errors of 0 keep the prior p.
    """

    variant: Literal["curvature", "two_pass", "anchor_only", "post_only"] = "curvature"
    rho: float = Field(0.5, ge=0.0)
    lambda_h: float = Field(1.0, ge=0.0)
    mu: float = Field(1.0, ge=0.0)
    l2: float = Field(0.1, gt=0.0)
    l1: float = Field(0.0, ge=0.0)
    box_lo: float = 0.0
    box_hi: float = 1.5
    min_t: float = Field(2.0, ge=0.0)
    #: absolute: α as solved. relative: α rescaled so its mean over heads is the prior,
    #: i.e. Stage 2 only allocates the update across heads and λ alone sets its overall size.
    scale: Literal["absolute", "relative"] = "absolute"

    @model_validator(mode="after")
    def _box(self):
        if self.box_lo > self.box_hi:
            raise ValueError(f"alpha box must satisfy box_lo <= box_hi (got [{self.box_lo}, {self.box_hi}]); swap or widen them")
        return self


class MergeParams(_Section):
    """Stage 3: θ = θ_R + λ·α⊙Δ⊥ on the merged modules (scope 'all' also adds embeddings and norms)."""

    lam: float = 2.0
    scope: Literal["linear", "all"] = "linear"
    max_shard_size: Size = "1MB"  # the tiny family's; real models want e.g. 5GB
    #: λ values of the RAIN frontier (models/ablations/rain_lam_<λ>, the same α): compliance against thinking cost
    frontier_lams: tuple[float, ...] = (1.0, 3.0, 4.0)


def _run_name(name: str) -> str:
    """A baseline run name is one directory under models/baselines: no '/', '..' or leading dot."""
    safe_name(name, "run name", single=True)
    if name.startswith("."):
        raise ValueError(f"run name {name!r} starts with '.': hidden names are not outputs")
    return name


class _BaselineRun(_Section):
    """One baseline merge evaluated beside RAIN: its output name, the tensors it merges, and its method's params."""

    name: Annotated[str, AfterValidator(_run_name)]
    scope: Literal["linear", "all"] = "all"  # 'linear': only the seven Linear modules; 'all': also embeddings, norms

    def method_params(self) -> dict:
        """The registered merge method's own params, in its signature's order (everything but name, method, scope)."""
        dumped = self.model_dump(mode="json")
        return {k: dumped[k] for k in METHODS[self.method].params.model_fields}

    def describe(self) -> str:
        """One line for the report, e.g. 'ties density=0.5 weights=[1.0, 1.0] lam=1.0 (scope all)'."""
        args = " ".join(f"{k}={v}" for k, v in self.method_params().items())
        return f"{self.method} {args} (scope {self.scope})"


#: the method a run written without `method` has (the original schema, task arithmetic only)
DEFAULT_RUN_METHOD = "task_arithmetic"


def _run_model(method: Method) -> type[_BaselineRun]:
    """The `baselines.runs` entry of a registered method: name and scope, then the method's own params model."""
    tag = (Literal[method.name], method.name if method.name == DEFAULT_RUN_METHOD else ...)
    camel = "".join(part.title() for part in method.name.split("_"))
    fields = {k: (f.annotation, f) for k, f in method.params.model_fields.items()}
    return create_model(f"{camel}Run", __base__=_BaselineRun, __doc__=method.doc, method=tag, **fields)


#: method name -> the model of a `baselines.runs` entry with that method (every method registered as a baseline)
RUN_MODELS: dict[str, type[_BaselineRun]] = {name: _run_model(m) for name, m in METHODS.items() if m.baseline}


def _method_of(run: object) -> str:
    """The union tag of a baseline run; a run written without `method` is task arithmetic (the original schema)."""
    return run.get("method", DEFAULT_RUN_METHOD) if isinstance(run, dict) else getattr(run, "method", "")


BaselineSpec = Annotated[Union[tuple(Annotated[model, Tag(name)] for name, model in RUN_MODELS.items())],  # noqa: UP007
                         Discriminator(_method_of)]


class BaselinesParams(_Section):
    runs: list[BaselineSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [r.name for r in self.runs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"baseline run names must be unique (each is a directory under models/baselines): {duplicates}")
        return self



# --- the neighbouring data-aware methods (METHODS-MORE.md): AIM, SAGE, ReasonAny -------------------------------


class AimParams(_Section):
    """AIM's relaxation: ω, the anchor, the modules it covers and how calibration text is cut into blocks."""

    #: lower = stronger pull to the anchor; 0.4 in the paper's runs, the README advises 0.2–0.6; 0.2 chosen on validation
    omega: float = Field(0.2, ge=0.0, le=1.0)
    #: base: θ_B as the source (AIM-TIES); lrm: θ_R on the reasoning set (ours)
    anchor: Literal["base", "lrm"] = "base"
    modules: tuple[str, ...] = MODULES
    #: texts concatenated and cut into blocks of this many tokens (the source: 512, tail dropped); None: one block per
    #: text (the tiny family's, whose positions stop at 160)
    block_tokens: int | None = Field(None, ge=1)
    max_samples: int | None = Field(256, ge=1)
    #: the merge AIM relaxes (a `baselines.runs` entry; its name is the model's directory under models/neighbours):
    #: AIM-TIES wraps TIES at the TIES baseline's setting
    wrapped: BaselineSpec = Field(default_factory=lambda: RUN_MODELS["ties"](
        name="aim_ties", method="ties", density=0.3, weights=[1.0, 1.0], lam=1.0, scope="all"))

    @field_validator("modules")
    @classmethod
    def _known_modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Only the seven merged Linear modules, each once, at least one."""
        unknown = sorted(set(value) - set(MODULES))
        if unknown or not value or len(set(value)) != len(value):
            raise ValueError(f"aim.modules must be distinct names among {list(MODULES)} (got {list(value)})")
        return value

    def statistic_params(self) -> dict:
        """The params the anchor statistic depends on (ω and the wrapped merge act only at the merge: a sweep over them reuses one statistic)."""
        return self.model_dump(mode="json", exclude={"omega", "wrapped"})


class SageParams(_Section):
    """SAGE's strength β and the retained subspace (RAIN's energy rule, or a fixed rank)."""

    #: 0: task arithmetic; → ∞: RAIN's hard projection. No published default: sweep 1, 10, 10², 10³
    beta: float = Field(1000.0, ge=0.0)
    energy: float = Field(0.99, gt=0.0, le=1.0)
    rank: int | None = Field(None, ge=0)
    #: the neighbour model θ_R + lam·Δ' (α = 1: SAGE's own form, the sanitized update added)
    lam: float = 2.0

    def retained(self) -> ProjectionParams:
        """RAIN's selection rule that picks U_r, damped by β (β → ∞ is exactly RAIN's projection with these settings)."""
        return ProjectionParams(energy=self.energy, rank=self.rank, method="sage", beta=self.beta)


class ReasonAnyParams(_Section):
    """ReasonAny's mask sizes, merge weights and choices (defaults: the authors' run scripts)."""

    #: the params the gradient-score sweeps depend on (the grad_scores stage); the rest act at the masks and merge
    SWEEP_KEYS: ClassVar[tuple[str, ...]] = ("saliency", "max_samples", "max_tokens", "accumulate_on")

    p_domain: float = Field(0.05, ge=0.0, le=1.0)
    p_reasoning: float = Field(0.05, ge=0.0, le=1.0)
    lam_domain: float = 1.0
    lam_reasoning: float = 1.0
    #: tensor: the code's whole-tensor selection; element: the paper figure's element masks
    granularity: Literal["element", "tensor"] = "element"
    #: native: on the base with both task vectors; lrm: ITM's skill into the LRM (M_R only excludes)
    direction: Literal["native", "lrm"] = "native"
    saliency: Literal["grad", "snip"] = "grad"
    base_intersect: bool = True
    #: which parameters enter the global thresholds (and may be merged): all tensors, or the seven Linear modules
    scope: Literal["all", "linear"] = "all"
    max_samples: int | None = Field(100, ge=1)
    max_tokens: int = Field(512, ge=2)
    #: where the fp32 scores sum: beside each weight (fast), or in CPU memory (a 32B model's 128 GB of scores off the GPU)
    accumulate_on: Literal["device", "cpu"] = "device"
    #: histogram bins per threshold pass, and the most scores held at once by the exact pass
    bins: int = Field(4096, ge=2)
    max_exact: int = Field(2**24, ge=1)


class OrthogonalityParams(_Section):
    """Principal angles between the top-`rank` singular subspaces of Δ_R and Δ_I per module (randomized SVD)."""

    rank: int = Field(8, ge=1)
    oversample: int = Field(8, ge=0)
    power_iters: int = Field(2, ge=0)
    seed: int = 0


class EvaluateParams(_Section):
    """Held-out behaviour and invariance, and optional lm-eval tasks, with the sampling R1-style models are run with."""

    #: new tokens per reply on the held-out instruction problems (64 suits the tiny family; R1 models think for thousands)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    max_eval: int | None = Field(None, ge=1)
    neighbour_radius: int = Field(5, ge=0)
    #: 0 = greedy; DeepSeek-R1-Distill is evaluated with temperature 0.6, top_p 0.95 and several samples per prompt
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    num_samples: int = Field(1, ge=1)
    seed: int = 0
    # optional lm-eval harness tasks (e.g. [ifeval, gsm8k]) run through HFLM on every model: for real checkpoints
    # with the task data available locally (HF_HUB_OFFLINE runs read the datasets cache); empty = not run
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_limit: int | None = Field(None, ge=1)  # examples per task (None: all)
    lm_eval_include: str | None = None  # a folder of extra task YAMLs (lm-eval's --include_path)
    #: new tokens per lm-eval task (its max_gen_toks), e.g. {gsm8k: 32768}; tasks not listed keep their own
    lm_eval_max_new_tokens: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    #: hf: lm-eval's HFLM; vllm: its vLLM backend (must be installed); auto: vLLM where installed and a GPU is present
    lm_eval_backend: Literal["auto", "hf", "vllm"] = "auto"

    @model_validator(mode="after")
    def _budgets(self):
        unknown = sorted(set(self.lm_eval_max_new_tokens) - set(self.lm_eval_tasks))
        if unknown:
            raise ValueError(f"lm_eval_max_new_tokens names tasks not in lm_eval_tasks: {unknown}")
        return self


class CheckParams(_Section):
    """Up-front validation (`rain check`): disk headroom beyond the estimated outputs; calibration samples allowed to be skipped."""

    min_free_space: Size = "1GB"
    #: share of a calibration set's samples that may exceed max_tokens (and be skipped); 0: every sample is used
    max_skipped_share: float = Field(0.0, ge=0.0, le=1.0)


class Params(_Section):
    """All of params.yaml."""

    zoo: ZooParams = Field(default_factory=ZooParams)
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)
    models: ModelsParams = Field(default_factory=ModelsParams)
    calibration: CalibrationParams = Field(default_factory=CalibrationParams)
    features: FeaturesParams = Field(default_factory=FeaturesParams)
    projection: ProjectionParams = Field(default_factory=ProjectionParams)
    attention: AttentionParams = Field(default_factory=AttentionParams)
    alpha: AlphaParams = Field(default_factory=AlphaParams)
    merge: MergeParams = Field(default_factory=MergeParams)
    baselines: BaselinesParams = Field(default_factory=BaselinesParams)
    aim: AimParams = Field(default_factory=AimParams)
    sage: SageParams = Field(default_factory=SageParams)
    reasonany: ReasonAnyParams = Field(default_factory=ReasonAnyParams)
    orthogonality: OrthogonalityParams = Field(default_factory=OrthogonalityParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    check: CheckParams = Field(default_factory=CheckParams)

    @model_validator(mode="after")
    def _curvature_needs_its_pass(self):
        if self.attention.mode == "eager" and self.runtime.dtype in ("bfloat16", "float16"):
            raise ValueError(f"attention.mode 'eager' reads attention weights rounded to runtime.dtype {self.runtime.dtype}, too "
                             "coarse for Stage 2's statistics; use attention.mode auto or recompute (fp32 softmax)")
        if self.alpha.variant == "curvature" and not self.attention.curvature_pass:
            raise ValueError("alpha.variant 'curvature' needs the third attention pass: set attention.curvature_pass: true "
                             "or choose alpha.variant two_pass")
        return self

    @model_validator(mode="after")
    def _neighbour_names_differ(self):
        if self.aim.wrapped.name in NEIGHBOUR_NAMES:
            raise ValueError(f"aim.wrapped.name {self.aim.wrapped.name!r} is the directory of another neighbour model "
                             f"under models/neighbours ({list(NEIGHBOUR_NAMES)}); name it e.g. aim_{self.aim.wrapped.method}")
        return self


#: the directories of the SAGE and ReasonAny models under models/neighbours (AIM's is aim.wrapped.name)
NEIGHBOUR_NAMES = ("sage", "reasonany")


def param_values(params: Params, keys: tuple[str, ...]) -> dict:
    """The values of dotted params keys, e.g. {'alpha': {...}, 'attention.prior': 1.0}."""
    dumped = params.model_dump(mode="json")
    values = {}
    for key in keys:
        node = dumped
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


class ParamsError(ValueError):
    """params.yaml is unreadable or out of range; `errors` holds one (key, what is wrong) pair per problem."""

    def __init__(self, path: Path, errors: list[tuple[str, str]]):
        self.path, self.errors = path, errors
        super().__init__(f"{path}: invalid params:\n  " + "\n  ".join(f"{key}: {msg}" for key, msg in errors))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse and validate params.yaml; errors name the offending key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(path, [("(file)", f"not valid YAML ({e})")]) from None
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(path, [(".".join(str(p) for p in err["loc"]), err["msg"]) for err in e.errors()]) from None
