"""Presets of the tiny model family beyond its defaults (rain_tasks.params.ZooParams, the `zoo:` section)."""

from __future__ import annotations

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
