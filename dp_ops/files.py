"""Files that are never seen half-written, and the one JSON convention.

Every file or folder dp_ops writes for someone else to read (a metrics file DVC reads, a checkpoint,
a round shard, a saved generator, a report) goes through :func:`atomic_path`: it is written under a
temporary name in the same folder and renamed into place, so a crash, Ctrl-C or SIGKILL leaves either
the old content or the new, never a truncated file under the final name.

JSON has no ∞ or NaN: :func:`json_ready` turns every non-finite float into ``null`` and
:func:`write_json` writes with ``allow_nan=False``, so a stray NaN fails loudly instead of producing a
file that strict readers (DVC, browsers) reject.

Where a write can fail for reasons outside the program (a read-only workspace, a path under a regular
file, a full disk), :func:`unwritable` finds out before any work starts and :func:`disk_error` names the
cause when it happens mid-run, so either becomes one line.

Processes that start together may all find a database file missing and create it at once: :func:`file_lock`
makes them take turns (a SQLite store: MLflow's tracking store, Optuna's study storage).

Part of the foundation (with :mod:`dp_ops.config` and :mod:`dp_ops.errors`): the standard library only at
import (:func:`file_lock` imports ``filelock`` when it is taken).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from dp_ops.errors import DataError


@contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` (not created yet: write a file there, or with
    ``folder`` an empty directory is made for you to fill); on success it replaces ``path``; on any
    exception it is removed and ``path`` is untouched. What is written gets the mode ``open`` gives (0644
    under umask 022), and a full or read-only disk is raised as an ``OSError`` naming ``path``.

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
        _usual_mode(tmp)
        if folder:
            _swap_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            _raise_named(exc, path)
        raise


def _sibling(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` that no other process uses."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


def _usual_mode(tmp: Path) -> None:
    """Give the written file(s) the mode ``open`` gives under the umask (0644 under the usual 022): some
    writers (safetensors, ``tempfile.mkstemp``) create theirs 0600, unreadable to the group that shares a
    workspace or a DVC cache."""
    mode = 0o666 & ~_umask()
    for file in tmp.rglob("*") if tmp.is_dir() else [tmp]:
        if file.is_file() and not file.is_symlink():
            with suppress(PermissionError):  # (a filesystem without modes: vfat, some network mounts)
                os.chmod(file, mode)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read it back is
    not safe while another thread creates files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _raise_named(exc: Exception, path: Path) -> None:
    """Re-raise a full disk (or a read-only one) met while writing ``path`` as an ``OSError`` naming ``path``:
    ``torch.save`` and safetensors report it as a ``RuntimeError`` of their own that names no file, and a
    plain write names none or the temporary sibling."""
    found = _disk_cause(exc, [path.parent])
    if found is None or (found[1] is not None and path.parent not in [Path(found[1]), *Path(found[1]).parents]):
        return  # (not a disk error, or one elsewhere, named already)
    raise OSError(found[0], os.strerror(found[0]), str(path)) from exc


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


def unwritable(path: str | Path, *, folder: bool = False) -> str | None:
    """Why ``path`` (a file, or with ``folder`` a folder) cannot be written, or ``None`` if it can.

    Nothing is created: the nearest existing ancestor must be a folder where a file can be made (tried
    for real, with a temporary file removed at once: root ignores permission bits but not a read-only
    filesystem, and ``os.access`` answers for neither); ``path`` itself, if it exists, must be of the
    right kind."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        return f"{path} is {'a file, not a folder' if folder else 'a folder, not a file'}"
    base = path if folder and path.is_dir() else path.parent
    while not base.exists() and base != base.parent:
        if base.is_symlink():
            return f"{base} is a dangling link"
        base = base.parent
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        return f"{base}: {exc.strerror or exc}"
    return None


DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
# How the writers that raise no OSError say so (torch.save, safetensors: not at all; SQLite: "disk is full").
_DISK_MESSAGES = (
    (errno.ENOSPC, "No space left on device"),
    (errno.ENOSPC, "database or disk is full"),
    (errno.EDQUOT, "Disk quota exceeded"),
    (errno.EROFS, "Read-only file system"),
)


def disk_error(exc: BaseException, folders: Sequence[str | Path] = ()) -> str | None:
    """``"<file>: no space left on device"`` (or quota exceeded, read-only filesystem) when ``exc``, or an
    exception it was raised from or during, is one; else ``None``. A file in the temporary folder is named
    with it (``TMPDIR=…``: what to point elsewhere). Some writers (``torch.save``, safetensors, SQLite) report
    a full disk only in words of their own: then a folder among ``folders`` (the outputs written to), or the
    temporary folder, with under 1 MiB free is taken for the place."""
    found = _disk_cause(exc, folders)
    if found is None:
        return None
    code, where = found
    if where is None:
        return DISK_ERRORS[code]
    if _within(where, [tempfile.gettempdir()]) and not _within(where, folders):
        where = f"TMPDIR={tempfile.gettempdir()}" + ("" if where == tempfile.gettempdir() else f" ({where})")
    return f"{where}: {DISK_ERRORS[code]}"


def _within(path: str | Path, folders: Sequence[str | Path]) -> bool:
    """Is ``path`` one of ``folders`` or inside one?"""
    path = Path(path).resolve()
    return any(path == Path(f).resolve() or Path(f).resolve() in path.parents for f in folders)


def _disk_cause(exc: BaseException, folders: Sequence[str | Path]) -> tuple[int, str | None] | None:
    """(errno, the file or folder if known) of the disk error behind ``exc`` (see :func:`disk_error`)."""
    seen: set[int] = set()
    node: BaseException | None = exc
    code = None
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, OSError) and node.errno in DISK_ERRORS:
            if node.filename:
                return node.errno, str(node.filename)
            code = code or node.errno
        for number, words in _DISK_MESSAGES:
            code = code or (number if words in str(node) else None)
        node = node.__cause__ or node.__context__
    for folder in [*folders, tempfile.gettempdir()]:
        base = Path(folder)
        while not base.exists() and base != base.parent:
            base = base.parent
        try:
            if shutil.disk_usage(base).free < 2**20:
                return code or errno.ENOSPC, str(folder)
        except OSError:
            continue
    return None if code is None else (code, None)


# ---- a DVC experiment's temporary copy --------------------------------------------------------------------
# `dvc exp run --queue` (then `dvc queue start`) and `dvc exp run --temp` run each experiment's stages in a
# copy of the workspace under `.dvc/tmp/exps/`, which DVC deletes once it has collected the stages' outs into
# the experiment. DVC sets DVC_ROOT in the stage's environment to the user's workspace (the copy's own root
# otherwise), so a stage can tell that it runs in such a copy, and where the workspace is.


def experiment_copy() -> tuple[Path, Path] | None:
    """(the copy's DVC root, the user's workspace root) while this process runs a stage of a DVC experiment
    in a temporary copy of the workspace; None anywhere else (a plain run, ``dvc repro``, ``dvc exp run`` in
    the workspace itself)."""
    workspace, stage = os.environ.get("DVC_ROOT"), os.environ.get("DVC_STAGE")
    if not workspace or not stage:
        return None
    here = Path.cwd().resolve()
    copy = next((folder for folder in (here, *here.parents) if (folder / ".dvc").is_dir()), None)
    if copy is None or copy == Path(workspace).resolve():
        return None
    return copy, Path(workspace)


def workspace_path(path: str | Path) -> Path:
    """Where a path that must outlive a DVC experiment's temporary copy lies: a relative one resolved against
    the same folder of the user's workspace instead of the copy, which DVC deletes (a checkpoint, a tracking
    or study database). Unchanged outside such a copy, or when absolute. A stage's declared outs must not
    go through this: DVC collects them from the copy."""
    path = Path(path)
    where = experiment_copy()
    if where is None or path.is_absolute():
        return path
    copy, workspace = where
    return workspace / Path.cwd().resolve().relative_to(copy) / path


SQLITE = "sqlite:///"


def workspace_uri(uri: str) -> str:
    """A ``sqlite:///<relative file>`` URI (MLflow's default ``sqlite:///mlflow.db``, Optuna's
    ``sqlite:///optuna.db``) with its file where :func:`workspace_path` puts it; any other URI unchanged."""
    if not uri.startswith(SQLITE):
        return uri
    file, sep, query = uri.removeprefix(SQLITE).partition("?")
    if not file or Path(file).is_absolute():
        return uri
    return f"{SQLITE}{workspace_path(file)}{sep}{query}"


def workspace_storage(url: str) -> str:
    """An Optuna storage (``sweep.storage``: an SQLAlchemy URL or a journal file's path) as
    :func:`workspace_uri` and :func:`workspace_path` place it."""
    return workspace_uri(url) if "://" in url else str(workspace_path(url))


LOCK_TIMEOUT = 600.0  # seconds to wait for another process that creates the same file


@contextmanager
def file_lock(path: str | Path, what: str) -> Iterator[None]:
    """An inter-process lock beside ``path`` (``<path>.dpops.lock``) while a store there is created or
    opened: concurrent creators of one SQLite database (MLflow's migrations, Optuna's tables) take turns,
    so each finds the schema either absent or complete. ``what`` names the store in errors."""
    from filelock import FileLock, Timeout

    lock = Path(f"{path}.dpops.lock")
    if not lock.parent.is_dir():
        raise DataError(f"{what}: folder {lock.parent} does not exist; create it or choose another place")
    if Path(path).is_file() and not os.access(lock.parent, os.W_OK):
        # A store that exists where nothing can be written (a read-only mount) can only be read there: no
        # process can create or migrate it through this folder, which is all the lock orders.
        yield
        return
    try:
        with FileLock(str(lock), timeout=LOCK_TIMEOUT):
            yield
    except Timeout:
        raise DataError(
            f"{what}: another process has held {lock} for {LOCK_TIMEOUT:.0f} s while creating the store; "
            "if none is running, delete the lock file"
        ) from None
    except PermissionError as exc:
        raise DataError(f"{what}: cannot lock {lock} ({exc.strerror or exc})") from None
