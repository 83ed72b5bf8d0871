"""The two pictures logged with every round: its new samples grouped by labelled class, and their entropy.

Both are written with matplotlib's Agg canvas or PIL directly (no pyplot, no global figure state), so
they work in worker processes and headless machines alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dp_ops.engine.data import from_uint8, resize, to_uint8
from dp_ops.engine.rounds import RoundParts

if TYPE_CHECKING:  # (PIL is imported where a picture is drawn)
    from PIL import ImageFont


def save_sample_grid(
    round_parts: RoundParts,
    path: Path,
    classes: Sequence[str],
    per_class: int = 16,
    scale: int = 3,
    max_cell: int = 64,
) -> None:
    """PNG grid: one row per class, labelled with its name from ``classes`` (in label order), up to
    ``per_class`` of its new samples (grey or RGB, read from the round's parts); cells larger than
    ``max_cell`` are downsized, small ones nearest-neighbour upscaled (at most ``scale``×)."""
    from PIL import Image, ImageDraw

    labels = round_parts.labels
    present = sorted(set(labels.tolist()))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in present])
    images = torch.from_numpy(round_parts.images(keep))
    if images.shape[-1] > max_cell:
        images = to_uint8(resize(from_uint8(images), max_cell))
    cells = images.numpy().transpose(0, 2, 3, 1)  # (n, R, R, C)
    res, channels = cells.shape[1], cells.shape[-1]
    columns = max(int((labels[keep] == c).sum()) for c in present)
    canvas = np.full((len(present) * (res + 1), columns * (res + 1), channels), 255, dtype=np.uint8)
    for row, c in enumerate(present):
        for col, img in enumerate(cells[labels[keep] == c]):
            canvas[row * (res + 1) : row * (res + 1) + res, col * (res + 1) : col * (res + 1) + res] = img
    scale = max(1, min(scale, max_cell // res))
    grid = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    grid = grid.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.Resampling.NEAREST)
    row_height = (res + 1) * scale
    font = _font(max(8, min(row_height - 4, 16)))
    names = [classes[c] if c < len(classes) else str(c) for c in present]
    margin = 8 + max(int(font.getlength(name)) for name in names)
    white = 255 if grid.mode == "L" else (255, 255, 255)
    labelled = Image.new(grid.mode, (margin + grid.width, grid.height), white)
    labelled.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for row, name in enumerate(names):
        draw.text(
            (4, row * row_height + row_height // 2),
            name,
            fill=0 if grid.mode == "L" else (0, 0, 0),
            font=font,
            anchor="lm",
        )
    labelled.save(path)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # (Pillow's bundled font, scalable where FreeType is built in)
    except (OSError, TypeError):
        return ImageFont.load_default()


def save_entropy_histogram(round_parts: RoundParts, path: Path, round_index: int, num_classes: int) -> None:
    """PNG histogram of the learner entropy (nats) of a round's new samples, on the fixed range
    [0, ln K] of any K-class entropy (so rounds and runs compare), with ln K (a uniform prediction) marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = math.log(num_classes)
    ent = np.clip(round_parts.entropy.astype(np.float64), 0.0, top)  # (rounding can put a value a hair past ln K)
    ax.hist(ent, bins=np.linspace(0.0, top, 31).tolist(), color="tab:blue")
    ax.axvline(top, color="tab:red", linestyle="--", linewidth=1, label=f"ln K = {top:.2f} (uniform)")
    ax.legend(loc="upper left", fontsize="small", frameon=False)
    ax.set_xlim(0.0, top * 1.02)
    scored = "untrained learner" if round_index == 0 else "learner"
    ax.set(xlabel=f"{scored} entropy (nats)", ylabel="samples", title=f"round {round_index}: new samples")
    fig.tight_layout()
    fig.savefig(path)
