"""The synthetic pool, streamed from its round parts: no process holds it.

- :class:`Pool` is a table of parts (path, count, offset) built from their headers; old data is never
  dropped (Algorithm 1, step 3), a round appends its parts.
- :class:`PoolDataset` is a map-style ``torch.utils.data.Dataset`` over that table: a batch is read
  lazily (memory-mapped raw images, or PNGs decoded where the DataLoader's workers run).
- :func:`batch_indices` is the stateless sampler: the mini-batch of iteration t is drawn uniformly, with
  replacement, over the pool as it stands, from a generator seeded by (seed, t) alone. Any process, any
  resume, any number of workers draws the same batch for the same t, and nothing needs checkpointing;
  the processes of a multi-process run each read their own rows of it.
- :func:`batches` feeds iterations [t0, t1) through a DataLoader (workers, pinned memory, prefetch);
  the loop asks only between evaluations, and rounds are acquired only after one, so prefetching never
  crosses a round.

Streaming libraries (webdataset, mosaicml-streaming, litdata) draw without replacement over a fixed
index and rewrite it on append: not the sampling Algorithm 1 asks for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dp_ops.engine.data import batch_indices
from dp_ops.engine.shards import Part, PartReader


class Pool:
    """The growing pool as a table of parts; ``len`` is the number of samples."""

    def __init__(self, parts: Sequence[Part] = ()) -> None:
        self.parts: list[Part] = []
        self.offsets: list[int] = [0]
        self.add(parts)

    def add(self, parts: Sequence[Part]) -> None:
        for part in parts:
            self.parts.append(part)
            self.offsets.append(self.offsets[-1] + part.count)

    def __len__(self) -> int:
        return self.offsets[-1]

    def dataset(self) -> PoolDataset:
        return PoolDataset(tuple(self.parts), tuple(self.offsets))

    def batches(
        self,
        seed: int,
        start: int,
        stop: int,
        batch_size: int,
        rows: slice = slice(None),
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 image and label batches of iterations ``start .. stop-1``, in order, through a DataLoader
        (``num_workers`` processes read and decode; pinned memory for a CUDA learner). ``rows``: the
        positions of each batch this process reads (its micro-batches of a multi-process run)."""
        sampler = [batch_indices(seed, t, len(self), batch_size)[rows].tolist() for t in range(start, stop)]
        loader = DataLoader(
            self.dataset(),
            batch_sampler=sampler,
            collate_fn=_whole_batch,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=2 if num_workers else None,
        )
        yield from loader


class PoolDataset(Dataset):
    """Sample i of the pool -> (uint8 image (C, R, R), label). Part files are opened lazily, once per
    process (each DataLoader worker maps its own)."""

    def __init__(self, parts: tuple[Part, ...], offsets: tuple[int, ...]) -> None:
        self.parts, self.offsets = parts, np.asarray(offsets, dtype=np.int64)
        self._readers: dict[int, tuple[PartReader, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _reader(self, p: int) -> tuple[PartReader, np.ndarray]:
        if p not in self._readers:
            reader = PartReader(self.parts[p].path)
            self._readers[p] = (reader, reader.array("labels"))
        return self._readers[p]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([i])
        return images[0], int(labels[0])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch at once: indices grouped by part, each part read once, original order kept."""
        idx = np.asarray(indices, dtype=np.int64)
        part_of = np.searchsorted(self.offsets, idx, side="right") - 1
        images: list[np.ndarray | None] = [None] * len(idx)
        labels = np.empty(len(idx), dtype=np.int64)
        for p in np.unique(part_of):
            rows = np.flatnonzero(part_of == p)
            local = idx[rows] - self.offsets[p]
            reader, part_labels = self._reader(int(p))
            for row, image in zip(rows, reader.images(local), strict=True):
                images[row] = image
            labels[rows] = part_labels[local]
        return torch.from_numpy(np.stack(images)), torch.from_numpy(labels)  # type: ignore[arg-type]


def _whole_batch(batch: Any) -> Any:
    return batch  # __getitems__ already returns a collated batch
