"""Generating a round part by part: memory bounded by a part, not by the round.

A round's samples are fixed before anything is generated: per-sample labels and noise seeds for indices
0..n-1. Part p (samples [p·S, (p+1)·S)) is generated batch by batch in exactly the batches a single
process uses, each batch turned into uint8 at once (no float pile), and written while the next part is
generated (one part in flight). :func:`generate_round` can make any subset of a round's parts: the bytes of
a part depend on its sample indices only.

``oversample`` generates r·P candidates into a scratch folder, keeps the top-P by learner entropy over
the whole round (entropies are small, :func:`top_order`), and copies the kept images part by part
(:func:`keep_top`).

In a multi-process run each process makes its block of the parts; :func:`gather_round` then gives every
process the whole round's facts (parts, entropies, model evaluations). :func:`make_round` is that
choreography for a round of the loop: which process makes which parts, and where they wait for each other.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dp_ops.engine.data import to_uint8
from dp_ops.engine.dist import World
from dp_ops.engine.pool import Pool
from dp_ops.engine.sampling import Generator, Progress, Samples
from dp_ops.engine.shards import Part, part_name, part_slices, write_part
from dp_ops.errors import GeneratorError, NonFiniteError


@dataclass(frozen=True)
class RoundParts:
    """What a round wrote: its folder and parts, and the small per-sample arrays of all its samples."""

    folder: Path
    parts: tuple[Part, ...]
    labels: np.ndarray  # int64 (n,)
    seeds: np.ndarray  # int64 (n,)
    entropy: np.ndarray  # float32 (n,): learner entropy (nats) at generation
    omega: float
    model_evals: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def images(self, idx: np.ndarray) -> np.ndarray:
        """uint8 images of round samples ``idx``, in that order, read from the parts as the pool reads them."""
        images, _ = Pool(self.parts).dataset().__getitems__(np.asarray(idx, dtype=np.int64).tolist())
        return images.numpy()


@dataclass(frozen=True)
class Sampling:
    """How the generator is called (the same for every batch of a round)."""

    steps: int
    cfg_scale: float
    guide_every: int
    batch_size: int
    learner: Callable[[torch.Tensor], torch.Tensor]
    gradient: str = "full"  # generator.guidance_gradient
    precision: str = "float32"  # generator.precision


def generate_round(
    generator: Generator,
    labels: torch.Tensor,
    seeds: np.ndarray,
    folder: Path,
    how: Sampling,
    *,
    round_index: int,
    omega: float,
    part_size: int,
    fmt: str,
    parts: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> RoundParts:
    """Generate and write the round's parts ``parts`` (default: all) into ``folder``."""
    slices = part_slices(len(labels), part_size)
    wanted = range(len(slices)) if parts is None else parts
    total, done = sum(slices[p].stop - slices[p].start for p in wanted), 0
    written: list[Future[Part]] = []
    ents, evals = np.zeros(len(labels), np.float32), 0
    with ThreadPoolExecutor(max_workers=1) as writer:  # one part written while the next is generated
        for p in wanted:
            sl = slices[p]
            images = None
            for b in range(sl.start, sl.stop, how.batch_size):
                s = generator.sample(
                    labels[b : b + how.batch_size],
                    seeds[b : b + how.batch_size],
                    steps=how.steps,
                    cfg_scale=how.cfg_scale,
                    learner=how.learner,
                    omega=omega,
                    guide_every=how.guide_every,
                    gradient=how.gradient,
                    precision=how.precision,
                    batch_size=how.batch_size,
                )
                _check_finite(s, round_index, b)  # before anything of it is written (to_uint8 makes NaN 0)
                batch = to_uint8(s.images).numpy()
                _check_saturated(batch, round_index, b, omega)
                if images is None:
                    images = np.empty((sl.stop - sl.start, *batch.shape[1:]), np.uint8)
                images[b - sl.start : b - sl.start + len(batch)] = batch
                ents[b : b + len(batch)] = s.entropy.numpy()
                evals += s.model_evals
                done += len(batch)
                if progress:
                    progress(done, total)
            assert images is not None  # (a part has at least one batch)
            if written:
                written[-1].result()  # at most one part waits to be written: memory stays bounded
            written.append(
                writer.submit(
                    write_part,
                    folder / part_name(p),
                    images,
                    labels[sl].numpy(),
                    ents[sl],
                    seeds[sl],
                    round_index=round_index,
                    index=p,
                    start=sl.start,
                    omega=omega,
                    fmt=fmt,
                )
            )
            del images
        made = tuple(f.result() for f in written)
    return RoundParts(folder, made, labels.numpy().astype(np.int64), np.asarray(seeds, np.int64), ents, omega, evals)


def _check_finite(s: Samples, round_index: int, start: int) -> None:
    """Refuse NaN or infinite samples or entropies: written, they would be all-black images with NaN
    entropy, versioned and trained on as if they were data."""
    where = f"round {round_index}, samples {start}-{start + len(s) - 1}"
    if not bool(torch.isfinite(s.images).all()):
        raise GeneratorError(
            f"{where}: the generator's samples are not finite (NaN or inf): its weights are damaged or diverged "
            "(pixel: retrain it with dpops generator train; sd in float16: try generator.dtype=float32)"
        )
    if not bool(torch.isfinite(s.entropy).all()):
        raise NonFiniteError(f"{where}: the learner's entropy is not finite (NaN or inf): the learner diverged")


# Images whose pixels take a handful of values are no longer images: a huge ω pushes x_t far past the data
# (ω = 1e39 stays finite in the default setup), and what comes back is a few levels, or only ±1 after the
# clamp. Distinct uint8 values per image, measured (issue 30): the default digits generator (16 px, 256
# pixels) 102 to 158 at ω <= 1 and CFG up to 30, a median of 13 at ω = 100 and 10 at ω = 1e39; the tiny
# 8 px test generator 32 or more at ω <= 1, 2 at ω = 100. A batch whose median image has fewer is refused.
MIN_DISTINCT = 16


def _check_saturated(batch: np.ndarray, round_index: int, start: int, omega: float) -> None:
    """Refuse a batch of saturated images (uint8 (n, C, R, R)): its median image takes fewer than
    :data:`MIN_DISTINCT` pixel values (or a quarter of its pixels, for very small images). Versioned, they
    would be trained on as data, as non-finite samples would."""
    flat = batch.reshape(len(batch), -1)
    # one bincount for the batch: image i's values counted in bins [256·i, 256·(i+1))
    counts = np.bincount((np.arange(len(flat))[:, None] * 256 + flat).ravel(), minlength=256 * len(flat))
    distinct = np.median((counts.reshape(len(flat), 256) > 0).sum(axis=1))
    if distinct < min(MIN_DISTINCT, flat.shape[1] // 4):
        raise GeneratorError(
            f"round {round_index}, samples {start}-{start + len(batch) - 1}: the generator's samples saturate (a "
            f"median of {distinct:g} distinct pixel values per image; images take over {MIN_DISTINCT}): at "
            f"ω={omega:g} the guided steps overshoot (dp.omega is a fraction of ‖x_t‖: keep it at most 1), or the "
            "generator diverged (pixel: retrain it with dpops generator train)"
        )


def gather_round(world: World, mine: RoundParts) -> RoundParts:
    """The whole round on every process, from each process's ``mine`` (its parts, and the entropies and
    model evaluations of their samples; labels and seeds are the round's on every process already)."""
    if not world.distributed:
        return mine
    shares = world.all_gather((mine.parts, [mine.entropy[p.start : p.start + p.count] for p in mine.parts]))
    entropy, parts = mine.entropy.copy(), []
    for their_parts, their_entropy in shares:
        for part, ent in zip(their_parts, their_entropy, strict=True):
            entropy[part.start : part.start + part.count] = ent
            parts.append(part)
    (evals,) = world.all_sum([mine.model_evals])
    return replace(mine, parts=tuple(sorted(parts, key=lambda p: p.index)), entropy=entropy, model_evals=evals)


def top_order(entropy: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` samples of highest learner entropy over the whole round, ties in index order."""
    return np.argsort(-entropy, kind="stable")[:keep]


def keep_top(
    candidates: RoundParts,
    order: np.ndarray,
    folder: Path,
    *,
    part_size: int,
    fmt: str,
    parts: Sequence[int] | None = None,
) -> RoundParts:
    """The candidates ``order`` (:func:`top_order`), in that order, written as the parts ``parts`` (default:
    all) of ``folder``; the candidates' scratch folder is the caller's to remove."""
    slices = part_slices(len(order), part_size)
    made = []
    for q in range(len(slices)) if parts is None else parts:
        chosen = order[slices[q]]
        made.append(
            write_part(
                folder / part_name(q),
                candidates.images(chosen),
                candidates.labels[chosen],
                candidates.entropy[chosen],
                candidates.seeds[chosen],
                round_index=candidates.parts[0].round,
                index=q,
                start=slices[q].start,
                omega=candidates.omega,
                fmt=fmt,
            )
        )
    return RoundParts(
        folder,
        tuple(made),
        candidates.labels[order],
        candidates.seeds[order],
        candidates.entropy[order],
        candidates.omega,
        candidates.model_evals,
    )


def make_round(
    generator: Generator,
    labels: torch.Tensor,
    seeds: np.ndarray,
    folder: Path,
    how: Sampling,
    world: World,
    *,
    round_index: int,
    omega: float,
    keep: int,
    part_size: int,
    fmt: str,
    progress: Progress | None = None,
) -> RoundParts:
    """The round's parts in ``folder``, made by every process of ``world`` together, each its block of the
    parts; the whole round's facts on every process. With ``keep`` < the number of samples, the candidates go
    to a scratch folder (format ``raw``) and only the ``keep`` of highest learner entropy (chosen by rank 0)
    become the round."""
    n = len(labels)
    out = folder if keep == n else folder.with_name(folder.name + ".candidates")
    if world.main:  # a round interrupted before its checkpoint is made again
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    world.barrier()
    mine = generate_round(
        generator,
        labels,
        seeds,
        out,
        how,
        round_index=round_index,
        omega=omega,
        part_size=part_size,
        fmt=fmt if keep == n else "raw",  # (candidates: a scratch format)
        parts=world.block(len(part_slices(n, part_size))),
        progress=progress,
    )
    made = gather_round(world, mine)
    if keep == n:
        return made
    order: np.ndarray = world.broadcast(top_order(made.entropy, keep) if world.main else None)
    kept = keep_top(
        made, order, folder, part_size=part_size, fmt=fmt, parts=world.block(len(part_slices(keep, part_size)))
    )
    kept = replace(kept, parts=tuple(p for share in world.all_gather(kept.parts) for p in share))
    world.barrier()  # (every process has read its candidates)
    if world.main:
        shutil.rmtree(made.folder, ignore_errors=True)
    return kept
