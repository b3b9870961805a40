"""Forward hooks that hand each decoder layer's Linear inputs to a consumer, one layer at a time.

Stage 1 (features at Ω_think) and Stage 2 (attention statistics) both run one teacher-forced
forward per sample and reduce what a layer's merged modules see as soon as it is known, so
peak memory is one layer's captures, never layers × T × hidden (or layers × heads × T × T).
Attention rows are recomputed exactly from the captured layer input for the few query
positions that are needed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from rain_tasks.io.arch import arch_for
from rain_tasks.model.runtime import input_device


@dataclass
class LayerCapture:
    """The inputs of one decoder layer's seven merged Linear modules (batch 1, rows = positions)."""

    layer: int
    attn_in: torch.Tensor  # [T, hidden]  input-layernorm output = input of q/k/v_proj
    attn_out: torch.Tensor  # [T, num_heads*head_dim] input of o_proj
    mlp_in: torch.Tensor  # [T, hidden]  post-attention-layernorm output = input of gate/up_proj
    mlp_act: torch.Tensor  # [T, intermediate] act(gate)*up = input of down_proj


class _StopForward(Exception):
    """Raised from a hook to end the forward once the last requested layer is captured."""


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (`model.model`) of a causal LM, which the architecture registry names."""
    arch_for(model.config.model_type)
    return model.get_submodule("model")


def _layer_module(model: torch.nn.Module, layer: int, module: str) -> torch.nn.Module:
    """One of the seven Linear modules of `layer`, located through the architecture registry."""
    spec = arch_for(model.config.model_type)
    return model.get_submodule(spec.param_name(layer, module).rsplit(".", 1)[0])


def _attention(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The self-attention module of `layer` (the parent of its q_proj)."""
    return model.get_submodule(arch_for(model.config.model_type).param_name(layer, "q_proj").rsplit(".", 2)[0])


def forward_with_hooks(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    on_layer: Callable[[LayerCapture], None],
    layers: Iterable[int] | None = None,
) -> None:
    """One teacher-forced forward (batch 1) calling `on_layer` per layer as soon as its four inputs are known.

    `layers` restricts the capture to those layers (default: all); the forward stops after
    the last of them, so a subset costs only the layers up to it.
    """
    if input_ids.dim() == 2 and input_ids.shape[0] != 1:
        raise ValueError(f"forward_with_hooks takes one sequence (batch 1); got input_ids of shape {tuple(input_ids.shape)}")
    forward_batch_with_hooks(model, [input_ids.reshape(-1)], lambda _b, cap: on_layer(cap), layers)


def token_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose padded size (count × longest) stays within `budget` tokens (≥ 1 each).

    Order is kept, so per-sample reductions see the samples in the same order as unbatched.
    """
    batches: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if batches and max(longest, n) * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
            longest = max(longest, n)
        else:
            batches.append([i])
            longest = n
    return batches


def pad_right(sequences: Sequence[torch.Tensor], pad_id: int = 0) -> torch.Tensor:
    """Token ids [batch, longest], each sequence at positions 0..len-1 and `pad_id` after it."""
    ids = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return ids


def forward_batch_with_hooks(
    model: torch.nn.Module,
    sequences: Sequence[torch.Tensor],
    on_layer: Callable[[int, LayerCapture], None],
    layers: Iterable[int] | None = None,
) -> None:
    """One teacher-forced forward over several sequences, calling `on_layer(b, capture of sequence b)` per layer.

    Sequences are right padded: every real token keeps its position 0..len-1 and the causal mask
    hides the pads after it, so each sequence's captures equal those of its own forward (up to
    float rounding of batched kernels); the pad rows are sliced off before `on_layer` sees them.
    Captures stay on the device of their layer (accelerate may spread layers over devices or
    offload them; the layer's weights are present while its hooks run).
    """
    if not sequences:
        return
    lengths = [len(s) for s in sequences]
    wanted = sorted(set(range(model.config.num_hidden_layers) if layers is None else layers))
    if not wanted:
        return
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []

    def grab(layer: int, slot: str):
        def hook(_module, args):
            seen.setdefault(layer, {})[slot] = args[0].detach()
            if slot == "mlp_act":
                full = seen.pop(layer)
                for b, n in enumerate(lengths):
                    on_layer(b, LayerCapture(layer=layer, **{k: v[b, :n] for k, v in full.items()}))
                if layer == wanted[-1]:
                    raise _StopForward

        return hook

    slots = {"q_proj": "attn_in", "o_proj": "attn_out", "gate_proj": "mlp_in", "down_proj": "mlp_act"}
    ids = pad_right(sequences).to(input_device(model))
    try:
        for layer in wanted:
            for module, slot in slots.items():
                handles.append(_layer_module(model, layer, module).register_forward_pre_hook(grab(layer, slot)))
        with torch.no_grad():
            _decoder(model)(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def _rotary(model: torch.nn.Module, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary cos/sin [1, T, head_dim] in fp32 on k's device (accelerate's hook, if any, places the call)."""
    cos, sin = _decoder(model).rotary_emb(k, positions[None])
    return cos.to(k.device, torch.float32), sin.to(k.device, torch.float32)


def _rope(model: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the architecture's own rotary embedding to x [heads, len, head_dim] at `positions`."""
    rotate = sys.modules[type(_decoder(model)).__module__].apply_rotary_pos_emb
    c, s = cos[0, positions][None], sin[0, positions][None]  # [1, len, head_dim]
    return rotate(x[None], x[None], c, s)[0][0]


def attention_probs(model: torch.nn.Module, layer: int, attn_in: torch.Tensor, query_rows: Sequence[int]) -> torch.Tensor:
    """Exact causal softmax attention [num_heads, len(query_rows), T] of `layer` at the given query positions.

    Recomputed from the captured layer input with the layer's q/k projections (and biases),
    the model's RoPE and scaling, and grouped-query mapping h -> h // n_rep; only the asked
    rows are formed (R × T per head), in fp32.
    """
    attn = _attention(model, layer)
    if getattr(attn, "sliding_window", None) is not None:
        raise NotImplementedError(f"layer {layer} uses sliding-window attention; attention_probs assumes a full causal mask")
    rows = torch.as_tensor(list(query_rows), dtype=torch.long)
    T = attn_in.shape[0]
    if rows.numel() and (rows.min() < 0 or rows.max() >= T):
        raise IndexError(f"query rows must lie in [0, {T}); got {rows.tolist()[:8]}")
    hd, n_rep = attn.head_dim, attn.num_key_value_groups
    device = attn_in.device  # the layer's own device (its weights are there while its hooks run)
    with torch.no_grad():
        x = attn_in.to(attn.q_proj.weight.dtype)
        q = attn.q_proj(x[rows]).view(len(rows), -1, hd).transpose(0, 1).float()  # [H, R, hd]
        k = attn.k_proj(x).view(T, -1, hd).transpose(0, 1).float()  # [KV, T, hd]
        positions = torch.arange(T, device=device)
        cos, sin = _rotary(model, k, positions)
        rows = rows.to(device)
        q, k = _rope(model, q, rows, cos, sin), _rope(model, k, positions, cos, sin)
        k = k.repeat_interleave(n_rep, dim=0)  # query head h reads KV head h // n_rep
        logits = torch.matmul(q, k.transpose(1, 2)) * attn.scaling  # [H, R, T]
        logits = logits.masked_fill(positions[None, None, :] > rows[None, :, None], float("-inf"))
        return torch.softmax(logits, dim=-1)
