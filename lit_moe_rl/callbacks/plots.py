"""Small matplotlib helpers for callbacks: figures written straight to PNG files.

``matplotlib.figure.Figure`` is used directly (no ``pyplot``): no global figure registry, no GUI
backend, nothing to close, safe in a training process without a display. PNG output goes through
the Agg canvas whatever backend the process selected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator


def layer_step_heatmap(
    matrix: np.ndarray,
    steps: Sequence[int],
    path: str | Path,
    *,
    title: str = "",
    colorbar_label: str = "",
    ylabel: str = "MoE layer",
    xlabel: str = "step",
) -> Path:
    """Write a layer x step heatmap of ``matrix [L, S]`` (NaN = no value, drawn blank) to ``path``.

    Column ``j`` is labelled ``steps[j]``; steps need not be evenly spaced (the x axis is the column
    index, its tick labels are the steps). Parent folders are created. Returns the path written.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(steps):
        raise ValueError(
            f"layer_step_heatmap: matrix must be [layers, len(steps)] = [L, {len(steps)}], got {matrix.shape}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    num_layers, num_steps = matrix.shape
    fig = Figure(figsize=(min(4.0 + 0.08 * num_steps, 14.0), min(2.0 + 0.25 * num_layers, 12.0)))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", origin="lower", cmap="viridis")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda x, _pos: str(steps[int(x)]) if 0 <= int(x) < num_steps else "")
    )
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(num_layers, 12), integer=True))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
