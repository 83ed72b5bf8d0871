"""Real data of the text-to-image world: image folders ``<root>/<class_folder>/*.png|jpg|jpeg``.

``data.val_root`` holds the real validation split (it drives patience), ``data.test_root`` the held-out
test split (reported, never used for a decision); both have one sub-folder per class. Class order (the
label index) is ``data.classes`` when given — e.g. the 100 ImageNet folders of ImageNet-100 inside a
full ImageNet tree; other folders are then ignored — else every class folder, sorted by name, and then
both splits must have the same ones. ``data.class_names`` are what prompts say (default: the folder name
with ``_`` as a space).

Images are converted to RGB, resized so the shorter side is ``data.resolution`` and centre-cropped to a
square, and held as uint8. Under torchrun each process decodes only its block of each split's evaluation
chunks (the ones it scores: :meth:`~dp_ops.engine.dist.World.chunk_rows`); the file lists are cheap, the
pixels are not (ImageNet-1k's two splits are 15 GB, on every one of 8 processes). Every problem —
no such folder, no class folders, an empty class, mismatched class sets, an unreadable file — is one
:class:`~dp_ops.errors.DataError` line naming the key or path, raised before any generation or training.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dp_ops.config import DataConfig
from dp_ops.engine.data import LabelledImages, RealData
from dp_ops.engine.dist import SINGLE, World
from dp_ops.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_KEYS = ("val_root", "test_root")


@dataclass(frozen=True)
class FolderSplit:
    """One split: its config key, its root and, per class folder, the sorted image files."""

    key: str
    root: Path
    files: dict[str, list[Path]]


@dataclass(frozen=True)
class FolderDataset:
    """Both splits after every structural check; ``classes`` are folder names in label order."""

    classes: tuple[str, ...]
    names: tuple[str, ...]
    splits: tuple[FolderSplit, ...]


def scan_split(key: str, root: str | Path) -> FolderSplit:
    """List ``<root>/<class>/`` image files (hidden entries skipped); no image is opened here."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.{key}={str(root)!r}: no such folder (expected <root>/<class>/*.png|jpg|jpeg)")
    files = {
        d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    if not files:
        raise DataError(f"data.{key}={str(root)!r}: no class folders in it (expected <root>/<class>/*.png|jpg|jpeg)")
    return FolderSplit(key, root, files)


def scan_folders(cfg: DataConfig) -> FolderDataset:
    """Structural checks of both splits (cheap: lists files, opens none)."""
    splits = tuple(scan_split(key, getattr(cfg, key)) for key in SPLIT_KEYS)
    classes = cfg.classes or _common_classes(*splits)
    for split in splits:
        missing = [c for c in classes if c not in split.files]
        if missing:
            raise DataError(
                f"data.classes: {missing[0]!r} has no folder in data.{split.key}={str(split.root)!r} "
                f"({len(missing)} of {len(classes)} classes missing there)"
            )
        for c in classes:
            if not split.files[c]:
                raise DataError(
                    f"{split.root / c}: empty class folder (data.{split.key}); every class needs at least "
                    f"one {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} image"
                )
    names = cfg.class_names or tuple(c.replace("_", " ") for c in classes)
    return FolderDataset(tuple(classes), tuple(names), splits)


def _common_classes(val: FolderSplit, test: FolderSplit) -> tuple[str, ...]:
    if set(val.files) != set(test.files):
        only_val = sorted(set(val.files) - set(test.files))
        only_test = sorted(set(test.files) - set(val.files))
        raise DataError(
            f"data.val_root and data.test_root have different class folders (only in val: {only_val[:5]}, "
            f"only in test: {only_test[:5]}); make them match or list the classes to use in data.classes"
        )
    return tuple(sorted(val.files))


def load_folder_data(cfg: DataConfig, workers: int | None = None, *, world: World = SINGLE, chunk: int = 1) -> RealData:
    """Read and check the images of both splits (under torchrun, ``world``: this process's block of their
    chunks of ``chunk``, ``train.eval_batch_size``); labels follow ``data.classes`` order."""
    dataset = scan_folders(cfg)
    val, test = (_read_split(split, dataset.classes, cfg.resolution, workers, world, chunk) for split in dataset.splits)
    empty = _images(cfg.resolution, [], [])
    return RealData(empty, val, test, len(dataset.classes), cfg.resolution, class_names=dataset.names)


def _read_split(
    split: FolderSplit, classes: tuple[str, ...], resolution: int, workers: int | None, world: World, chunk: int
) -> LabelledImages:
    paths = [p for c in classes for p in split.files[c]]
    labels = [i for i, c in enumerate(classes) for _ in split.files[c]]
    rows = world.chunk_rows(len(paths), chunk)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes outside the GIL
        arrays = list(pool.map(lambda p: read_image(p, resolution, split.key), paths[rows.start : rows.stop]))
    mine = _images(resolution, arrays, labels[rows.start : rows.stop])
    return replace(mine, split_size=len(paths)) if world.distributed else mine


def _images(resolution: int, arrays: list[np.ndarray], labels: list[int]) -> LabelledImages:
    # held as uint8 (¼ of float32) and turned into floats a chunk at a time where they are evaluated
    # (Trainer.logits)
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, 3, resolution, resolution)
    return LabelledImages(images.to(torch.uint8), torch.tensor(labels, dtype=torch.int64))


def read_image(path: Path, resolution: int, key: str = "val_root") -> np.ndarray:
    """One image as uint8 (3, R, R): RGB, shorter side resized to R (antialiased), centre square."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            im = opened.convert("RGB")
            w, h = im.size
            scale = resolution / min(w, h)
            size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
            im = im.resize(size, Image.Resampling.BICUBIC)
            left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: unreadable image (data.{key}): {reason}") from None
