"""Per-round checkpoints, so a crash or Ctrl-C loses nothing that was finished.

After each completed round (its shard written and versioned, its MLflow run logged) the loop state —
learner weights, optimiser, iteration, mini-batch and dropout RNG streams, plateau counter, round records,
validation curve — is written to ``<output.checkpoints>/<run id>/state.pt`` with write-then-rename.
The pool itself is not in the checkpoint: it is rebuilt from the round shards. It only holds tensors and
plain Python values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dp_ops.engine.loop import Observer

STATE_FILE = "state.pt"


def checkpoint_path(checkpoints_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoints_dir) / run_id / STATE_FILE


class Checkpointer(Observer):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_checkpoint(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)
