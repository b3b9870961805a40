"""Process-wide settings that make stages deterministic and offline, and where a model's tensors live."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rain_tasks import set_environment
from rain_tasks.io.checkpoint import DTYPES, checkpoint_dtype, parse_size
from rain_tasks.params import RuntimeParams


def configure(threads: int | None = None) -> None:
    """Deterministic torch, fixed threads, and no hub access (nothing may download weights)."""
    set_environment()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads or int(os.environ.get("RAIN_THREADS", "2")))


def resolve_device(name: str) -> torch.device:
    """`runtime.device` as a torch device: auto is the first CUDA device when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device is {name!r} but torch sees no CUDA device; set runtime.device: cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RuntimeError(f"runtime.device is {name!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda:0") if device.type == "cuda" and device.index is None else device


def resolve_dtype(name: str, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`runtime.dtype` as a torch dtype: auto is the checkpoint's dtype on an accelerator and float32 on the CPU."""
    if name != "auto":
        return DTYPES[name]
    return checkpoint_dtype if device.type != "cpu" else torch.float32


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's input ids go: its embedding's device (the CPU when accelerate offloaded it to disk)."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


@torch.no_grad()
def add_to_parameter(model: torch.nn.Module, name: str, delta: torch.Tensor, alpha: float) -> None:
    """param += alpha·delta in place, also for a parameter accelerate offloaded (a meta tensor on the module).

    An offloaded weight lives in its hook's weights map: held in CPU memory (patched there) or read
    from disk (the patched weight is written to the offload folder and the map pointed at it, so
    memory stays one tensor).
    """
    param = model.get_parameter(name)
    if param.device.type != "meta":
        param.add_(delta.to(param.device, param.dtype), alpha=alpha)
        return
    module_name, _, leaf = name.rpartition(".")
    weights = getattr(getattr(model.get_submodule(module_name), "_hf_hook", None), "weights_map", None)
    if weights is None:
        raise RuntimeError(f"{name} is on the meta device but no accelerate offload hook holds its weights")
    loader, key = weights.dataset, weights.prefix + leaf
    current = loader[key]
    current = torch.as_tensor(current) if not isinstance(current, torch.Tensor) else current
    patched = current.to(param.dtype) + alpha * delta.to(param.dtype)
    if key in loader.state_dict:
        loader.state_dict[key] = patched
        return
    if loader.save_folder is None:
        raise RuntimeError(f"{name} is offloaded to disk without an offload folder to write its patched copy to")
    from accelerate.utils import offload_weight

    offload_weight(patched, key, loader.save_folder, index=loader.index)


#: what a caller that passes no runtime gets: float32 on the CPU (the stages pass params.yaml's `runtime`)
CPU = RuntimeParams(device="cpu")


def load_causal_lm(model_dir: str | Path, runtime: RuntimeParams | None = None, attn_implementation: str = "eager"):
    """A local causal LM in eval mode, on `runtime`'s device and dtype (default: float32 on the CPU).

    With `runtime.device_map: auto`, accelerate places the layers over the GPUs, the CPU and
    `offload_folder` within `max_memory`. Eager attention is the only kind that returns weights.
    """
    from transformers import AutoModelForCausalLM

    runtime = runtime or CPU
    device = resolve_device(runtime.device)
    kwargs: dict = {"dtype": forward_dtype(model_dir, runtime), "attn_implementation": attn_implementation}
    if runtime.device_map is None:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).to(device).eval()
    if runtime.max_memory:
        kwargs["max_memory"] = {int(k) if k.isdigit() else k: parse_size(v) for k, v in runtime.max_memory.items()}
    if runtime.offload_folder:
        kwargs["offload_folder"] = str(runtime.offload_folder)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), device_map=runtime.device_map, **kwargs).eval()


def forward_dtype(model_dir: str | Path, runtime: RuntimeParams | None = None) -> torch.dtype:
    """The dtype `load_causal_lm` runs a checkpoint in under `runtime` (recorded with the artifacts it makes)."""
    runtime = runtime or CPU
    return resolve_dtype(runtime.dtype, checkpoint_dtype(model_dir), resolve_device(runtime.device))
