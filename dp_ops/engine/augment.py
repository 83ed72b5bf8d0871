"""Training-time augmentation of the learner's mini-batches, with explicit random streams.

- :func:`crop_flip`: per-sample random-resized-crop (area fraction U(min_scale, 1), aspect ratio
  log-uniform in [3/4, 4/3], as torchvision's) and/or horizontal flip, batched as one affine resampling
  (``affine_grid`` + ``grid_sample``) to the learner's input size, drawn from a ``torch.Generator``.
- :class:`MixCut`: timm's ``Mixup`` (Mixup α and CutMix α, label smoothing folded into the soft
  targets). timm draws from NumPy's *global* RNG; each call swaps in a state seeded by the training
  iteration's key and restores the caller's, so runs stay reproducible with nothing to checkpoint.
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before timm)

import math

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def crop_flip(images: Tensor, size: int, rng: torch.Generator, *, crop: bool, min_scale: float = 0.08) -> Tensor:
    """Random (resized crop and) horizontal flip of each image, output ``size``×``size``."""
    n = images.shape[0]
    if crop:
        area = min_scale + (1 - min_scale) * torch.rand(n, generator=rng)
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=rng)
        ratio = log_ratio.exp()
        w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # fractions of the side
        cx = (1 - w) * (2 * torch.rand(n, generator=rng) - 1)  # crop centre, normalised coordinates
        cy = (1 - h) * (2 * torch.rand(n, generator=rng) - 1)
    else:
        w = h = torch.ones(n)
        cx = cy = torch.zeros(n)
    flip = torch.where(torch.rand(n, generator=rng) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(images), [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def soft_target_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against soft targets (what Mixup/CutMix produce)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


class MixCut:
    """Mixup/CutMix of a batch with soft, label-smoothed targets. timm draws from NumPy's *global* RNG:
    each call swaps in a NumPy state seeded by the caller (the training iteration's key), then restores it."""

    def __init__(self, mixup: float, cutmix: float, label_smoothing: float, num_classes: int) -> None:
        from timm.data import Mixup

        self.mix = Mixup(
            mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes
        )

    def __call__(self, images: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        outside = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            return self.mix(images, labels)
        finally:
            np.random.set_state(outside)
