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

Its format (:data:`dp_ops.formats.FORMATS`) is the file's ``dpops_checkpoint`` key; an older one is brought
forward on load, one step per format (:data:`UPGRADES`): format 0, the bare state of dp_ops before 0.5.0, has
no checksum to check; format 1 (before 0.10.0) may name a round's model evaluations ``unet_evals``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from dp_ops.engine.loop import Observer
from dp_ops.errors import DataError
from dp_ops.files import atomic_path
from dp_ops.formats import FORMATS, Unreadable, declared, upgrade

STATE_FILE = "state.pt"
VERSION_KEY = "dpops_checkpoint"  # {VERSION_KEY: format, "sha256": state_digest(state), "state": state}
STATE_KEYS = ("records", "curve", "plateau", "trainer")  # what DPLoop.state_dict holds
_NO_RESUME = "it cannot be resumed from: start a new run, or put back a good copy of the file"


def checkpoint_path(checkpoints_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoints_dir) / run_id / STATE_FILE


class Checkpointer(Observer):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_checkpoint(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:
            version = FORMATS["checkpoint"].current
            torch.save({VERSION_KEY: version, "sha256": state_digest(state), "state": state}, tmp)


def load_checkpoint(path: Path) -> dict:
    """The loop state in ``path``, checksum verified and brought to the current format; any problem is one
    :class:`DataError` naming the file."""
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
    found, state = 0, saved  # (format 0: the bare state, no version, no checksum)
    if isinstance(saved, dict) and VERSION_KEY in saved:
        found, state = declared("checkpoint", saved[VERSION_KEY], str(path)), saved.get("state")
        if saved.get("sha256") != state_digest(state):
            raise DataError(f"{path}: damaged checkpoint (its sha256 does not match its content); {_NO_RESUME}")
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise DataError(f"{path}: not a dp_ops checkpoint (expected the keys {', '.join(STATE_KEYS)}); {_NO_RESUME}")
    return upgrade("checkpoint", state, found, str(path), UPGRADES)


def _from_bare(state: dict) -> dict:
    """Format 0 → 1: a bare state has no checksum to check. Its round records carry ω unless dp_ops 0.1 wrote
    it, which did not store rounds as parts: such a run cannot be resumed."""
    if any(not isinstance(r, dict) or "omega" not in r for r in state["records"]):
        raise Unreadable("its round records have no ω: written by dp_ops 0.1, before rounds were stored as parts")
    return state


def _model_evals(state: dict) -> dict:
    """Format 1 → 2: a round's model evaluations, called ``unet_evals`` before 0.10.0, are ``model_evals``."""
    state["records"] = [
        {("model_evals" if k == "unet_evals" else k): v for k, v in r.items()} for r in state["records"]
    ]
    return state


UPGRADES = {0: _from_bare, 1: _model_evals}  # format -> the step to the next one


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
