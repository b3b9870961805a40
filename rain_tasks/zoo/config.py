"""Parameters of the tiny model family (the `zoo:` section of params.yaml)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ZooParams(BaseModel):
    """Everything that determines the tiny family; the defaults are the project's default family."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    threads: int = Field(2, ge=1, description="torch intra-op threads (fixed for bit-exact builds)")

    # Architecture (Qwen2, tied embeddings, eager attention).
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 128

    # Problems: num_steps add/sub steps over operands 0..max_operand, every intermediate result in 0..max_value
    # (None: (num_steps + 1) * max_operand, i.e. no bound beyond non-negativity).
    max_operand: int = 11
    num_steps: int = Field(2, ge=2)
    max_value: int | None = Field(None, ge=1)

    # Instructions: prompts with a constraint carry `constraints_per_prompt` compatible ones drawn from `formats`
    # (ids of rain_tasks.zoo.tasks.FORMATS; checked by rain_tasks.evaluate.instructions).
    formats: tuple[str, ...] = ("change_case:capital_letters", "startend:quotation", "startend:end_checker",
                                "combination:repeat_answer")
    constraints_per_prompt: int = Field(1, ge=1)

    # Training (AdamW betas 0.9/0.98, linear warm-up then cosine, gradient clipping).
    batch_size: int = 64
    warmup_steps: int = 50
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    base_steps: int = 1500
    base_lr: float = 3e-3
    base_distractor_rate: float = 0.2
    base_chat_rate: float = Field(0.5, ge=0.0, le=1.0, description="share of base documents rendered as a chat turn")
    lrm_steps: int = 300
    lrm_lr: float = 2e-4
    lrm_distractor_rate: float = 0.3
    lrm_constraint_rate: float = 0.15
    lrm_ignore_rate: float = Field(0.0, ge=0.0, le=1.0, description="share of the LRM's constraint prompts answered "
                                   "(ignoring the constraints) rather than cut after the thinking")
    itm_steps: int = 200
    itm_lr: float = 1e-4
    itm_distractor_rate: float = 0.3
    itm_constraint_rate: float = 0.8
    itm_chain_rate: float = 0.8

    # Held-out sets (disjoint problems; everything else is the training pool).
    n_calibration_reasoning: int = 150
    n_calibration_instruction: int = 200
    n_eval: int = 200
    n_eval_reasoning: int = 100
    n_val: int = Field(0, ge=0, description="validation prompts (data/eval/instruction_val.jsonl) for choosing merges")

    # Checkpoint format.
    max_shard_size: str = "1MB"
    dtype: str = "float32"


#: The multi-step family (issue 19), opt-in: set these in params.yaml's `zoo:` section to build it. Three-step chains
#: over 0..9 (values 0..29) that the LRM solves by thinking but not in one step; three of seven IFEval-style
#: instructions per prompt; an ITM that answers directly (no chain); a validation split for choosing merge settings.
#: Not the default: measured on one seed only (README, "The tiny family").
MULTISTEP_FAMILY: dict = {
    "num_steps": 3, "max_operand": 9, "max_value": 29, "max_position_embeddings": 160,
    "formats": ("change_case:capital_letters", "startend:quotation", "startend:end_checker", "combination:repeat_answer",
                "keywords:existence", "detectable_format:title", "detectable_format:json_format"),
    "constraints_per_prompt": 3, "n_val": 200,
    "base_steps": 800, "lrm_steps": 200, "itm_steps": 150, "itm_chain_rate": 0.0, "lrm_ignore_rate": 0.05,
}
