"""Per-round checkpoints, so a crash or Ctrl-C loses nothing that was finished.

After each completed round (its parts written and versioned, its MLflow run logged: the loop calls
``on_checkpoint`` only once every ``on_round`` hook has returned) the loop state — learner weights,
optimiser, EMA, iteration, plateau counter, round records, validation curve — is written to
``<output.checkpoints>/<run id>/state.pt`` with write-then-rename. No random state: every draw of
training is keyed by (seed, iteration). The pool is not in the checkpoint either: its table is rebuilt
from the round parts' headers. It only holds tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dp_ops.engine.loop import Observer
from dp_ops.files import atomic_path

STATE_FILE = "state.pt"


def checkpoint_path(checkpoints_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoints_dir) / run_id / STATE_FILE


class Checkpointer(Observer):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_checkpoint(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)
