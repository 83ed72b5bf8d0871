"""Code that only the tests use: reference implementations and shortcuts the app itself no longer needs,
kept here so that dp_ops/ holds only what the app runs."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from dp_ops.config import Config
from dp_ops.engine.data import RealData
from dp_ops.engine.guidance import entropy
from dp_ops.engine.learner import Trainer
from dp_ops.engine.loop import DPLoop, Observer, RunResult
from dp_ops.engine.sampling import Generator


def learner_entropy(trainer: Trainer, images: torch.Tensor) -> torch.Tensor:
    """The learner's predictive entropy of each image, scored as it scores pools (eval mode, uint8 input,
    in chunks): the reference a sampler's reported entropy must match."""
    return entropy(trainer.logits(images))


def run_experiment(
    cfg: Config, generator: Generator, real: RealData, observers: Sequence[Observer] = (), shards: Path | None = None
) -> RunResult:
    """Run one DP (or baseline) experiment end to end, untracked. Same seed and config on CPU -> same records.
    ``shards``: where the round parts go; default a temporary folder, removed at the end."""
    if shards is not None:
        return DPLoop(cfg, generator, real, observers, shards=shards).run()
    with tempfile.TemporaryDirectory(prefix="dpops-parts-") as tmp:
        return DPLoop(cfg, generator, real, observers, shards=Path(tmp)).run()
