"""The tracking store: where it is (the URI rules), how it is opened, and what dp_ops asks of it.

:class:`TrackingStore` is the tracking store, built once from a URI (or a config): it owns the client, the
URI resolution (``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``) and the
artifact root. Everything else asks it, and gets facts back (:class:`RunFacts`, ids, plain dicts), never
MLflow entities: experiment get-or-create, run lookup and search, round runs and their shard md5s,
metric histories, report runs, the outer run a new run nests under (``MLFLOW_RUN_ID``).

Opening a store is made safe and quick to fail. A new SQLite store is created and migrated under a file
lock beside it (``mlflow.db.dpops.lock``, :func:`~dp_ops.files.file_lock`), so any number of processes may
start on a fresh workspace at once (MLflow's migrations are not safe to run twice concurrently: they leave
the database half-migrated). A tracking server is asked once, with a short timeout and no retries, before
any work (:meth:`TrackingStore.check`); MLflow's HTTP retries are bounded (:data:`HTTP_DEFAULTS`, unless the
environment sets them) so that a server that dies mid-run costs seconds, not minutes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.exceptions import MlflowException

from dp_ops.config import Config
from dp_ops.errors import ConfigError, DataError, DpOpsError
from dp_ops.files import file_lock, workspace_uri
from dp_ops.records.tracking.names import (
    EXPERIMENT_KIND,
    EXPERIMENT_NOTE,
    KIND_TAG,
    NOTE_TAG,
    PARENT_ID_TAG,
    REPORT_KEY_TAG,
    RUN_NAME_TAG,
    names_experiment,
    run_tags,
)

DEFAULT_URI = "sqlite:///mlflow.db"
OUTER_RUN_VAR = "MLFLOW_RUN_ID"  # a run to nest under (MLflow's fluent start_run resumes it; dp_ops makes a child)
PARTS_FILE = "parts.json"  # a round run's artifact: its parts with md5, size and count
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


def cause_of(exc: BaseException) -> str:
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


class TrackingStore:
    """One tracking store: ``TrackingStore(uri)`` or :meth:`from_config`. Thread it through rather than
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
                with file_lock(db, f"{self.source}={self.uri!r}"):
                    self.client = MlflowClient(tracking_uri=self.uri)
        except MlflowException as exc:
            raise DataError(f"{self.source}={self.uri!r}: cannot open the tracking store ({cause_of(exc)})") from None
        except Exception as exc:  # e.g. SQLAlchemy's OperationalError for an unreadable or broken database
            if isinstance(exc, DpOpsError):
                raise
            raise DataError(
                f"{self.source}={self.uri!r}: cannot open the tracking store ({type(exc).__name__}: {cause_of(exc)})"
            ) from None
        if is_server(self.uri):
            self.check()

    @classmethod
    def from_config(cls, cfg: Config) -> TrackingStore:
        return cls(tracking_uri(cfg))

    def __repr__(self) -> str:
        return f"TrackingStore({self.uri!r})"

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
            return cause_of(exc)
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
            metrics=[Metric(k, v, now_ms(), 0) for k, v in finite.items()],
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


def round_runs(client: MlflowClient, run_id: str) -> list[Run]:
    """The child (round) runs of an experiment run as MLflow entities, ordered by round (for inspection
    and tests; library code asks :meth:`TrackingStore.round_runs` for facts)."""
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


def now_ms() -> int:
    return int(time.time() * 1000)
