"""PNG figures for the reports, written deterministically (same data, same bytes) and atomically.

The CSV files beside them are the `dvc plots` data; these images are what the markdown reports embed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rain_tasks.io.checkpoint import atomic_path  # noqa: E402

#: PNG metadata pinned so the bytes do not depend on the matplotlib build
_PNG_META = {"Software": None}


def _save(fig, path: str | Path) -> Path:
    """Write `fig` as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=_PNG_META)
    plt.close(fig)
    return Path(path)


def heatmap(table: pd.DataFrame, row: str, col: str, value: str, path: str | Path, title: str,
            vmin: float | None = None, vmax: float | None = None) -> Path:
    """Heatmap of `value` over the (`row`, `col`) grid of a long table, each cell annotated."""
    grid = table.pivot(index=row, columns=col, values=value).sort_index().sort_index(axis=1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * grid.shape[1], 1.0 + 0.5 * grid.shape[0]))
    im = ax.imshow(grid.to_numpy(np.float64), cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
    ax.set_xlabel(col)
    ax.set_ylabel(row)
    ax.set_title(title)
    if grid.size <= 400:
        for (i, j), v in np.ndenumerate(grid.to_numpy(np.float64)):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def lines(table: pd.DataFrame, x: str, ys: list[str], path: str | Path, title: str, group: str | None = None) -> Path:
    """Line plot of the columns `ys` against `x`, one line per (y, group value)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = [(None, table)] if group is None else list(table.groupby(group, sort=True))
    for key, part in groups:
        part = part.sort_values(x)
        for y in ys:
            label = y if key is None else f"{y} ({group}={key})"
            ax.plot(part[x], part[y], marker="o", label=label)
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def scatter_lines(table: pd.DataFrame, xs: list[str], y: str, group: str, label: str, path: str | Path, title: str) -> Path:
    """One panel per x in `xs`: `y` against x, a line per `group` through its points (annotated with `label`)."""
    fig, axes = plt.subplots(1, len(xs), figsize=(5.5 * len(xs), 4), squeeze=False)
    for ax, x in zip(axes[0], xs):
        for key, part in table.groupby(group, sort=True):
            part = part.sort_values(label)
            ax.plot(part[x], part[y], marker="o", label=str(key))
            for _, row in part.iterrows():
                ax.annotate(f"{row[label]:g}", (row[x], row[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
