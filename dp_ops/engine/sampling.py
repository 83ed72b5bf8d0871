"""What every generator backend shares: the :class:`Generator` contract the loop calls, the
:class:`Samples` it returns, and the progress callback type.

Notation as in :mod:`dp_ops.engine.guidance`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

Progress = Callable[[int, int], None]  # (completed, total)


@dataclass(frozen=True)
class Samples:
    """Generated images in [-1, 1] with their labels, per-sample seeds and learner entropy (nats)."""

    images: torch.Tensor
    labels: torch.Tensor
    seeds: np.ndarray
    entropy: torch.Tensor
    unet_evals: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, idx: torch.Tensor) -> Samples:
        return Samples(self.images[idx], self.labels[idx], self.seeds[idx.numpy()], self.entropy[idx], self.unet_evals)


class Generator(Protocol):
    """What the loop needs from a generator backend (``pixel``: :class:`~dp_ops.engine.backends.pixel.PixelDiffusion`, ``sd``:
    :class:`dp_ops.engine.backends.sd.StableDiffusion`): one image per label from per-sample seeds, on the CPU, in [-1, 1],
    scored (and, with ω > 0, entropy-guided) by ``learner``."""

    def sample(
        self, labels: torch.Tensor, seeds: np.ndarray, *, steps: int, cfg_scale: float,
        learner: Callable[[torch.Tensor], torch.Tensor], omega: float = 0.0, guide_every: int = 1,
        batch_size: int = 256, progress: Progress | None = None,
    ) -> Samples: ...  # fmt: skip
