"""SIGTERM as Ctrl-C: the one place dp_ops handles signals.

A scheduler (Slurm, Kubernetes, torchrun's agent) stops a job with SIGTERM; while a command runs it raises
``KeyboardInterrupt`` in the main thread, as Ctrl-C does, so that the run ends KILLED at its last completed
round. While a stopped run is being ended (:func:`ending`), SIGTERM is noted and not raised: raised inside
a store write, it would leave the run half-ended and the store's driver logging a traceback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_TERMINATED: list[int] = []  # the SIGTERM that stopped this command, if one did
_ENDING: list[bool] = []  # non-empty while a stopped run is being ended


def terminated() -> bool:
    """Whether a SIGTERM reached the command that runs (raised or, while a run was ending, noted)."""
    return bool(_TERMINATED)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, the first SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does; a
    second one is ignored, so that ending the run KILLED is not itself cut short (SIGKILL still is)."""
    _TERMINATED.clear()
    if threading.current_thread() is not threading.main_thread():  # (signals reach the main thread only)
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if not _TERMINATED:
            _TERMINATED.append(signum)
            if not _ENDING:
                raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def ending() -> Iterator[None]:
    """Around ending a run that an exception stopped: a SIGTERM that arrives meanwhile is noted, not raised
    (the run is stopping already; Ctrl-C still cuts it short, as a user pressing it twice means)."""
    _ENDING.append(True)
    try:
        yield
    finally:
        _ENDING.pop()
