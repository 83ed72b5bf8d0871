"""The format version of every thing dp_ops stores and reads back, and the one way an older one is read.

A checkpoint, a saved generator folder, a sweep's Optuna study and a tracked run each carry the number of
their format, written with them (:data:`FORMATS` says where). A reader gets the number with :func:`declared`
and brings the thing to the current format with :func:`upgrade`: one step per older format, each a cheap
function of the thing alone (a key renamed, metric names written, a table that has no entries yet), or, where
no cheap step exists, one line that says which format the thing is, which one this dp_ops reads and how to
re-make it. So what older versions of dp_ops wrote is handled in one step function per format, kept beside
the code that reads the thing, rather than by conditions scattered through the readers.

A thing that declares no version is format 0: it was written before dp_ops declared formats (0.11.0 and
earlier; a checkpoint declared its format from 0.5.0 on, so a checkpoint that declares none is older).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from dp_ops import __version__
from dp_ops.errors import ConfigError, DataError, DpOpsError, GeneratorError

T = TypeVar("T")


@dataclass(frozen=True)
class Format:
    """One kind of stored thing: its current format, what a message calls it, where its version is written,
    which error refuses it, and how a user re-makes one this dp_ops cannot read."""

    current: int
    what: str
    written: str
    error: type[DpOpsError]
    remake: str


FORMAT_TAG = "dpops.format"  # where a study (Optuna user attribute) and a run (MLflow tag) write their format

FORMATS: dict[str, Format] = {
    "checkpoint": Format(
        2,
        "checkpoint",
        "the dpops_checkpoint key of state.pt",
        DataError,
        "it cannot be resumed from: start a new run",
    ),
    "generator": Format(
        1,
        "generator folder",
        "the format key of dpops_generator.json",
        GeneratorError,
        "retrain it (dpops generator train replaces the folder) or point generator.path elsewhere",
    ),
    "study": Format(
        1,
        "sweep study",
        "the study's dpops.format user attribute",
        ConfigError,
        "use another --study-name",
    ),
    "run": Format(
        1,
        "dp_ops run",
        "the run's dpops.format MLflow tag",
        DataError,
        "make the run again with this dp_ops (the dp_ops that made it still reads it)",
    ),
}


class Unreadable(Exception):
    """Raised by an upgrade step for a thing it cannot bring forward (the reason); :func:`upgrade` turns it into
    the kind's one-line refusal."""


def declared(kind: str, value: object, where: str) -> int:
    """The format ``value`` (the version written with a thing; None: none written, format 0; MLflow tags and
    JSON give a decimal string or an int) declares; one newer than this dp_ops reads is refused in one line."""
    spec = FORMATS[kind]
    if value is None:
        return 0
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise spec.error(f"{where}: {spec.written} is {value!r}, not a format number; {spec.remake}")
    if value > spec.current:
        raise spec.error(
            f"{where} is format {value} of {spec.what}, newer than dp_ops {__version__} reads "
            f"(format {spec.current}): upgrade dp_ops"
        )
    return value


def upgrade(kind: str, thing: T, found: int, where: str, steps: Mapping[int, Callable[[T], T]]) -> T:
    """``thing``, of format ``found``, brought to the kind's current format by ``steps[found]``,
    ``steps[found + 1]``, …; a format without a step (or a step that raises :class:`Unreadable`) is refused."""
    for version in range(found, FORMATS[kind].current):
        step = steps.get(version)
        if step is None:
            refuse(kind, found, where)
        try:
            thing = step(thing)
        except Unreadable as why:
            refuse(kind, found, where, str(why))
    return thing


def refuse(kind: str, found: int, where: str, why: str = "") -> NoReturn:
    """The one line for a thing too old to read: its format, the one this dp_ops reads, and how to re-make it."""
    spec = FORMATS[kind]
    because = f" ({why})" if why else ""
    raise spec.error(
        f"{where} is format {found} of {spec.what}{because}; dp_ops {__version__} reads format {spec.current} "
        f"and cannot bring it forward: {spec.remake}"
    )
