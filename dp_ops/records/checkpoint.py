"""Per-round checkpoints, so a crash or Ctrl-C loses nothing that was finished.

After each completed round (its parts written and versioned, its MLflow run logged: the loop calls
``on_checkpoint`` only once every ``on_round`` hook has returned) the loop state — learner weights,
optimiser, EMA, iteration, plateau counter, round records, validation curve — is written to
``<output.checkpoints>/<run id>/state.pt`` with write-then-rename; once more at the end of the run, so
the file then holds the final learner (the weights behind ``final_test_acc``). No random state: every draw of
training is keyed by (seed, iteration). The pool is not in the checkpoint either: its table is rebuilt
from the round parts' headers. It only holds tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``, and to the CPU whatever device wrote it: a GPU run resumes on a machine
without one, and no process of a torchrun resume materialises the state on ``cuda:0``; ``Trainer.load_state_dict``
copies it into the learner where it lives (torch casts the optimiser's moments to its parameters' device).

The file carries the sha256 of the state it holds (:func:`state_digest`: every tensor's dtype, shape and
bytes and every plain value, in order), checked on load: torch's format has no checksum of its own, so a
file with flipped bytes would otherwise load as weights that are silently wrong. A checksum in the file
itself rather than beside it keeps the checkpoint one file, replaced in one rename.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from dp_ops.engine.loop import Observer
from dp_ops.errors import DataError
from dp_ops.files import atomic_path

STATE_FILE = "state.pt"
FORMAT = 1  # {"dpops_checkpoint": FORMAT, "sha256": state_digest(state), "state": state}
STATE_KEYS = ("records", "curve", "plateau", "trainer")  # what DPLoop.state_dict holds
_NO_RESUME = "it cannot be resumed from: start a new run, or put back a good copy of the file"


def checkpoint_path(checkpoints_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoints_dir) / run_id / STATE_FILE


class Checkpointer(Observer):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_checkpoint(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"dpops_checkpoint": FORMAT, "sha256": state_digest(state), "state": state}, tmp)


def load_checkpoint(path: Path) -> dict:
    """The loop state in ``path``, checksum verified; any problem is one :class:`DataError` naming the file.
    (A checkpoint written before checksums, a bare state, loads unchecked.)"""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no checkpoint there; {_NO_RESUME}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty checkpoint (0 bytes); {_NO_RESUME}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # (the learner moves it to its device)
    except Exception as exc:  # (torch raises anything from EOFError to RuntimeError on a damaged file)
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
        raise DataError(f"{path}: damaged checkpoint, torch cannot read it ({cause}); {_NO_RESUME}") from None
    if isinstance(saved, dict) and "dpops_checkpoint" in saved:
        state = saved.get("state")
        if saved.get("sha256") != state_digest(state):
            raise DataError(f"{path}: damaged checkpoint (its sha256 does not match its content); {_NO_RESUME}")
    else:
        state = saved  # a checkpoint from before checksums
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise DataError(f"{path}: not a dp_ops checkpoint (expected the keys {', '.join(STATE_KEYS)}); {_NO_RESUME}")
    return state


def state_digest(state: Any) -> str:
    """sha256 of a state as loaded: tensors by dtype, shape and bytes, containers in order, plain values
    by type and ``repr`` (exact for floats), so the state saved and the state loaded give the same digest."""
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h: Any, node: Any) -> None:
    if isinstance(node, torch.Tensor):
        t = node.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # (the bytes themselves, not a copy)
    elif isinstance(node, dict):
        h.update(f"dict:{len(node)}:".encode())
        for key, value in node.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(node, list | tuple):
        h.update(f"{type(node).__name__}:{len(node)}:".encode())
        for value in node:
            _feed(h, value)
    else:
        h.update(f"{type(node).__name__}:{node!r};".encode())
