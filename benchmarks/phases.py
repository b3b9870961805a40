"""Split the wall time of pipeline stages into phases (forward passes, feature rows, Gram/rows accumulation,
eigendecomposition, projection, residual diagnostics, attention statistics, alpha solve, merge arithmetic, I/O)
without touching the library: named library functions are wrapped for the duration of a run and time is attributed exclusively
(a phase nested in another, e.g. feature rows computed inside the forward hooks, is subtracted from its parent).

Used by pipeline_ratio.py (`--phases`); `PhaseClock` can wrap any block of stage runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import time
from collections import defaultdict
from typing import Callable, Iterator

#: (phase, "module:attribute" or "module:Class.method") in reporting order
PHASES: tuple[tuple[str, str], ...] = (
    ("model load", "rain_tasks.model.runtime:load_causal_lm"),
    ("tensor I/O", "rain_tasks.io.checkpoint:load_tensors"),
    ("tensor I/O", "rain_tasks.io.checkpoint:save_tensors"),
    ("tensor I/O", "rain_tasks.io.checkpoint:TensorFile.get_tensor"),
    ("tensor I/O", "rain_tasks.io.checkpoint:WriteBehind.wait"),  # writes run on a thread: the wait for them
    ("tensor I/O", "rain_tasks.io.checkpoint:ShardWriter.close"),
    ("forward passes", "rain_tasks.model.capture:forward_batch_with_hooks"),
    ("forward passes", "rain_tasks.stage2.attention:run_pass"),
    ("feature rows", "rain_tasks.stage1.features:layer_rows"),
    ("Gram / rows accumulation", "rain_tasks.stage1.features:RowAccumulator.add"),
    ("Gram / rows accumulation", "rain_tasks.stage1.features:RowAccumulator.result"),
    ("eigendecomposition", "rain_tasks.stage1.projection:RowStats.spectrum"),
    ("projection", "rain_tasks.stage1.projection:project_block_with_coefficients"),
    ("residual diagnostics", "rain_tasks.stage1.projection:RowStats.quad_before_after"),
    ("attention statistics", "rain_tasks.stage2.attention:span_stats"),
    ("update added", "rain_tasks.stage2.attention:add_update"),
    ("alpha solve", "rain_dev.checks:solve_box_qp"),
    ("alpha solve", "rain_tasks.stage2.alpha:closed_form_alpha"),
    ("merge arithmetic", "rain_tasks.merge.engine:_merged"),
    ("plots", "rain_tasks.io.plots:heatmap"),
)


def _project_modules() -> list[object]:
    """The loaded modules of this project (where a library function may have been imported by name)."""
    return [m for name, m in list(sys.modules.items()) if name.startswith(("rain_tasks", "flows"))]


class PhaseClock:
    """Exclusive seconds per phase of everything run inside `with clock.running():`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [phase, start, child seconds]

    def _wrap(self, phase: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._stack.append([phase, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _, start, children = self._stack.pop()
                total = time.perf_counter() - start
                self.seconds[phase] += total - children
                if self._stack:
                    self._stack[-1][2] += total
        return timed

    @contextlib.contextmanager
    def running(self) -> Iterator["PhaseClock"]:
        """Wrap every PHASES function (in its module and wherever it was imported by name) for the block."""
        swaps: list[tuple[object, str, object, object]] = []  # (owner, name, original, wrapper)
        try:
            for phase, target in PHASES:
                module_name, attr = target.split(":")
                owner = importlib.import_module(module_name)
                *path, name = attr.split(".")
                for part in path:
                    owner = getattr(owner, part)
                original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
                wrapper = self._wrap(phase, original)
                swaps.append((owner, name, original, wrapper))
                for holder in [owner, *_project_modules()] if not isinstance(owner, type) else [owner]:
                    if holder is owner or getattr(holder, name, None) is original:
                        setattr(holder, name, wrapper)
            yield self
        finally:  # modules imported inside the block bound the wrappers by name too: restore them everywhere
            for owner, name, original, wrapper in reversed(swaps):
                setattr(owner, name, original)
                for holder in _project_modules():
                    if getattr(holder, name, None) is wrapper:
                        setattr(holder, name, original)

    def split(self, wall: float) -> dict[str, float]:
        """Seconds per phase in PHASES order, plus `other` (wall minus the phases)."""
        order = list(dict.fromkeys(p for p, _ in PHASES))
        out = {p: round(self.seconds[p], 3) for p in order if self.seconds.get(p)}
        out["other"] = round(wall - sum(self.seconds.values()), 3)
        return out
