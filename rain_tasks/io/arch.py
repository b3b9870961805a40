"""Architecture registry: which tensors of a decoder-only checkpoint RAIN merges, and their roles.

Architectures are data, not code paths: Qwen2, Llama and Mistral share the module names
below, so adding a family is one registry entry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

#: The seven Linear modules merged per decoder layer, in a fixed order.
MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """Naming of one architecture family's decoder-layer tensors."""

    layer_prefix: str  # format string with {layer}
    module_paths: dict[str, str]  # module name -> path inside the layer
    input_norm: str
    post_attention_norm: str

    def param_name(self, layer: int, module: str, kind: str = "weight") -> str:
        """Full tensor name of `module` in `layer` (`kind` is weight or bias)."""
        return f"{self.layer_prefix.format(layer=layer)}.{self.module_paths[module]}.{kind}"


_LLAMA_LIKE = ArchSpec(
    layer_prefix="model.layers.{layer}",
    module_paths={
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    },
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

#: model_type (config.json) -> naming. Unknown types are refused by `arch_for`.
ARCHITECTURES: dict[str, ArchSpec] = {"qwen2": _LLAMA_LIKE, "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that Stage 1/2 need, read from a checkpoint's config.json."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def n_rep(self) -> int:
        """Query heads per KV group (grouped-query attention): query head h reads KV head h // n_rep."""
        return self.num_heads // self.num_kv_heads

    def kv_group(self, head: int) -> int:
        """KV group read by query head `head`."""
        return head // self.n_rep

    @property
    def spec(self) -> ArchSpec:
        return arch_for(self.model_type)


def arch_for(model_type: str) -> ArchSpec:
    """Registry lookup that names the supported families when the type is unknown."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; supported: {sorted(ARCHITECTURES)}. "
            "Add an ArchSpec entry in rain_tasks/io/arch.py if its module names match."
        ) from None


def read_shape(model_dir: str | Path) -> ModelShape:
    """Read the decoder sizes from `model_dir/config.json` (refusing unknown architectures)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model directory")
    cfg = json.loads(path.read_text())
    model_type = cfg.get("model_type", "")
    arch_for(model_type)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return ModelShape(
        model_type=model_type,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
    )


def layer_of(tensor_name: str) -> int | None:
    """Decoder layer index of a tensor name, or None for embeddings, final norm, lm_head."""
    m = _LAYER_RE.match(tensor_name)
    return int(m.group(1)) if m else None


def module_of(tensor_name: str) -> str | None:
    """Which of the seven merged modules a tensor belongs to (None for norms and non-layer tensors)."""
    if layer_of(tensor_name) is None:
        return None
    for module in MODULES:
        if f".{module}." in tensor_name:
            return module
    return None
