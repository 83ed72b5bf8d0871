"""Optuna sweeps: each trial is one tracked DP experiment; any number of workers share one study.

The space comes from the ``sweep:`` section of params.yaml (:class:`dp_ops.config.SweepConfig`,
overridable with ``-S sweep.omega.high=0.3``) and trial parameters are named exactly like params.yaml keys
(``dp.omega``), so a trial replays with
``dpops run -S dp.omega=…`` or ``dvc exp run -S dp.omega=…``. ``strategy="static"`` is a grid over
``dp.initial_size`` instead (the baseline for scaling laws), enqueued once when the study is created.

Workers cooperate through the storage only: an SQLAlchemy URL (PostgreSQL for many workers or machines)
or an Optuna journal file (many workers on one file system). Three rules make that safe:

* **Global budget.** ``n_trials`` counts the study's trials, not this worker's. Trial numbers are
  handed out by the storage in order, so a worker that asked for a trial beyond the budget (another
  worker took the last slot meanwhile) sees it and gives it back as FAIL marked ``dpops.over_budget``.
  A retried trial takes the place of the one it retries (Optuna's retry history), never a second slot.
* **A killed worker's trial is retried.** Every trial runs through ``study.optimize``, so on RDB storage
  Optuna's own heartbeat does the job: a thread refreshes the trial's heartbeat every
  ``stale_after / 10`` seconds, the next worker fails a RUNNING trial silent for ``stale_after``
  seconds and :class:`optuna.storages.RetryHeartbeatStaleTrialCallback` enqueues its parameters again.
  Optuna has no heartbeat for the journal file, so there dp_ops keeps a lease: the loop's callbacks
  refresh the trial's ``dpops.heartbeat`` attribute, and the next worker fails a stale trial and
  enqueues it with the same callback (:func:`requeue_stale`). Either way the retry resumes the killed
  MLflow run (found by the retried trial's number) from its last completed round when it has a checkpoint.
* **Failures are data.** A trial that raises is FAIL with its one-line error in ``dpops.error`` and
  the sweep goes on; Ctrl-C marks the running trial FAIL, enqueues its retry and stops, and so does a
  tracking server that stops answering (no later trial could be tracked either).

What Optuna's own views (optuna-dashboard, ``study.trials_dataframe()``) show: the metrics by name
(:func:`objective_names`), each trial's validation accuracy at every evaluation as its intermediate values
(step = iteration, pruning or not; a multi-objective trial keeps none, by Optuna's rule), the trial's MLflow
run id and page (:func:`~dp_ops.records.tracking.run_url`), and a note holding a link to that page that
optuna-dashboard shows (:func:`run_note`); :func:`dashboard_command` is the command that opens the storage.

Workers may start together on a new storage: a SQLite database or journal file is opened and the study
created under a file lock beside it (:func:`dp_ops.records.tracking.store_lock`), so exactly one creates
the tables and the others find them; a storage that cannot be opened (unknown scheme, driver not
installed, a folder, a missing folder) is one line naming ``sweep.storage`` before any work.
"""

from __future__ import annotations

import math
import re
import shlex
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, Trial, TrialState

from dp_ops.config import Config, SweepConfig, apply_overrides, build_config, run_files, to_tree
from dp_ops.engine.dist import SINGLE, World, threads_tag
from dp_ops.engine.loop import Observer, RunResult
from dp_ops.errors import ConfigError
from dp_ops.records.checkpoint import checkpoint_path
from dp_ops.records.tracking import (
    Registry,
    StoreUnavailable,
    browse_hint,
    filter_equals,
    is_server,
    run_url,
    store_lock,
)
from dp_ops.runner import lead_run

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


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    params: dict[str, Any]
    values: tuple[float, ...] | None
    mlflow_run_id: str | None
    error: str | None = None


@dataclass(frozen=True)
class SweepOutcome:
    study: str
    storage: str
    budget: int
    ran: tuple[TrialOutcome, ...]  # trials this worker ran
    counted: int  # trials of the study that count against the budget, all workers
    best: tuple[FrozenTrial, ...] = field(default=())  # best trial, or the Pareto front


RunTrial = Callable[[Config, dict[str, str], Sequence[Observer], str | None], tuple[RunResult, str]]
"""(config, MLflow tags, extra observers, MLflow run id to resume or None) -> (result, MLflow run id)."""


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
    with store_lock(path, f"sweep.storage={sc.storage!r}"):  # workers starting together on a new file
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
        _check_compatible(study, sc, name, strategy, directions)
        _name_metrics(study, metrics)  # (a study made before dp_ops named them)
        return study
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


class TrialObserver(Observer):
    """Reports every evaluation's validation accuracy as the trial's intermediate value at its iteration
    (the learning curves of optuna-dashboard), asks the pruner after each when ``prune``, and keeps the
    trial's journal lease alive from the loop's callbacks every ``beat_every`` seconds (None: Optuna's
    heartbeat thread does that, on RDB storage).

    ``reported``: the steps the trial already holds. A retry inherits its killed predecessor's curve and
    resumes the run from its last checkpoint, so the loop evaluates those iterations again (with the same
    values: training is keyed by iteration); they are not reported twice. Optuna keeps no intermediate
    values for a multi-objective trial (``report=False``: the Pareto objective)."""

    def __init__(
        self,
        trial: Trial,
        beat_every: float | None,
        *,
        prune: bool,
        report: bool = True,
        reported: Collection[int] = (),
    ) -> None:
        self.trial, self.beat_every, self.prune, self.report = trial, beat_every, prune, report
        self._reported = set(reported)
        self._last = 0.0
        self.beat()

    def beat(self) -> None:
        now = time.time()
        if self.beat_every is not None and now - self._last >= self.beat_every:
            self.trial.set_user_attr("dpops.heartbeat", now)
            self._last = now

    def on_progress(self, task: str, completed: int, total: int) -> None:
        self.beat()

    def on_eval(self, iteration: int, val_acc: float) -> None:
        self.beat()
        if not self.report:
            return
        if iteration not in self._reported:
            self.trial.report(val_acc, step=iteration)
            self._reported.add(iteration)
        if self.prune and self.trial.should_prune():
            raise optuna.TrialPruned(f"val_acc {val_acc:.4f} at iteration {iteration}")


class _Fail(Exception):
    """Raised out of the objective so that ``study.optimize`` records FAIL (the reason is already in the
    trial's attributes, or it was given back over budget)."""


# ---- the worker ----------------------------------------------------------------------------------
class Sweep:
    """One worker of a study. ``run()`` asks trials until the study's budget or ``timeout`` is reached."""

    def __init__(
        self,
        cfg: Config,
        sc: SweepConfig,
        *,
        strategy: str,
        study_name: str,
        base_overrides: Sequence[str] = (),
        registry: Registry | None = None,
    ) -> None:
        """Validates the strategy, opens (or creates) the study and creates the trials' MLflow experiment
        (both stores exist before any trial, or another worker, writes): run it before any expensive work.
        ``registry``: the MLflow store (default: the config's)."""
        if strategy not in ("dp", "static"):
            raise ConfigError(f"--strategy {strategy}: allowed dp (TPE over ω, patience, round size) or static (grid)")
        try:
            filter_equals("tags.`dpops.study`", study_name)  # (its runs are found by this tag)
        except ConfigError:
            raise ConfigError(f"--study-name {study_name!r}: may hold ' or \" but not both") from None
        self.cfg, self.sc, self.strategy, self.name = cfg, sc, strategy, study_name
        self.registry = registry or Registry.from_config(cfg)
        self.base_overrides = [*base_overrides, f"dp.strategy={strategy}", f"tracking.experiment={self.experiment}"]
        sampler = optuna.samplers.TPESampler(seed=sc.sampler_seed, multivariate=True)
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=cfg.train.iterations // 4)
            if sc.prune
            else optuna.pruners.NopPruner()
        )
        self.study = open_study(sc, study_name, strategy, sampler, pruner)
        self.experiment_id = self.registry.experiment_id(self.experiment)  # (every trial's runs go there)
        self.budget = len(sc.static_sizes) if strategy == "static" else sc.n_trials

    @property
    def experiment(self) -> str:
        return self.sc.experiment or self.name

    def run(
        self,
        run_trial: RunTrial,
        *,
        timeout: float | None = None,
        observers: Callable[[int], Sequence[Observer]] = lambda n: (),
        on_trial: Callable[[TrialOutcome], None] = lambda o: None,
    ) -> SweepOutcome:
        """``observers(n)``: extra loop observers for trial ``n``; ``on_trial`` after each trial this worker ran."""
        start, ran = time.monotonic(), []
        while timeout is None or time.monotonic() - start < timeout:
            self._retry_stale()
            if len(counted_trials(self.study.get_trials(deepcopy=False))) >= self.budget:
                break
            outcome = self._next_trial(run_trial, observers)
            if outcome is None:  # another worker took the last slot
                break
            ran.append(outcome)
            on_trial(outcome)
        trials = self.study.get_trials(deepcopy=False)
        return SweepOutcome(
            self.name,
            self.sc.storage,
            self.budget,
            tuple(ran),
            len(counted_trials(trials)),
            tuple(best_trials(self.study)),
        )

    def _retry_stale(self) -> None:
        """Fail and retry the trials of killed workers before counting the budget (one mechanism per storage)."""
        if is_rdb(self.sc.storage):
            with _experimental():
                optuna.storages.fail_stale_trials(self.study)
        else:
            requeue_stale(self.study, self.sc.stale_after)

    def _next_trial(self, run_trial: RunTrial, observers: Callable[[int], Sequence[Observer]]) -> TrialOutcome | None:
        """One trial through ``study.optimize``: it asks, keeps Optuna's heartbeat thread running on RDB
        storage while the trial runs, and tells. None: the trial was over budget and given back."""
        asked: list[int] = []
        done: list[TrialOutcome] = []

        def objective(trial: Trial) -> list[float]:
            asked.append(trial.number)
            if self._over_budget(trial):
                trial.set_user_attr("dpops.over_budget", True)
                raise _Fail("over budget")
            done.append(self._run_one(trial, run_trial, observers(trial.number)))
            if done[0].state == "PRUNED":
                raise optuna.TrialPruned()
            if done[0].values is None:
                raise _Fail(done[0].error)
            return list(done[0].values)

        try:
            self.study.optimize(objective, n_trials=1, catch=(_Fail,))
        except KeyboardInterrupt:  # optimize marked it FAIL; its run ended KILLED with a checkpoint: retry it
            if asked:
                retry(self.study, self.study.get_trials(deepcopy=False)[asked[0]])
            raise
        except StoreUnavailable as exc:  # no later trial could be tracked either: stop, the trial retried later
            if not asked:
                raise
            retry(self.study, self.study.get_trials(deepcopy=False)[asked[0]])
            raise StoreUnavailable(
                f"the tracking server {self.registry.uri} stopped answering ({exc.why}) during trial {asked[0]}"
                f"{f' (run {exc.run_id})' if exc.run_id else ''}; the trial was re-queued: once the server is "
                "back, run the same dpops sweep command to continue the study",
                why=exc.why,
                run_id=exc.run_id,
            ) from None
        return done[0] if done else None

    def _over_budget(self, trial: Trial) -> bool:
        return len(counted_trials(self.study.get_trials(deepcopy=False), before=trial.number)) >= self.budget

    def _run_one(self, trial: Trial, run_trial: RunTrial, observers: Sequence[Observer]) -> TrialOutcome:
        """Run the trial and record it in its attributes; ``study.optimize`` sets its state."""
        params = self._suggest(trial)
        overrides = [*self.base_overrides, *(f"{k}={v}" for k, v in params.items())]
        trial.set_user_attr("dpops.overrides", overrides)
        cfg = trial_config(self.cfg, overrides, trial.number, self.name)
        tags = {"dpops.study": self.name, "dpops.trial": str(trial.number)}
        lease = None if is_rdb(self.sc.storage) else self.sc.stale_after / 10
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        watch = TrialObserver(
            trial,
            lease,
            prune=self.sc.prune,
            report=len(self.study.directions) == 1,
            reported=frozen.intermediate_values,
        )
        resume = self._run_to_resume(trial.number)
        if resume and not checkpoint_path(cfg.output.checkpoints, resume).is_file():
            resume = None  # killed before its first round completed (or on another machine): start afresh
        try:
            result, run_id = run_trial(cfg, tags, [watch, *observers], resume)
        except optuna.TrialPruned:
            return self._finish(trial, params, TrialState.PRUNED)
        except StoreUnavailable:
            raise  # (not the trial's fault: _next_trial stops the worker)
        except Exception as exc:  # a failed trial is a result; the sweep goes on
            trial.set_user_attr("dpops.error", f"{type(exc).__name__}: {exc}"[:500])
            return self._finish(trial, params, TrialState.FAIL, error=f"{type(exc).__name__}: {exc}")
        self._link_run(trial, run_id)
        s = result.summary
        for key in ("pool_size", "generated_samples", "iterations", "rounds"):
            trial.set_user_attr(f"dpops.{key}", getattr(s, key))
        values = tuple(float(getattr(s, m)) for m in objective_names(self.sc, self.strategy))
        return TrialOutcome(trial.number, "COMPLETE", params, values, run_id)

    def _link_run(self, trial: Trial, run_id: str) -> None:
        """The trial's MLflow run: its id, its page (:func:`~dp_ops.records.tracking.run_url`), and the
        trial's note with a link to it (:func:`run_note`)."""
        trial.set_user_attr("dpops.mlflow_run_id", run_id)
        url = run_url(self.registry.uri, self.experiment_id, run_id)
        if url is not None:
            trial.set_user_attr("dpops.mlflow_run_url", url)
        save_note(trial, run_note(self.registry.uri, self.experiment_id, run_id))

    def _run_to_resume(self, number: int) -> str | None:
        """A retry resumes the MLflow run of the trial it retries: the latest of the retry history that has
        one (a retry that resumed a run re-tags it with its own number)."""
        history = retried_trials(self.study.get_trials(deepcopy=False)[number])
        return next((run for n in reversed(history) if (run := self._run_of(n))), None)

    def _run_of(self, number: int) -> str | None:
        """The MLflow run of a trial that returned none (raised, pruned, killed), found by its tags."""
        return self.registry.find_run(self.experiment, {"dpops.study": self.name, "dpops.trial": str(number)})

    def _suggest(self, trial: Trial) -> dict[str, Any]:
        sc = self.sc
        if self.strategy == "static":
            return {"dp.initial_size": trial.suggest_categorical("dp.initial_size", list(sc.static_sizes))}
        return {
            "dp.omega": trial.suggest_float("dp.omega", sc.omega.low, sc.omega.high, log=sc.omega.log),
            "dp.patience": trial.suggest_int("dp.patience", sc.patience.low, sc.patience.high, step=sc.patience.step),
            "dp.round_size": trial.suggest_int(
                "dp.round_size", sc.round_size.low, sc.round_size.high, step=sc.round_size.step
            ),
        }

    def _finish(
        self, trial: Trial, params: dict[str, Any], state: TrialState, error: str | None = None
    ) -> TrialOutcome:
        run_id = self._run_of(trial.number)
        if run_id:
            self._link_run(trial, run_id)
            if state == TrialState.PRUNED:  # the run ended FAILED when the loop raised TrialPruned
                self.registry.end_run(run_id, "KILLED", tags={"dpops.pruned": "true"})
        return TrialOutcome(trial.number, state.name, params, None, run_id, error)


def run_note(uri: str, experiment_id: str, run_id: str) -> str:
    """A trial's note (Markdown, which optuna-dashboard renders): its MLflow run as a link to the run's page
    under the store's own URL on a tracking server; for a database, where ``mlflow ui`` serves it by default,
    with the command that serves it and that address named as the assumption it is."""
    url = run_url(uri, experiment_id, run_id)
    if url is None:  # (Databricks: its workspace URL is not in the tracking URI)
        return f"MLflow run `{run_id}` in experiment {experiment_id} at `{uri}`"
    link = f"MLflow run [{run_id}]({url})"
    if is_server(uri):
        return f"{link} on the tracking server {uri}"
    return (
        f"{link}, once the store is served: `{browse_hint(uri)}` (the link assumes its default address, "
        "http://127.0.0.1:5000; with --host or --port, the page is there instead)"
    )


NOTE_CHUNK = 2045  # (optuna-dashboard's longest note attribute, SYSTEM_ATTR_MAX_LENGTH)


def save_note(trial: Trial, body: str) -> None:
    """Make ``body`` (Markdown) the trial's note, where optuna-dashboard reads, shows and edits notes: the
    study's system attributes ``dashboard:<trial id>:note_ver`` (one more than the last version) and
    ``dashboard:<trial id>:note_str:<i>`` (the text in chunks; a longer earlier note's extra chunks
    emptied), the layout of ``optuna_dashboard.save_note``, written here so that a sweep runs without the
    dashboard installed (tests read it back with the dashboard)."""
    storage = trial.storage
    study_id = storage.get_study_id_from_name(trial.study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    version, text = f"dashboard:{trial_id}:note_ver", f"dashboard:{trial_id}:note_str:"
    attrs = storage.get_study_system_attrs(study_id)
    chunks = [body[i : i + NOTE_CHUNK] for i in range(0, len(body), NOTE_CHUNK)]
    before = sum(key.startswith(text) for key in attrs)
    storage.set_study_system_attr(study_id, version, int(attrs.get(version, 0)) + 1)
    for i, chunk in enumerate(chunks + [""] * (before - len(chunks))):
        storage.set_study_system_attr(study_id, f"{text}{i}", chunk)


def trial_config(cfg: Config, overrides: Sequence[str], number: int, study: str) -> Config:
    """The sweep's base config with the trial's overrides; its metrics files go to
    ``<folder of output.metrics>/sweeps/<study>/trial_<n>/``."""
    out = Path(cfg.output.metrics).parent / "sweeps" / study / f"trial_{number:04d}"
    return build_config(apply_overrides(to_tree(cfg), [*overrides, *run_files(out)]))


def tracked_runner(generator: Any, real: Any, registry: Registry | None = None, world: World = SINGLE) -> RunTrial:
    """Run trials with :func:`dp_ops.runner.lead_run`, one generator, dataset and MLflow store (default:
    each trial config's) for all of them. Under torchrun (``world``) each trial is one run on every
    process: rank 0 asks and tells Optuna and hands each trial's config to the others
    (:func:`dp_ops.runner.follow_runs`)."""

    def run(
        cfg: Config, tags: dict[str, str], observers: Sequence[Observer], resume: str | None
    ) -> tuple[RunResult, str]:
        tracked = lead_run(cfg, generator, real, observers, resume, {**tags, **threads_tag()}, registry, world)
        return tracked.result, tracked.run_id

    return run


def dashboard_command(storage: str) -> str:
    """The optuna-dashboard command for a study's storage: its SQLAlchemy URL, or a journal file's path
    (optuna-dashboard opens an existing file as a journal)."""
    return f"optuna-dashboard {shlex.quote(storage)}"


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (one objective) or the Pareto front (two); empty before any trial completes."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def replay_command(trial: FrozenTrial, tool: Literal["dpops", "dvc"] = "dpops") -> str:
    """The command that replays a trial (its overrides are params.yaml keys)."""
    head = "dpops run" if tool == "dpops" else "dvc exp run"
    return " ".join([head, *(f"-S {o}" for o in trial.user_attrs.get("dpops.overrides", []))])


def fmt_params(params: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) and not math.isnan(v) else f"{k}={v}" for k, v in params.items()
    )
