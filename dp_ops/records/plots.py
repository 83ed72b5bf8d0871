"""The two pictures logged with every round run: its new samples grouped by class, and their entropy.

Both are written with matplotlib's Agg canvas or PIL directly (no pyplot, no global figure state), so
they work in worker processes and headless machines alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dp_ops.engine.data import from_uint8, resize, to_uint8
from dp_ops.engine.rounds import RoundParts


def save_sample_grid(
    increment: RoundParts, path: Path, per_class: int = 16, scale: int = 3, max_cell: int = 64
) -> None:
    """PNG grid: one row per class, up to ``per_class`` of its new samples (grey or RGB, read from the
    round's parts); cells larger than ``max_cell`` are downsized, small ones nearest-neighbour upscaled
    (at most ``scale``×)."""
    from PIL import Image

    labels = increment.labels
    classes = sorted(set(labels.tolist()))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    images = torch.from_numpy(increment.images(keep))
    if images.shape[-1] > max_cell:
        images = to_uint8(resize(from_uint8(images), max_cell))
    cells = images.numpy().transpose(0, 2, 3, 1)  # (n, R, R, C)
    res, channels = cells.shape[1], cells.shape[-1]
    canvas = np.full((len(classes) * (res + 1), per_class * (res + 1), channels), 255, dtype=np.uint8)
    for row, c in enumerate(classes):
        for col, img in enumerate(cells[labels[keep] == c]):
            canvas[row * (res + 1) : row * (res + 1) + res, col * (res + 1) : col * (res + 1) + res] = img
    scale = max(1, min(scale, max_cell // res))
    grid = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    grid.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.Resampling.NEAREST).save(path)


def save_entropy_histogram(increment: RoundParts, path: Path, round_index: int) -> None:
    """PNG histogram of the learner entropy (nats) of a round's new samples."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ent = increment.entropy.astype(np.float64)
    lo, hi = float(ent.min()), float(ent.max())
    pad = max(0.0, 1e-3 - (hi - lo)) / 2  # (an untrained learner can score a round all alike)
    ax.hist(ent, bins=np.linspace(lo - pad, hi + pad, 31).tolist(), color="tab:blue")
    ax.set(xlabel="learner entropy (nats)", ylabel="samples", title=f"round {round_index}: new samples")
    fig.tight_layout()
    fig.savefig(path)
