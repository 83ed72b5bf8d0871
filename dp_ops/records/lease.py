"""A live run's lease, so that ``--resume`` never sets a second process training the same run.

While a run is trained its (rank 0) process holds ``<output.checkpoints>/<run id>/lease.json``: who
(user, host, pid) and when it last showed signs of life (``heartbeat``, refreshed from the loop's events
at most every :data:`BEAT_EVERY` seconds). The file is written atomically at the start and removed at the
end, however the run ends; only SIGKILL (or a lost machine) leaves it behind.

A lease is *live* when its heartbeat is younger than :data:`STALE_AFTER` and, on this host, its pid is
still running; a live lease refuses a resume with one line. Any other lease is stale: a resume takes it
over and says so. Checking and taking a lease happen under an exclusive lock on the run's folder, so two
resumes started together cannot both take it.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from dp_ops.engine.loop import Observer, RunResult
from dp_ops.errors import DataError
from dp_ops.files import write_json

LEASE_FILE = "lease.json"
BEAT_EVERY = 5.0  # seconds between heartbeats, at most
STALE_AFTER = 600.0  # a heartbeat this old means the holder is gone (or hung), wherever it ran


def lease_path(checkpoints_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoints_dir) / run_id / LEASE_FILE


@dataclass(frozen=True)
class Lease:
    run_id: str
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"pid {self.pid} on {self.host} (user {self.owner}), last heartbeat {age:.0f} s ago"

    def stale_because(self, now: float | None = None) -> str | None:
        """Why this lease no longer protects a run, or ``None`` while its holder is alive."""
        age = (now or time.time()) - self.heartbeat
        if age > STALE_AFTER:
            return f"its last heartbeat was {age:.0f} s ago"
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"pid {self.pid} is no longer running"
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_lease(path: Path) -> Lease | None:
    """The lease at ``path``; ``None`` when there is none (or it is unreadable: nobody can hold it)."""
    try:
        return Lease(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def check_free(path: Path, run_id: str, what: str = "") -> str | None:
    """Refuse (one line) if a live process holds ``run_id``'s lease; else the take-over note, if any.
    ``what``: the thing held when it is no run (e.g. ``benchmark full-1a2b``, whose process makes its runs)."""
    lease = read_lease(path)
    if lease is None:
        return None
    if (lease.host, lease.pid) == (socket.gethostname(), os.getpid()):
        return None  # this process's own (a study resuming a run it stopped)
    why = lease.stale_because()
    if why is None:
        held = f"{what}: already being run" if what else f"--resume {run_id}: the run is still being trained"
        raise DataError(f"{held} by {lease.describe()} ({path}); stop that process first (or wait for it to end)")
    return f"taking over {what or f'run {run_id}'} from {lease.describe()}: {why}"


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


class RunLease(Observer):
    """The lease of one run held by this process: :meth:`acquire` at the start, a heartbeat from the
    loop's events, :meth:`release` at the end. (A benchmark's process holds one too, ``what`` naming it,
    its heartbeat from a thread: :func:`dp_ops.studies.bench.held`.)"""

    def __init__(self, path: Path, run_id: str, what: str = "") -> None:
        self.path, self.run_id, self.what = path, run_id, what
        self.lease: Lease | None = None

    def acquire(self) -> str | None:
        """Take the lease (refusing a live holder, see :func:`check_free`); returns the take-over note."""
        with _locked(self.path.parent):
            note = check_free(self.path, self.run_id, self.what)
            now = time.time()
            self.lease = Lease(self.run_id, getpass.getuser(), socket.gethostname(), os.getpid(), now, now)
            write_json(self.path, asdict(self.lease))
        return note

    def beat(self, *, force: bool = False) -> None:
        if self.lease is None or (not force and time.time() - self.lease.heartbeat < BEAT_EVERY):
            return
        self.lease = Lease(**{**asdict(self.lease), "heartbeat": time.time()})
        write_json(self.path, asdict(self.lease))

    def release(self) -> None:
        """Remove the lease if it is still this process's (a take-over by another leaves theirs alone)."""
        if self.lease is None:
            return
        mine, self.lease = self.lease, None
        try:
            with _locked(self.path.parent):
                held = read_lease(self.path)
                if held is not None and (held.pid, held.host, held.started) == (mine.pid, mine.host, mine.started):
                    self.path.unlink(missing_ok=True)
        except OSError:  # (a read-only or vanished folder: the pid check makes the lease stale anyway)
            pass

    # ---- Observer hooks: any sign of life is a heartbeat ------------------------------------------------
    def on_progress(self, task: str, completed: int, total: int) -> None:
        self.beat()

    def on_eval(self, iteration: int, val_acc: float) -> None:
        self.beat()

    def on_checkpoint(self, state: dict) -> None:
        self.beat(force=True)

    def on_finish(self, result: RunResult) -> None:
        self.beat()
