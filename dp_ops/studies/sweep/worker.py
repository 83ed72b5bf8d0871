"""One worker of a sweep: :class:`Sweep` asks the study for trials until its budget, runs each as a tracked
DP experiment and tells the result; and what it leaves for Optuna's own views and for the CLI.

Each trial's validation accuracy at every evaluation becomes its intermediate values (:class:`TrialObserver`,
which also keeps a journal file's lease alive), its MLflow run is linked from its attributes and its
optuna-dashboard note (:func:`run_note`, :func:`save_note`); :func:`replay_command` and
:func:`dashboard_command` are the commands the CLI prints.
"""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from dp_ops.config import Config, SweepConfig, apply_overrides, build_config, run_files, to_tree
from dp_ops.engine.dist import SINGLE, World, threads_tag
from dp_ops.engine.loop import Observer, RunResult
from dp_ops.errors import ConfigError
from dp_ops.records.checkpoint import checkpoint_path
from dp_ops.records.tracking import (
    StoreUnavailable,
    TrackingStore,
    browse_hint,
    filter_equals,
    is_server,
    run_url,
)
from dp_ops.runner import RunRequest, lead_run
from dp_ops.studies.sweep.study import (
    _experimental,
    counted_trials,
    is_rdb,
    objective_names,
    open_study,
    requeue_stale,
    retried_trials,
    retry,
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
        store: TrackingStore | None = None,
    ) -> None:
        """Validates the strategy, opens (or creates) the study and creates the trials' MLflow experiment
        (both stores exist before any trial, or another worker, writes): run it before any expensive work.
        ``store``: the MLflow store (default: the config's)."""
        if strategy not in ("dp", "static"):
            raise ConfigError(f"--strategy {strategy}: allowed dp (TPE over ω, patience, round size) or static (grid)")
        try:
            filter_equals("tags.`dpops.study`", study_name)  # (its runs are found by this tag)
        except ConfigError:
            raise ConfigError(f"--study-name {study_name!r}: may hold ' or \" but not both") from None
        self.cfg, self.sc, self.strategy, self.name = cfg, sc, strategy, study_name
        self.store = store or TrackingStore.from_config(cfg)
        self.base_overrides = [*base_overrides, f"dp.strategy={strategy}", f"tracking.experiment={self.experiment}"]
        sampler = optuna.samplers.TPESampler(seed=sc.sampler_seed, multivariate=True)
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=cfg.train.iterations // 4)
            if sc.prune
            else optuna.pruners.NopPruner()
        )
        self.study = open_study(sc, study_name, strategy, sampler, pruner)
        self.experiment_id = self.store.experiment_id(self.experiment)  # (every trial's runs go there)
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
                f"the tracking server {self.store.uri} stopped answering ({exc.why}) during trial {asked[0]}"
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
        url = run_url(self.store.uri, self.experiment_id, run_id)
        if url is not None:
            trial.set_user_attr("dpops.mlflow_run_url", url)
        save_note(trial, run_note(self.store.uri, self.experiment_id, run_id))

    def _run_to_resume(self, number: int) -> str | None:
        """A retry resumes the MLflow run of the trial it retries: the latest of the retry history that has
        one (a retry that resumed a run re-tags it with its own number)."""
        history = retried_trials(self.study.get_trials(deepcopy=False)[number])
        return next((run for n in reversed(history) if (run := self._run_of(n))), None)

    def _run_of(self, number: int) -> str | None:
        """The MLflow run of a trial that returned none (raised, pruned, killed), found by its tags."""
        return self.store.find_run(self.experiment, {"dpops.study": self.name, "dpops.trial": str(number)})

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
                self.store.end_run(run_id, "KILLED", tags={"dpops.pruned": "true"})
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


def tracked_runner(generator: Any, real: Any, store: TrackingStore | None = None, world: World = SINGLE) -> RunTrial:
    """Run trials with :func:`dp_ops.runner.lead_run`, one generator, dataset and MLflow store (default:
    each trial config's) for all of them. Under torchrun (``world``) each trial is one run on every
    process: rank 0 asks and tells Optuna and hands each trial's config to the others
    (:func:`dp_ops.runner.follow_runs`)."""

    def run(
        cfg: Config, tags: dict[str, str], observers: Sequence[Observer], resume: str | None
    ) -> tuple[RunResult, str]:
        request = RunRequest(cfg, resume, {**tags, **threads_tag()}, observers, store)
        tracked = lead_run(request, generator, real, world)
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
