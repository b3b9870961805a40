"""Process-wide settings that make stages deterministic and offline."""

from __future__ import annotations

import os

import torch


def configure(threads: int | None = None) -> None:
    """Deterministic torch, fixed threads, and no hub access (nothing may download weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads or int(os.environ.get("RAIN_THREADS", "2")))
