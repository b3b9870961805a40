"""RAIN-Merging pipeline library.

OpenMP threads that spin while waiting make torch orders of magnitude slower when more threads
than cores are busy (two processes on a 2-core machine, say); passive waiting does not change
results. Set here, before anything imports torch, unless the user chose otherwise.
"""

import os

#: what every entry point (the stages, the tests) sets unless the user chose otherwise: passive OpenMP waits, no
#: Hugging Face hub access (nothing may download weights), no progress bars or chatter from the hub and transformers
ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_VERBOSITY": "error"}


def set_environment() -> None:
    """Apply ENVIRONMENT's defaults to this process (the user's own settings win)."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


os.environ.setdefault("OMP_WAIT_POLICY", ENVIRONMENT["OMP_WAIT_POLICY"])
