"""Files that are never seen half-written, and the one JSON convention.

Every file or folder dp_ops writes for someone else to read (a metrics file DVC reads, a checkpoint,
a round shard, a saved generator, a report) goes through :func:`atomic_path`: it is written under a
temporary name in the same folder and renamed into place, so a crash, Ctrl-C or SIGKILL leaves either
the old content or the new, never a truncated file under the final name.

JSON has no ∞ or NaN: :func:`json_ready` turns every non-finite float into ``null`` and
:func:`write_json` writes with ``allow_nan=False``, so a stray NaN fails loudly instead of producing a
file that strict readers (DVC, browsers) reject.

Part of the foundation (with :mod:`dp_ops.config` and :mod:`dp_ops.errors`): standard library only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` (not created yet: write a file there, or with
    ``folder`` an empty directory is made for you to fill); on success it replaces ``path``; on any
    exception it is removed and ``path`` is untouched.

    A folder cannot be swapped in one rename: an existing one is renamed aside, the new one renamed into
    place, then the old one deleted, so ``path`` is never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder:
            _swap_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _sibling(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` that no other process uses (files are created with the usual mode)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


def _swap_folder(new: Path, path: Path) -> None:
    old = None
    if path.exists():
        old = _sibling(path, "old")
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def json_ready(node: Any) -> Any:
    """``node`` with every non-finite float as ``None`` (JSON has no inf/NaN), tuples as lists and dict
    keys as strings; numpy scalars become Python numbers."""
    if isinstance(node, dict):
        return {str(k): json_ready(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [json_ready(v) for v in node]
    if type(node).__module__ == "numpy" and getattr(node, "ndim", None) == 0:
        node = node.item()  # a numpy scalar
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def write_json(path: str | Path, payload: Any) -> None:
    """``payload`` as indented JSON (non-finite floats as ``null``), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_ready(payload), indent=2, allow_nan=False) + "\n")
