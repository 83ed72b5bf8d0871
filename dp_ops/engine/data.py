"""Real data of the embedded world and the synthetic pool the learner trains on.

scikit-learn's bundled digits (1,797 8×8 images, 10 classes, no download) are split once, by
``data.split_seed``, into three disjoint parts:

- ``gen_train``: trains the generator (and the quality judge); the learner never sees it;
- ``val``: real validation, the only signal that drives patience (a decision);
- ``test``: held-out real test, reported at the end and never used for any decision.

Images are float tensors in [-1, 1] of shape (n, 1, R, R), upsampled bilinearly to the resolution R
the generator works at. (The text-to-image world reads image folders instead: :mod:`dp_ops.engine.folders`.)
:func:`resize` is the one way the engine resizes square image tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dp_ops.config import DataConfig

NUM_CLASSES = 10


# Streams of the (seed, iteration) keys: one per random draw of a training step.
BATCH, DROPOUT, AUGMENT, MIX = range(4)


def step_seed(seed: int, iteration: int, stream: int, micro: int = 0) -> int:
    """An independent 63-bit seed for one random draw (``stream``) of one training iteration: every draw
    of training is keyed by (seed, iteration), so any process, resume or device draws the same. Micro-batch
    ``micro`` > 0 of an iteration (``train.micro_batches``) draws from its own key; micro-batch 0 from the
    iteration's, so one micro-batch per iteration draws exactly what a whole batch does."""
    key = [seed, iteration, stream] + ([micro] if micro else [])
    state = np.random.SeedSequence(key).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def batch_indices(seed: int, iteration: int, pool_size: int, batch_size: int) -> torch.Tensor:
    """The stateless sampler: iteration ``iteration``'s mini-batch, uniform with replacement over a pool of
    ``pool_size`` samples as it stands (Algorithm 1, step 2)."""
    rng = torch.Generator().manual_seed(step_seed(seed, iteration, BATCH))
    return torch.randint(pool_size, (batch_size,), generator=rng)


@dataclass(frozen=True)
class LabelledImages:
    """Images, shape (n, C, R, R), in [-1, 1] (float) or 0..255 (uint8: the real splits of image folders),
    with integer labels, shape (n,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(
        self, seed: int, start: int, stop: int, batch_size: int, rows: slice = slice(None)
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches of iterations ``start .. stop-1`` drawn by :func:`batch_indices`, positions ``rows`` of
        each (a process's share of it); in memory: for small real sets such as the quality judge's (the
        synthetic pool streams, :mod:`dp_ops.engine.pool`)."""
        for t in range(start, stop):
            idx = batch_indices(seed, t, len(self), batch_size)[rows]
            yield self.images[idx], self.labels[idx]


@dataclass(frozen=True)
class RealData:
    gen_train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    num_classes: int
    resolution: int
    class_names: tuple[str, ...] = ()  # what prompts call each class, in label order


def load_digits_data(cfg: DataConfig) -> RealData:
    """Load, split (stratified, deterministic in ``cfg.split_seed``) and upsample the digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    held_fraction = cfg.val_fraction + cfg.test_fraction
    gen_idx, held_idx = train_test_split(idx, test_size=held_fraction, stratify=y, random_state=cfg.split_seed)
    val_idx, test_idx = train_test_split(
        held_idx, test_size=cfg.test_fraction / held_fraction, stratify=y[held_idx], random_state=cfg.split_seed
    )

    def part(ix: np.ndarray) -> LabelledImages:
        images = torch.from_numpy(x[np.sort(ix)]).unsqueeze(1)
        # Upsampling needs no antialiasing; without it the digits stay bit-identical to those earlier runs used.
        images = resize(images, cfg.resolution, antialias=False).clamp(0, 1)
        return LabelledImages(to_model_range(images), torch.from_numpy(y[np.sort(ix)]))

    names = tuple(str(i) for i in range(NUM_CLASSES))
    return RealData(part(gen_idx), part(val_idx), part(test_idx), NUM_CLASSES, cfg.resolution, class_names=names)


def resize(images: torch.Tensor, size: int, *, antialias: bool = True) -> torch.Tensor:
    """Square images (n, C, R, R) bilinearly resized to ``size``×``size``, differentiably; antialiased so
    that shrinking averages instead of skipping pixels. The same tensor if already that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def to_model_range(images01: torch.Tensor) -> torch.Tensor:
    return images01 * 2 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 0..255 (what shards and sample grids store)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> [-1, 1] floats (float images are returned as they are)."""
    if images.dtype != torch.uint8:
        return images
    return images.float() / 127.5 - 1


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels a shard stores, so the pool trained on is exactly the versioned data
    (and a resumed run, whose pool is rebuilt from shards, trains on the same numbers)."""
    return from_uint8(to_uint8(images))


def balanced_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels as even over classes as possible, in random order."""
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=generator)]
