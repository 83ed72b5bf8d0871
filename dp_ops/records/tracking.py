"""MLflow, in one place: the only module of dp_ops that imports mlflow.

:class:`Registry` is the tracking store, built once from a URI (or a config): it owns the client, the
URI resolution (``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``) and the
artifact root. Everything else asks it, and gets facts back (:class:`RunFacts`, ids, plain dicts), never
MLflow entities: experiment get-or-create, run lookup and search, round runs and their shard md5s,
metric histories, report runs.

The layout of an experiment in the store, one level of nesting only:

- one **parent run** per experiment (:class:`MlflowTracker`): tags ``dpops.role=experiment``,
  ``dpops.strategy``, the git commit and DVC experiment variables when present; the whole config as
  flat params (the ``params.yaml`` names); the validation curve (``val_acc`` at step = iteration) and
  per-round curves (``round_*`` at step = round); summary metrics at the end;
- one **child run** per round (``mlflow.parentRunId``, ``dpops.role=round``, ``dpops.round=k``): its
  metrics, a grid of the new samples grouped by class, an entropy histogram, and its shard linked with
  ``log_input`` (the dataset digest is the shard's DVC md5, also in the ``dpops.shard_md5`` tag, which
  is all a restore needs).

Library code uses an explicit :class:`mlflow.MlflowClient` and run ids, never the fluent global state.
A run that raises ends FAILED, Ctrl-C ends KILLED: nothing stays RUNNING after the process ends.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]  # (re-exported at run time)
from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run, RunStatus
from mlflow.exceptions import MlflowException

from dp_ops.config import Config, flatten
from dp_ops.engine.loop import Observer, RoundRecord, RunResult
from dp_ops.engine.rounds import RoundParts
from dp_ops.errors import DataError
from dp_ops.files import write_json
from dp_ops.records.plots import save_entropy_histogram, save_sample_grid

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_ID_TAG = "mlflow.parentRunId"
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


def resolve_uri(uri: str = "") -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


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

    @property
    def round(self) -> int:
        """A round run's index (``dpops.round``); -1 for any other run."""
        return int(self.tags.get("dpops.round", -1))

    @classmethod
    def of(cls, run: Run) -> RunFacts:
        return cls(
            run.info.run_id,
            run.info.experiment_id,
            run.info.status,
            dict(run.data.tags),
            dict(run.data.params),
            dict(run.data.metrics),
        )


class Registry:
    """One tracking store: ``Registry(uri)`` or :meth:`from_config`. Thread it through rather than
    building clients where they are needed, so the URI is resolved once and every lookup reads alike."""

    def __init__(self, uri: str = "") -> None:
        self.uri = resolve_uri(uri)
        self.artifact_root = artifact_root(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)  # for MlflowTracker and round_runs in this module

    @classmethod
    def from_config(cls, cfg: Config) -> Registry:
        return cls(tracking_uri(cfg))

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # ---- experiments ---------------------------------------------------------------------------
    def find_experiment(self, name: str) -> str | None:
        """The id of the experiment called ``name``, or None."""
        exp = self.client.get_experiment_by_name(name)
        return None if exp is None else exp.experiment_id

    def experiment_id(self, name: str) -> str:
        """Get or create the experiment ``name`` (artifacts under :attr:`artifact_root`). Safe when several
        processes (sweep or benchmark workers) create it at the same moment: one wins, all get its id."""
        found = self.find_experiment(name)
        if found is not None:
            return found
        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_root or None)
        except MlflowException:  # another process created it in the meantime
            found = self.find_experiment(name)
            if found is None:
                raise
            return found

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
    ) -> list[RunFacts]:
        """Runs of these experiments matching an MLflow filter string."""
        runs = self.client.search_runs(
            list(experiment_ids), filter_string, max_results=max_results, order_by=list(order_by) or None
        )
        return [RunFacts.of(r) for r in runs]

    def find_run(self, experiment: str, tags: Mapping[str, str]) -> str | None:
        """The id of a run of the experiment named ``experiment`` that has all these tags, or None."""
        exp_id = self.find_experiment(experiment)
        if exp_id is None:
            return None
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.search([exp_id], query, max_results=1)
        return runs[0].run_id if runs else None

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
    ) -> str:
        """One FINISHED run tagged ``dpops.role=<role>`` holding a report (a scaling fit, a benchmark): its
        finite numbers as metrics, its settings as params, its files as artifacts. Returns the run id."""
        run = self.client.create_run(
            self.experiment_id(experiment), run_name=run_name, tags={"dpops.role": role, **_git_tags()}
        )
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
        return run_id


def run_name(cfg: Config) -> str:
    dp = cfg.dp
    detail = {"dp": f"ω{dp.omega:g}", "oversample": f"r{dp.oversample_ratio}", "static": f"N{dp.initial_size}"}
    return f"{dp.strategy}-{detail[dp.strategy]}-seed{cfg.seed}"


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
    ):
        """Start a new parent run in ``tracking.experiment`` (with extra ``tags``, e.g. a sweep's
        ``dpops.study``), or with ``run_id`` re-open an interrupted one (to resume it)."""
        self.cfg, self.registry = cfg, registry
        self.client = registry.client
        self.experiment_id = registry.experiment_id(cfg.tracking.experiment)
        self.round_run_ids: list[str] = []
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            for key, value in (tags or {}).items():  # e.g. the sweep trial that resumes it
                self.client.set_tag(run_id, key, value)
            return
        tags = {
            "dpops.role": "experiment",
            "dpops.strategy": cfg.dp.strategy,
            **_git_tags(),
            **_dvc_tags(),
            **(tags or {}),
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name(cfg))
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100], synchronous=True)

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
        self.client.log_metric(self.run_id, "val_acc", val_acc, step=iteration)

    def on_round(self, record: RoundRecord, increment: RoundParts) -> None:
        self.log_round(record, increment, None)

    def log_round(self, record: RoundRecord, increment: RoundParts, shard: Shard | None) -> None:
        """The round's child run (metrics, pictures, its ``shard`` linked when versioned) and the same
        numbers on the parent as curves over rounds, so experiments compare side by side."""
        now = _now()
        values = {k: float(getattr(record, k)) for k in ROUND_METRICS}
        values["iterations"] = values.pop("iteration")  # iterations trained before this round
        values["round"] = float(record.round)
        if record.val_acc_at_trigger is not None:
            values["val_acc_at_trigger"] = record.val_acc_at_trigger
        child = self.client.create_run(
            self.experiment_id,
            run_name=f"round-{record.round}",
            tags={
                PARENT_ID_TAG: self.run_id,
                "dpops.role": "round",
                "dpops.round": str(record.round),
                "dpops.strategy": self.cfg.dp.strategy,
            },
        )
        child_id = child.info.run_id
        self.client.log_batch(child_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()], synchronous=True)
        with tempfile.TemporaryDirectory() as tmp:
            if shard is not None:
                self._link_shard(child_id, shard, Path(tmp))
            grid = Path(tmp) / f"samples_round{record.round}.png"
            hist = Path(tmp) / f"entropy_round{record.round}.png"
            save_sample_grid(increment, grid)
            save_entropy_histogram(increment, hist, record.round)
            self.client.log_artifact(child_id, str(grid))
            self.client.log_artifact(child_id, str(hist))
        self.client.set_terminated(child_id, RunStatus.to_string(RunStatus.FINISHED))
        self.round_run_ids.append(child_id)
        curve = [Metric(f"round_{k}", v, now, record.round) for k, v in values.items() if k != "round"]
        self.client.log_batch(self.run_id, metrics=curve, synchronous=True)

    def _link_shard(self, child_id: str, shard: Shard, tmp: Path) -> None:
        """``log_input`` a MetaDataset whose digest is the round folder's DVC digest (``<md5>.dir`` fits
        MLflow's 36-character column), and log ``parts.json`` (every part's md5 and size): what restore
        and resume read."""
        write_json(tmp / PARTS_FILE, shard.parts_json())
        self.client.log_artifact(child_id, str(tmp / PARTS_FILE))
        source = LocalArtifactDatasetSource(str(shard.path))
        dataset = MetaDataset(source, name=f"{self.run_id}/round-{shard.round}", digest=shard.md5)  # type: ignore[abstract]
        context = InputTag(key="mlflow.data.context", value="training")
        self.client.log_inputs(child_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[context])])
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
            "unet_evals": s.unet_evals,
        }
        now = _now()
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()], synchronous=True
        )

    # ---- run status ----------------------------------------------------------------------------
    @contextmanager
    def lifecycle(self) -> Iterator[MlflowTracker]:
        """FINISHED on success, KILLED on Ctrl-C, FAILED on any other exception (then re-raised)."""
        try:
            yield self
        except KeyboardInterrupt:
            self._end(RunStatus.KILLED)
            raise
        except BaseException:
            self._end(RunStatus.FAILED)
            raise
        self._end(RunStatus.FINISHED)

    def _end(self, status: int) -> None:
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))


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
        [parent.info.experiment_id], f"tags.`{PARENT_ID_TAG}` = '{run_id}'", max_results=MAX_RESULTS
    )
    return sorted(children, key=lambda r: int(r.data.tags.get("dpops.round", -1)))


def parts_listing(client: MlflowClient, run_id: str) -> list[dict] | None:
    """A round run's ``parts.json`` (None when the round was tracked without versioning)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, PARTS_FILE, tmp)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text())


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
