"""The study every worker of a sweep shares, and the rules they keep through its storage alone.

Opening a storage (an SQLAlchemy URL with Optuna's heartbeat, or a journal file), checked first so that one
that cannot be opened is one line naming ``sweep.storage``; creating or loading the study under a file lock
beside a local file, so that workers starting together make it once; the global budget (the trials that count
against ``n_trials``, over all workers); retries of a killed worker's trial, by Optuna's heartbeat on RDB
storage or by dp_ops's lease on a journal file. A study's format (:data:`dp_ops.formats.FORMATS`) is its
``dpops.format`` user attribute; an older one is brought forward when a worker loads it.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from dp_ops.config import SweepConfig
from dp_ops.errors import ConfigError
from dp_ops.files import file_lock
from dp_ops.formats import FORMAT_TAG, FORMATS, declared, upgrade

OBJECTIVES = {"accuracy": ("final_val_acc",), "pareto": ("final_val_acc", "generated_samples")}
DIRECTIONS: dict[str, Literal["minimize", "maximize"]] = {"final_val_acc": "maximize", "generated_samples": "minimize"}
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
# What to install for a database driver SQLAlchemy cannot import (by its driver name).
DRIVER_PACKAGES = {
    "psycopg": "'dp_ops[postgres]' (psycopg)",
    "psycopg2": "psycopg2-binary, or use postgresql+psycopg:// with pip install 'dp_ops[postgres]'",
    "mysqldb": "mysqlclient, or use mysql+pymysql:// with pip install PyMySQL",
    "pymysql": "PyMySQL",
}
ALLOWED_STORAGE = (
    "sqlite:///<file> (e.g. sqlite:///optuna.db), postgresql+psycopg://user@host:port/db, "
    "mysql+pymysql://user@host/db, or a journal file path (no scheme)"
)


# ---- storage and study ---------------------------------------------------------------------------
def is_rdb(url: str) -> bool:
    """An SQLAlchemy URL (``sqlite:///optuna.db``, ``postgresql+psycopg://…``) rather than a journal file."""
    return "://" in url


@contextmanager
def _experimental() -> Iterator[None]:
    """Optuna marks its heartbeat and retry API experimental and says so on every call: not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def make_storage(url: str, stale_after: float = 300.0) -> optuna.storages.BaseStorage:
    """An SQLAlchemy URL, with Optuna's heartbeat (its unit is whole seconds: ``stale_after`` rounds up, to
    3 at least, and the heartbeat beats ten times in that period), or a journal file path. Checked first
    (:func:`check_storage`)."""
    check_storage(url)
    if is_rdb(url):
        return _rdb_storage(url, max(3, math.ceil(stale_after)))
    from optuna.storages.journal import JournalFileBackend

    try:
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    except OSError as exc:
        raise ConfigError(f"sweep.storage={url!r}: cannot open the journal file ({exc.strerror or exc})") from None


def local_file(url: str) -> Path | None:
    """The file a storage lives in on this machine: a SQLite database or a journal file; None for a server."""
    if not is_rdb(url):
        return Path(url)
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///").split("?", 1)[0])
    return None


def check_storage(url: str) -> None:
    """One line naming ``sweep.storage`` for a storage that cannot be opened, before anything tries: an
    unknown scheme, a database driver that is not installed (and what to install), a folder where a file
    belongs, a file in a folder that does not exist."""
    if is_rdb(url):
        _check_driver(url)
    elif ":" in url:
        raise ConfigError(
            f"sweep.storage={url!r}: neither an SQLAlchemy URL nor a file path; allowed: {ALLOWED_STORAGE}"
        )
    path = local_file(url)
    if path is None:
        return
    what = "database file" if is_rdb(url) else "journal file"
    if not str(path) or path.is_dir():
        raise ConfigError(f"sweep.storage={url!r}: {path} is a folder; give a {what} path there")
    if not path.parent.is_dir():
        raise ConfigError(
            f"sweep.storage={url!r}: folder {path.parent} does not exist; create it (every worker must "
            "name the same file) or choose another path"
        )


def _check_driver(url: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        scheme = url.split("://", 1)[0]
        raise ConfigError(
            f"sweep.storage={url!r}: unknown database scheme {scheme!r}; allowed: {ALLOWED_STORAGE}"
        ) from None
    except sqlalchemy.exc.ArgumentError as exc:
        raise ConfigError(f"sweep.storage={url!r}: not a database URL ({exc}); allowed: {ALLOWED_STORAGE}") from None
    try:
        dialect.import_dbapi()
    except ImportError:
        driver = parsed.get_driver_name()
        install = DRIVER_PACKAGES.get(driver, driver)
        raise ConfigError(
            f"sweep.storage={url!r}: its database driver {driver!r} is not installed; pip install {install}"
        ) from None


def _rdb_storage(url: str, grace: int, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Workers started together on a new database all create Optuna's tables, and on PostgreSQL all but
    one fail (a duplicate table or type): those try again, and find the tables made."""
    attempt = 0
    while True:
        try:
            with _experimental():
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=max(1, grace // 10),
                    grace_period=grace,
                    heartbeat_stale_trial_callback=_retry_callback(),
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            attempt += 1
            if attempt == attempts:
                raise _unopened(url, exc) from None
            time.sleep(0.2 * attempt)
        except Exception as exc:  # no server, no driver, bad credentials: say which storage, in one line
            raise _unopened(url, exc) from None


def _unopened(url: str, exc: Exception) -> ConfigError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ConfigError(f"sweep.storage={url!r}: cannot open it ({type(exc).__name__}: {first})")


def check_separate_stores(storage: str, tracking_uri: str) -> None:
    """Optuna and MLflow both keep Alembic's default version table: one database breaks the other."""
    if is_rdb(storage) and _db_path(storage) == _db_path(tracking_uri):
        raise ConfigError(
            f"sweep.storage={storage!r}: is MLflow's database; give Optuna its own (e.g. sqlite:///optuna.db)"
        )


def _db_path(url: str) -> str:
    """One spelling per database: a SQLite file's resolved path; a server URL without its driver."""
    if url.startswith("sqlite:///"):
        return str(Path(url.removeprefix("sqlite:///")).resolve())
    return re.sub(r"^(\w+)\+\w+://", r"\1://", url)


def open_study(
    sc: SweepConfig,
    name: str,
    strategy: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create the study, or load it if it exists (re-running a sweep continues it). Creating is atomic
    in the storage, so exactly one of several simultaneous workers enqueues a static grid."""
    check_storage(sc.storage)
    path = local_file(sc.storage)
    if path is None:  # a database server: it serialises table creation itself (and _rdb_storage retries)
        return _open_study(sc, name, strategy, sampler, pruner)
    with file_lock(path, f"sweep.storage={sc.storage!r}"):  # workers starting together on a new file
        return _open_study(sc, name, strategy, sampler, pruner)


def _open_study(
    sc: SweepConfig,
    name: str,
    strategy: str,
    sampler: optuna.samplers.BaseSampler | None,
    pruner: optuna.pruners.BasePruner | None,
) -> optuna.Study:
    storage = make_storage(sc.storage, sc.stale_after)
    metrics = objective_names(sc, strategy)
    directions = [DIRECTIONS[m] for m in metrics]
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, directions=directions, sampler=sampler, pruner=pruner
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        _wait_until_ready(study, name)
        where = f"--study-name {name}"
        found = declared("study", study.user_attrs.get(FORMAT_TAG), where)
        _check_compatible(study, sc, name, strategy, directions)
        return upgrade("study", study, found, where, {0: lambda old: _named_metrics(old, metrics)})
    study.set_user_attr(FORMAT_TAG, FORMATS["study"].current)
    study.set_user_attr("dpops.strategy", strategy)
    study.set_user_attr("dpops.objective", list(metrics))
    _name_metrics(study, metrics)
    if strategy == "static":
        study.set_user_attr("dpops.grid", list(sc.static_sizes))
        for n in sc.static_sizes:
            study.enqueue_trial({"dp.initial_size": n})
    study.set_user_attr("dpops.ready", True)  # last: a worker that loads the study waits for it
    return study


def objective_names(sc: SweepConfig, strategy: str) -> tuple[str, ...]:
    """The metrics a trial returns, in order: ``sweep.objective``'s, or validation accuracy alone for the
    static grid."""
    return ("final_val_acc",) if strategy == "static" else OBJECTIVES[sc.objective]


def _name_metrics(study: optuna.Study, metrics: Sequence[str]) -> None:
    """Optuna's metric names, so optuna-dashboard and ``trials_dataframe()`` say ``final_val_acc`` rather
    than "Objective 0". Written only when they differ: every worker of a shared study may call it."""
    if study.metric_names != list(metrics):
        with _experimental():
            study.set_metric_names(list(metrics))


def _named_metrics(study: optuna.Study, metrics: Sequence[str]) -> optuna.Study:
    """Format 0 → 1: a study made before dp_ops 0.6.0 has no metric names; they are written into it, then its
    format (every worker of the study may do both: the same values)."""
    _name_metrics(study, metrics)
    study.set_user_attr(FORMAT_TAG, 1)
    return study


def _wait_until_ready(study: optuna.Study, name: str, timeout: float = 60.0) -> None:
    """Creating a study and describing it (attributes, the enqueued grid) are separate writes: a worker
    that loads a study another worker is still setting up waits, rather than asking for trials early."""
    deadline = time.monotonic() + timeout
    while not study.user_attrs.get("dpops.ready"):
        if time.monotonic() > deadline:
            raise ConfigError(
                f"--study-name {name}: the study was never fully set up (its creator stopped "
                "midway?); delete it or use another name"
            )
        time.sleep(0.2)


def _check_compatible(
    study: optuna.Study, sc: SweepConfig, name: str, strategy: str, directions: Sequence[str]
) -> None:
    have = study.user_attrs.get("dpops.strategy")
    if have != strategy:
        raise ConfigError(
            f"--study-name {name}: the study sweeps strategy {have!r}, not {strategy!r}; use another name"
        )
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(
            f"sweep.objective={sc.objective}: study {name} was created with objective "
            f"{study.user_attrs.get('dpops.objective')}; use another --study-name"
        )
    if strategy == "static" and study.user_attrs.get("dpops.grid") != list(sc.static_sizes):
        raise ConfigError(
            f"sweep.static_sizes={list(sc.static_sizes)}: study {name} holds the grid "
            f"{study.user_attrs.get('dpops.grid')}; use another --study-name"
        )


# ---- budget, retries and the journal lease -------------------------------------------------------
def counted_trials(trials: Sequence[FrozenTrial], before: int | None = None) -> list[FrozenTrial]:
    """Trials that use up budget: finished or running, except given-back and superseded (retried) ones;
    with ``before``, only those numbered lower."""
    retried = {n for t in trials for n in retried_trials(t)}
    return [
        t
        for t in trials
        if t.state in COUNTED
        and not t.user_attrs.get("dpops.over_budget")
        and t.number not in retried
        and (before is None or t.number < before)
    ]


def retried_trials(t: FrozenTrial) -> list[int]:
    """The trials ``t`` retries, oldest first: a killed trial, then its retry if that was killed too, …
    (Optuna's retry history, the same on every storage; empty when ``t`` is no retry)."""
    with _experimental():
        return list(optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t))


def _retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """How a killed trial is retried, on every storage: its parameters and its learning curve so far (the
    retry resumes the same MLflow run)."""
    with _experimental():
        return optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)


def retry(study: optuna.Study, t: FrozenTrial) -> None:
    """Enqueue ``t`` again with its parameters and curve, exactly as Optuna's heartbeat does on RDB storage."""
    _retry_callback()(study, t)


def requeue_stale(study: optuna.Study, stale_after: float) -> list[int]:
    """Journal storage only (RDB storage has Optuna's heartbeat): mark RUNNING trials whose lease is older
    than ``stale_after`` seconds FAIL and :func:`retry` them. Returns the numbers this worker re-queued
    (another worker may have got there first)."""
    requeued = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if time.time() - last_heartbeat(t) < stale_after:
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another worker finished or re-queued it meanwhile
            continue
        retry(study, t)
        requeued.append(t.number)
    return requeued


def last_heartbeat(t: FrozenTrial) -> float:
    """The lease's last beat; a retry carries its predecessor's attributes, so its own start counts too."""
    start = t.datetime_start.timestamp() if t.datetime_start else time.time()
    return max(float(t.user_attrs.get("dpops.heartbeat", start)), start)
