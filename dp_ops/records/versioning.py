"""Data versioning with DVC: each round is one directory output, content-addressed, restorable by md5.

A round is a folder ``<output.shards>/<run id>/round_<k>/`` of immutable part files
(:mod:`dp_ops.engine.shards`). Outside a pipeline the run's folder is versioned with ``dvc add`` (DVC's
Python API, in process) after every round, as ONE directory output: one ``<run id>.dvc`` file per run,
whatever its number of rounds, so ad hoc runs do not flood ``dvc dag`` / ``dvc data status`` (DVC's
state database knows the earlier rounds' md5s: re-adding hashes only the new parts). DVC copies (or, with
``cache.type`` hardlink/reflink, links) each part into the cache once. Each round is still recorded by
its own ``.dir`` digest — ``<md5>.dir`` of that round's parts, computed as DVC computes one, 36
characters, which fits MLflow's dataset digest column. Inside ``dvc repro`` DVC holds the repository lock
and sets ``DVC_STAGE``: the stage's declared outputs do the versioning and we hash the parts ourselves
(one pass each). Either way the round's :class:`RoundVersion` (the digest and every part's md5 and size) goes
to MLflow, and :func:`restore_file` rebuilds any part from the DVC cache (or the default remote) with
nothing but its md5. (A run begun by dp_ops before 0.6.0, with one ``round_<k>.dvc`` per round, is format 0 of
a run, :data:`dp_ops.formats.FORMATS`: it is refused in one line, not continued.)
A resume takes a finished round back only as the store records it (:func:`adopt_round`): every part's
md5 checked (DVC's state database answers for a file unchanged since DVC hashed it, so only changed files
are read), a damaged part restored, its header placing it where the store does, its labels in range.

With a default DVC remote configured, the run's folder is pushed in a background thread while the
round's MLflow run is logged, and joined before the loop checkpoints: a machine that dies loses no
finished round. Before any work, a workspace outside git without ``core.no_scm`` is refused
(:func:`check_scm`) and a remote that is a local folder (or a mount) is probed (:func:`check_remote`);
a push that fails mid-run stops the run at its last completed round (:class:`PushFailed`), resumable.
Every DVC call runs inside :func:`quiet_dvc`: DVC's progress bars, lock and status lines stay off the
terminal (the CLI has its own progress view); its warnings and errors do not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dp_ops.engine.rounds import RoundParts
from dp_ops.engine.shards import Part, read_part, round_dir
from dp_ops.errors import ConfigError, DataError
from dp_ops.files import atomic_path, experiment_copy
from dp_ops.formats import refuse

_PART_NAME = re.compile(r"part_\d{5}\.safetensors")
_MD5 = re.compile(r"[0-9a-f]{32}")
_OBJECT = re.compile(r"[0-9a-f]{32}(\.dir)?")  # a cache object's name: a file's md5, or a listing's


@dataclass(frozen=True)
class PartEntry:
    """One part file of a round as the store records it (DVC's ``.dir`` entry plus size and count)."""

    relpath: str
    md5: str
    size: int
    count: int


@dataclass(frozen=True)
class RoundVersion:
    """A versioned round as its round run records it: where, which bytes, and who versioned them."""

    round: int
    path: Path  # the round's folder, relative to the DVC root when inside it
    md5: str  # DVC's directory digest of the folder: "<md5>.dir"
    versioned_by: str  # "dvc add" | "dvc stage outs" | "none" | "resumed"
    parts: tuple[PartEntry, ...]

    def parts_json(self) -> list[dict[str, Any]]:
        return [vars(p) for p in self.parts]


def parse_parts(listing: list[dict[str, Any]], digest: str | None = None) -> tuple[PartEntry, ...]:
    """A ``parts.json`` listing as entries; with ``digest`` (the store's ``.dir`` md5) it must match, so a
    tampered listing never decides which cache object is read. Relative paths must be plain part names."""
    try:
        parts = tuple(PartEntry(str(e["relpath"]), str(e["md5"]), int(e["size"]), int(e["count"])) for e in listing)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"parts listing {listing!r:.80}: not a list of relpath/md5/size/count entries") from None
    for p in parts:
        if not _PART_NAME.fullmatch(p.relpath) or not _MD5.fullmatch(p.md5):
            raise DataError(f"parts listing: {p.relpath!r} md5 {p.md5!r} is not a part name with an md5")
    if digest is not None and not _OBJECT.fullmatch(digest):
        raise DataError(f"round digest (tag dpops.shard_md5) {digest!r:.80}: not an md5 (32 hex digits, then .dir)")
    if digest is not None and dir_md5([vars(p) for p in parts]) != digest:
        raise DataError(f"parts listing does not match the round's digest {digest} (edited?)")
    return parts


def md5_file(path: str | Path) -> str:
    """The md5 DVC records for a file (DVC 3 hashes the raw bytes)."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_md5(entries: list[dict[str, str]]) -> str:
    """DVC's digest of a directory: the md5 of its sorted ``[{"md5", "relpath"}]`` listing as DVC
    serialises it (``json.dumps(..., sort_keys=True)``), with ``.dir`` appended."""
    listing = sorted(({"md5": e["md5"], "relpath": e["relpath"]} for e in entries), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def dvc_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` (which need not exist yet) that holds ``.dvc/``."""
    for folder in (start.resolve(), *start.resolve().parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def cache_path(root: Path, md5: str, odb: Any = None) -> Path:
    """Where the workspace's DVC cache keeps an object with this md5 (a file's, or ``<md5>.dir`` for a
    listing), as DVC's own object database says (``odb``, else :func:`object_db`): a shared cache
    (``dvc cache dir``) and an experiment's temporary copy, whose cache is the workspace's, are found alike.
    The md5 comes from the store and becomes a path: anything but 32 hex digits (and ``.dir``) is
    refused, so no value can point outside the cache."""
    if not _OBJECT.fullmatch(md5):
        raise DataError(f"md5 {md5!r:.80}: not an md5 (32 hex digits, optionally .dir); refusing it as a cache path")
    return Path((odb or object_db(root)).oid_to_path(md5))


def object_db(root: Path) -> Any:
    """The workspace's local DVC object database (DVC's ``repo.cache.local``: wherever ``cache.dir`` puts it)."""
    with _repo(root) as repo:
        return repo.cache.local


@contextmanager
def _repo(root: Path, *, wait: bool = False) -> Iterator[Any]:
    """DVC's ``Repo`` at ``root``, quiet (:func:`quiet_dvc`); with ``wait``, taking turns on its lock with
    other processes. Any DVC error inside is one :class:`DataError` line naming the workspace."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with quiet_dvc():
        try:
            with Repo(str(root), _wait_for_lock=wait) as repo:
                yield repo
        except DvcException as exc:
            raise DataError(f"DVC in {root}: {dvc_reason(exc)}") from exc


def dvc_reason(exc: BaseException) -> str:
    """A DVC error in one line: its message's first line, and its cause's when DVC wraps one."""
    why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        why += f" ({str(cause).strip().splitlines()[0]})"
    return why[:300]


# `import dvc` gives these loggers handlers (INFO to stdout, WARNING and up to stderr); during our calls
# they pass warnings and errors only.
_DVC_LOGGERS = ("dvc", "dvc_objects", "dvc_data")
# DVC's and dvc_data's tqdm bars (the lock's "Waiting to acquire lock" line among them) are drawn only
# while these loggers' level is ERROR or lower: above it they are off. They log nothing else.
_BAR_LOGGERS = ("dvc.progress", "dvc_data.callbacks")


@dataclass
class _Quiet:
    """What :func:`quiet_dvc` changed, kept until the last of any overlapping calls (the push thread's and
    the loop's) ends."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    depth: int = 0
    levels: dict[str, int] = field(default_factory=dict)
    console_quiet: bool = False


_QUIET = _Quiet()


@contextmanager
def quiet_dvc() -> Iterator[None]:
    """DVC's own output off for the calls inside: its INFO lines, tqdm bars and the rich status spinner of
    ``dvc.ui`` (on DVC's console, not ours). Warnings and errors still reach stderr. Everything changed is
    put back as it was when the last overlapping call ends."""
    from dvc.ui import ui  # (importing DVC sets its loggers up: before their levels are saved)

    with _QUIET.lock:
        if _QUIET.depth == 0:
            _QUIET.levels = {name: logging.getLogger(name).level for name in (*_DVC_LOGGERS, *_BAR_LOGGERS)}
            for name in _DVC_LOGGERS:
                logger = logging.getLogger(name)
                logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
            for name in _BAR_LOGGERS:
                logging.getLogger(name).setLevel(logging.CRITICAL)
            _QUIET.console_quiet, ui.error_console.quiet = ui.error_console.quiet, True
        _QUIET.depth += 1
    try:
        yield
    finally:
        with _QUIET.lock:
            _QUIET.depth -= 1
            if _QUIET.depth == 0:
                for name, level in _QUIET.levels.items():
                    logging.getLogger(name).setLevel(level)
                ui.error_console.quiet = _QUIET.console_quiet


class DvcVersioner:
    """Versions a run's folder after each of its rounds and says what each round added (a
    :class:`RoundVersion`), so that the round's MLflow run can link exactly those bytes."""

    def __init__(self, data_dir: str | Path) -> None:
        """``data_dir``: the run's folder of round folders (one in the format of dp_ops before 0.6.0 refused)."""
        self.data_dir = Path(data_dir)
        if any(self.data_dir.glob("round_*.dvc")):  # (DVC refuses a run-wide output over the rounds' own)
            refuse("run", 0, str(self.data_dir), "one round_<k>.dvc per round, as dp_ops before 0.6.0 versioned runs")
        self.root = dvc_root(self.data_dir)
        self.in_stage = bool(os.environ.get("DVC_STAGE"))
        self._push: threading.Thread | None = None
        self._push_error: BaseException | None = None

    @property
    def mode(self) -> str:
        """How rounds are versioned here: ``dvc add``, ``dvc stage outs`` or ``none`` (no DVC workspace)."""
        if self.root is None:
            return "none"
        return "dvc stage outs" if self.in_stage else "dvc add"

    def round_path(self, round_index: int) -> Path:
        return round_dir(self.data_dir, round_index)

    def info(self, round_index: int, folder: Path, entries: list[dict[str, Any]], versioned_by: str) -> RoundVersion:
        """The facts about a round folder (made relative to the DVC root when inside it)."""
        rel = folder.resolve().relative_to(self.root) if self.root is not None else folder
        return RoundVersion(round_index, rel, dir_md5(entries), versioned_by, parse_parts(entries))

    @property
    def dvc_file(self) -> Path:
        """The run's one ``.dvc`` file, beside its folder."""
        return self.data_dir.with_name(self.data_dir.name + ".dvc")

    def version(self, round_index: int, parts: RoundParts) -> RoundVersion:
        """Version the run's folder with this round's; with a default remote, start pushing it (see
        :meth:`wait_pushed`)."""
        md5s: dict[str, str] = {}
        if self.mode == "dvc add" and self.root is not None:
            md5s = _dvc_add(self.root, self.data_dir)  # DVC's own hash pass: not hashed twice
        entries = []
        for p in parts.parts:  # (the part's folder resolved, not the part: cache.type=symlink links it to the cache)
            where = (p.path.parent.resolve() / p.path.name).relative_to(self.data_dir.resolve()).as_posix()
            md5 = md5s.get(where) or md5_file(p.path)
            entries.append({"relpath": p.path.name, "md5": md5, "size": p.nbytes, "count": p.count})
        version = self.info(round_index, parts.folder, entries, self.mode)
        if self.mode == "dvc add" and self.root is not None and _dvc_core(self.root).get("remote"):
            self._start_push(self.data_dir)
        return version

    def commit_hint(self) -> str | None:
        """The one line that says what to commit to keep this run's data (its ``.dvc`` file, which keeps
        ``dvc gc`` from deleting the data); None inside ``dvc repro`` (the stage's outs are in
        ``dvc.lock``), without DVC, or before anything was versioned."""
        if self.mode != "dvc add" or self.root is None or not self.dvc_file.is_file():
            return None
        dvc_file = shlex.quote(os.path.relpath(self.dvc_file))  # (a command to paste: spaces, quotes, unicode)
        if _dvc_core(self.root).get("no_scm"):
            return f"to keep this run's data: keep {dvc_file} (dvc gc deletes cached data no .dvc file names)"
        ignore = shlex.quote(os.path.relpath(self.dvc_file.with_name(".gitignore")))
        return f"to keep this run's data: git add {dvc_file} {ignore} && git commit"

    def push_hint(self) -> str | None:
        """The one line that says what to push so that a clone's ``dvc pull`` finds this run's data (see
        :func:`push_hint`); None when every round was pushed already (``dvc add`` with a default remote) or
        without DVC."""
        if self.root is None:
            return None
        if self.in_stage:
            return push_hint(self.root)
        if not self.dvc_file.is_file() or _dvc_core(self.root).get("remote"):
            return None
        return push_hint(self.root, self.dvc_file)

    def _start_push(self, folder: Path) -> None:
        self.wait_pushed()

        def push() -> None:
            try:
                _dvc_push(self.root, folder)  # type: ignore[arg-type]
            except BaseException as exc:
                self._push_error = exc

        self._push = threading.Thread(target=push, name="dvc-push", daemon=True)
        self._push.start()

    def wait_pushed(self) -> None:
        """Join the round pushed last; a failed push raises :class:`PushFailed` here (before the round is
        checkpointed, so a resume generates it again)."""
        if self._push is not None:
            self._push.join()
            self._push = None
        if self._push_error is not None:
            exc, self._push_error = self._push_error, None
            cause = exc.__cause__ if isinstance(exc, DataError) and exc.__cause__ else exc  # (DVC's own reason)
            why = f"{cause.strerror or cause}" if isinstance(cause, OSError) else f"{cause}"
            raise PushFailed(f"dvc push of the last round to the default DVC remote failed ({why})") from exc


def check_kept_by_stage(shards: str | Path) -> None:
    """Before any work, inside a DVC experiment's temporary copy (``dvc exp run --queue`` / ``--temp``, see
    :func:`~dp_ops.files.experiment_copy`): the rounds are kept only if ``output.shards`` lies within an out
    of the stage DVC runs, which DVC collects into the experiment before it deletes the copy. One line if
    not. (In the workspace itself a stage's undeclared folder stays on disk: nothing is lost.)"""
    where = experiment_copy()
    if where is None:
        return
    stage = os.environ["DVC_STAGE"]
    folder = Path(shards).resolve()
    with _repo(where[0]) as repo:
        outs = [Path(out.fs_path).resolve() for s in repo.index.stages if s.addressing == stage for out in s.outs]
    if not any(out == folder or out in folder.parents for out in outs):
        raise ConfigError(
            f"output.shards={str(shards)!r}: not among the outs of DVC stage {stage!r}, and this experiment runs "
            "in a temporary copy that DVC deletes when it ends (dvc exp run --queue / --temp): its rounds would "
            "be lost; declare the folder in the stage's outs in dvc.yaml"
        )


ADD_REMOTE = "dvc remote add -d <name> <url>"


def push_hint(root: Path | None, target: Path | None = None) -> str | None:
    """What to push so that a colleague's clone can ``dvc pull`` what was just made: ``target`` (a ``.dvc``
    file, pushed at once when there is a default remote, see :meth:`DvcVersioner.version`), or inside a
    ``dvc repro`` / ``dvc exp run`` stage (whose outs reach the cache only when the stage ends, too late to
    push them from here) what follows that command: ``dvc push``, or in an experiment's temporary copy
    ``dvc exp push``. Says to add a default remote first when there is none. None outside a DVC workspace,
    and without ``target`` outside a stage (nothing was versioned)."""
    if root is None or (target is None and not os.environ.get("DVC_STAGE")):
        return None
    first = "" if _dvc_core(root).get("remote") else f"{ADD_REMOTE}, then "
    if target is not None:
        push = f"dvc push {shlex.quote(os.path.relpath(target))}"
        return f"to share this run's data: {first}{push} (a clone's dvc pull needs it)"
    exp = os.environ.get("DVC_EXP_NAME")
    after = f"dvc exp push <git remote> {shlex.quote(exp)}" if exp and experiment_copy() else "dvc push"
    return f"to share this stage's outputs: {first}{after} once DVC has finished (a clone's dvc pull needs them)"


class PushFailed(DataError):
    """A round's push to the default DVC remote failed mid-run (a full or read-only remote, a network):
    the run stops at its last completed round, resumable."""


def check_scm(root: Path | None) -> None:
    """Before any work: ``dvc add`` writes a ``.dvc`` file for git, so a DVC workspace outside any git
    repository fails every round's versioning unless its DVC config says ``core.no_scm`` (as ``dvc init
    --no-scm`` writes). One line if it is neither."""
    if root is None or _dvc_core(root).get("no_scm"):
        return
    from dvc.scm import SCM, SCMError

    try:
        SCM(str(root))
    except SCMError:
        raise DataError(
            f"DVC workspace {root}: not inside a git repository and its DVC config does not set core.no_scm, so "
            "no round could be versioned; run git init there, or dvc config core.no_scm true"
        ) from None


PROBE_BYTES = 1 << 20  # what a remote's probe writes: a full remote refuses it (an empty file fits anywhere)


def check_remote(root: Path | None) -> None:
    """Before any work: the workspace's default DVC remote, if there is one and it is a local folder (or a
    mount), can take a push: a probe file of :data:`PROBE_BYTES` is written there and deleted. Other kinds
    of remote (s3, ssh, http, ...) are not probed: they need credentials and a network round trip, and a
    failed push there stops the run at its last completed round, resumable. One line if it cannot."""
    if root is None or not _dvc_core(root).get("remote"):
        return
    from dvc.exceptions import DvcException

    with _repo(root) as repo:
        try:
            remote = repo.cloud.get_remote()
        except DvcException as exc:  # (e.g. core.remote names a remote the config does not define)
            raise DataError(f"{root / '.dvc' / 'config'}: the default DVC remote: {exc}") from None
        if remote.fs.protocol != "local":
            return
        folder = Path(remote.path)
    why = _probe(folder)
    if why is not None:
        raise DataError(
            f"DVC remote {remote.name!r} ({folder}): cannot be written ({why}); every round is pushed there: "
            "free space or make it writable, or unset it (dvc remote default --unset)"
        )


def _probe(folder: Path) -> str | None:
    """Why :data:`PROBE_BYTES` cannot be written (and deleted) in ``folder`` or its nearest existing
    ancestor (DVC creates a missing remote folder), or None."""
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    probe = base / f".dpops-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        f = probe.open("xb")
    except OSError as exc:  # (a read-only filesystem refuses even the name)
        return f"{exc.strerror or exc}"
    try:
        with f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return f"{exc.strerror or exc}"
    finally:
        probe.unlink()
    return None


def _dvc_add(root: Path, folder: Path) -> dict[str, str]:
    """``dvc add`` a folder; returns each file's md5 (by path below it) from the ``.dir`` listing DVC wrote."""
    # Concurrent sweep workers in one workspace take turns on DVC's repository lock instead of failing.
    with _repo(root, wait=True) as repo:
        repo.scm_context.quiet = True  # library code prints nothing (DVC would print a `git add` hint)
        (stage,) = repo.add([str(folder.resolve())])
        listing = json.loads(cache_path(root, stage.outs[0].hash_info.value, repo.cache.local).read_text())
    return {e["relpath"]: e["md5"] for e in listing}


def _dvc_core(root: Path) -> dict[str, Any]:
    """The ``core`` section of the workspace's DVC config (``remote``: the default remote; ``no_scm``)."""
    from dvc.config import Config as DvcConfig
    from dvc.exceptions import DvcException

    try:
        return dict(DvcConfig(dvc_dir=str(root / ".dvc")).get("core", {}))
    except DvcException as exc:  # (a config file DVC cannot parse)
        raise DataError(f"DVC in {root}: {dvc_reason(exc)}") from exc


def _dvc_push(root: Path, folder: Path) -> None:
    with _repo(root, wait=True) as repo:
        repo.push(targets=[str(folder.resolve())])


def restore_file(root: Path, md5: str, dest: Path, odb: Any = None) -> Path:
    """Copy the cached object with ``md5`` to ``dest``; pull it from the DVC remote if the cache lacks it.
    ``odb``: the workspace's object database, when the caller has it (:func:`object_db`).

    Verifies the md5 of what was written and fails loudly on a mismatch.
    """
    src = cache_path(root, md5, odb)
    if not src.is_file():
        _fetch_object(root, md5)
    if not src.is_file():
        raise DataError(f"md5 {md5}: not in the DVC cache at {src.parent.parent} and no remote has it")
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        got = md5_file(tmp)
        if got != md5:
            raise DataError(f"{dest}: restored bytes have md5 {got}, the store says {md5} (corrupt cache?)")
    return dest


def restore_round(root: Path, parts: Sequence[PartEntry], folder: Path) -> list[Path]:
    """Rebuild a round folder's parts byte for byte from the DVC cache (or remote); returns the paths
    restored. (A resume restores only the damaged ones: :func:`adopt_round`.)"""
    odb = object_db(root)
    return [restore_file(root, part.md5, folder / part.relpath, odb) for part in parts]


def damaged_parts(root: Path | None, parts: Sequence[PartEntry], folder: Path) -> list[PartEntry]:
    """The parts of a round folder whose bytes are not the ones the store records: missing, another size,
    or another md5. DVC's state database answers for a file DVC hashed and nobody changed since (same
    inode, size and mtime); only the others are read and hashed."""
    present, base = {}, folder.resolve()  # (DVC's state keys files by the resolved path `dvc add` was given)
    for part in parts:
        path = base / part.relpath
        if path.is_file() and path.stat().st_size == part.size:
            present[part.relpath] = path
    known = known_md5s(root, list(present.values()))
    return [
        part
        for part in parts
        if part.relpath not in present
        or (known.get(present[part.relpath]) or md5_file(present[part.relpath])) != part.md5
    ]


def known_md5s(root: Path | None, paths: Sequence[Path]) -> dict[Path, str]:
    """The md5 DVC's state database holds for each of these (absolute) files that is unchanged since DVC
    hashed it; a file it does not know, or knows with other inode, size or mtime, is left out."""
    if root is None or not paths:
        return {}
    with _repo(root) as repo:
        infos = {str(p): repo.fs.info(str(p)) for p in paths}
        found = repo.state.get_many(list(infos), repo.fs, infos)
        return {Path(p): h.value for p, _, h in found if h is not None and h.name == "md5" and h.value}


def adopt_round(
    root: Path | None, parts: Sequence[PartEntry], folder: Path, round_index: int, classes: int
) -> list[Part]:
    """A finished round's parts as a resume puts them back in the pool: exactly the bytes the store
    records (a damaged part restored from the DVC cache or remote, md5-checked), each header agreeing with
    where it is used (round, part, first sample, count) and every label in ``[0, classes)``. Returns the
    parts in order; anything that cannot be made so is one :class:`DataError` line."""
    damaged = damaged_parts(root, parts, folder)
    if damaged and root is None:
        names = ", ".join(p.relpath for p in damaged)
        raise DataError(f"{folder}: {names} missing or not the store's bytes, and no DVC workspace to restore from")
    if root is not None and damaged:
        odb = object_db(root)
        for entry in damaged:
            restore_file(root, entry.md5, folder / entry.relpath, odb)
    adopted: list[Part] = []
    start = 0
    for entry in sorted(parts, key=lambda p: p.relpath):
        part, labels = read_part(folder / entry.relpath)
        where = (round_index, int(Path(entry.relpath).stem.removeprefix("part_")), start, entry.count)
        if (part.round, part.index, part.start, part.count) != where:
            raise DataError(
                f"{part.path}: its header says round {part.round} part {part.index} (samples {part.start}.."
                f"+{part.count}), the store places it as round {where[0]} part {where[1]} (samples "
                f"{where[2]}..+{where[3]}); the store's listing was edited"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            bad = labels[(labels < 0) | (labels >= classes)][0]
            raise DataError(f"{part.path}: label {bad} outside [0, {classes}); not a part of this run's classes")
        adopted.append(part)
        start += part.count
    return adopted


def _fetch_object(root: Path, md5: str) -> None:
    """Pull one object by hash from the default DVC remote into the local cache, if a remote is set."""
    from dvc.config import NoRemoteError
    from dvc_data.hashfile.hash_info import HashInfo

    with _repo(root) as repo:
        try:
            repo.cloud.pull([HashInfo("md5", md5)])
        except NoRemoteError:
            return
