"""MLflow tracking of experiments, at the edge of the engine (an :class:`~dp_ops.engine.loop.Observer`).

Layout in the registry (DESIGN.md §4), one level of nesting only:

- one **parent run** per experiment: tags ``dpops.role=experiment``, ``dpops.strategy``, the git commit
  and DVC experiment variables when present; the whole config as flat params (the ``params.yaml``
  names); the validation curve (``val_acc`` at step = iteration) and per-round curves (step = round);
  summary metrics at the end;
- one **child run** per round (``mlflow.parentRunId``, ``dpops.role=round``, ``dpops.round=k``): its
  metrics, a grid of the new samples grouped by class and an entropy histogram.

Library code uses an explicit :class:`mlflow.MlflowClient` and run ids, never the fluent global state.
A run that raises ends FAILED, Ctrl-C ends KILLED: nothing stays RUNNING after the process ends.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from dp_ops.config import Config, flatten
from dp_ops.engine.data import to_uint8
from dp_ops.engine.sampling import Samples
from dp_ops.engine.loop import Observer, RoundRecord, RunResult
from dp_ops.records.versioning import DvcVersioner, ShardInfo

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_ID_TAG = "mlflow.parentRunId"
DVC_ENV_TAGS = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE")
ROUND_METRICS = ("pool_size", "n_new", "n_generated", "entropy_mean", "entropy_median", "entropy_p90",
                 "iteration", "gen_seconds", "train_seconds")  # fmt: skip


def tracking_uri(cfg: Config) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the working directory."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def artifact_root(uri: str) -> str:
    """Artifacts live next to a local SQLite store (MLflow would default to the current directory)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return ""  # a tracking server decides


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri) or None)
    except MlflowException:  # another process (a second sweep worker) created it in the meantime
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_name(cfg: Config) -> str:
    dp = cfg.dp
    detail = {"dp": f"ω{dp.omega:g}", "oversample": f"r{dp.oversample_ratio}", "static": f"N{dp.initial_size}"}
    return f"{dp.strategy}-{detail[dp.strategy]}-seed{cfg.seed}"


class MlflowTracker(Observer):
    """Creates the parent run at construction; child runs as rounds complete; ends them all."""

    def __init__(
        self, cfg: Config, client: MlflowClient | None = None, run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ):  # fmt: skip
        """Start a new parent run (with extra ``tags``, e.g. a sweep's ``dpops.study``), or with ``run_id``
        re-open an interrupted one (to resume it)."""
        self.cfg = cfg
        # Set before rounds complete (it needs this run's id) to link each round's shard with log_input.
        self.shards: DvcVersioner | None = None
        self.uri = tracking_uri(cfg)
        self.client = client or MlflowClient(tracking_uri=self.uri)
        self.experiment_id = get_or_create_experiment(self.client, cfg.tracking.experiment, self.uri)
        self.round_run_ids: list[str] = []
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            for key, value in (tags or {}).items():  # e.g. the sweep trial that resumes it
                self.client.set_tag(run_id, key, value)
            return
        tags = {"dpops.role": "experiment", "dpops.strategy": cfg.dp.strategy, **_git_tags(), **_dvc_tags(), **(tags or {})}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name(cfg))
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100], synchronous=True)

    def drop_rounds_after(self, last_round: int) -> list:
        """Delete round runs past the last checkpointed round (logged, but their state never landed);
        returns the round runs that stay."""
        kept = []
        for run in round_runs(self.client, self.run_id):
            if int(run.data.tags["dpops.round"]) > last_round:
                self.client.delete_run(run.info.run_id)
            else:
                kept.append(run)
                self.round_run_ids.append(run.info.run_id)
        return kept

    # ---- Observer hooks -------------------------------------------------------------------------
    def on_eval(self, iteration: int, val_acc: float) -> None:
        self.client.log_metric(self.run_id, "val_acc", val_acc, step=iteration)

    def on_round(self, record: RoundRecord, increment: Samples) -> None:
        now = int(time.time() * 1000)
        values = {k: float(getattr(record, k)) for k in ROUND_METRICS}
        values["iterations"] = values.pop("iteration")  # iterations trained before this round
        values["round"] = float(record.round)
        if record.val_acc_at_trigger is not None:
            values["val_acc_at_trigger"] = record.val_acc_at_trigger
        child = self.client.create_run(
            self.experiment_id, run_name=f"round-{record.round}",
            tags={PARENT_ID_TAG: self.run_id, "dpops.role": "round", "dpops.round": str(record.round),
                  "dpops.strategy": self.cfg.dp.strategy},
        )  # fmt: skip
        child_id = child.info.run_id
        self.client.log_batch(child_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()], synchronous=True)
        if self.shards is not None and record.round in self.shards.shards:
            self._link_shard(child_id, self.shards.shards[record.round])
        with tempfile.TemporaryDirectory() as tmp:
            grid = Path(tmp) / f"samples_round{record.round}.png"
            hist = Path(tmp) / f"entropy_round{record.round}.png"
            save_sample_grid(increment, grid)
            save_entropy_histogram(increment, hist, record.round)
            self.client.log_artifact(child_id, str(grid))
            self.client.log_artifact(child_id, str(hist))
        self.client.set_terminated(child_id, RunStatus.to_string(RunStatus.FINISHED))
        self.round_run_ids.append(child_id)
        # the same numbers on the parent as curves over rounds, so experiments compare side by side
        curve = [Metric(f"round_{k}", v, now, record.round) for k, v in values.items() if k != "round"]
        self.client.log_batch(self.run_id, metrics=curve, synchronous=True)

    def _link_shard(self, child_id: str, shard: ShardInfo) -> None:
        """``log_input`` a MetaDataset whose digest is the DVC md5 (fits MLflow's 36-character column)."""
        source = LocalArtifactDatasetSource(str(shard.path))
        dataset = MetaDataset(source, name=f"{self.run_id}/round-{shard.round}", digest=shard.md5)
        context = InputTag(key="mlflow.data.context", value="training")
        self.client.log_inputs(child_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[context])])
        for key, value in (("dpops.shard_md5", shard.md5), ("dpops.shard_path", str(shard.path)),
                           ("dpops.shard_versioned_by", shard.versioned_by)):  # fmt: skip
            self.client.set_tag(child_id, key, value)

    def on_finish(self, result: RunResult) -> None:
        now = int(time.time() * 1000)
        s = result.summary
        summary = {"final_val_acc": s.final_val_acc, "final_test_acc": s.final_test_acc, "best_val_acc": s.best_val_acc,
                   "pool_size": s.pool_size, "generated_samples": s.generated_samples, "iterations": s.iterations,
                   "rounds": s.rounds, "gen_seconds": s.gen_seconds, "train_seconds": s.train_seconds,
                   "unet_evals": s.unet_evals}  # fmt: skip
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


def save_sample_grid(samples: Samples, path: Path, per_class: int = 16, scale: int = 3, max_cell: int = 64) -> None:
    """PNG grid: one row per class, up to ``per_class`` of its new samples (grey or RGB); cells larger
    than ``max_cell`` are downsized, small ones nearest-neighbour upscaled (at most ``scale``×)."""
    from PIL import Image

    labels = samples.labels.numpy()
    classes = sorted(set(labels.tolist()))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    images = samples.images[torch.from_numpy(keep)]
    if images.shape[-1] > max_cell:
        images = F.interpolate(images, size=(max_cell, max_cell), mode="bilinear", antialias=True)
    images = to_uint8(images).numpy().transpose(0, 2, 3, 1)  # (n, R, R, C)
    res, channels = images.shape[1], images.shape[-1]
    canvas = np.full((len(classes) * (res + 1), per_class * (res + 1), channels), 255, dtype=np.uint8)
    for row, c in enumerate(classes):
        for col, img in enumerate(images[labels[keep] == c]):
            canvas[row * (res + 1) : row * (res + 1) + res, col * (res + 1) : col * (res + 1) + res] = img
    scale = max(1, min(scale, max_cell // res))
    grid = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    grid.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def save_entropy_histogram(samples: Samples, path: Path, round_index: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(samples.entropy.numpy(), bins=30, color="tab:blue")
    ax.set(xlabel="learner entropy (nats)", ylabel="samples", title=f"round {round_index}: new samples")
    fig.tight_layout()
    fig.savefig(path)


def _git_tags() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip()}


def _dvc_tags() -> dict[str, str]:
    return {f"dpops.{k.lower()}": os.environ[k] for k in DVC_ENV_TAGS if os.environ.get(k)}


def log_report_run(
    uri: str, experiment: str, *, role: str, run_name: str, metrics: dict[str, float], params: dict[str, str],
    files: Sequence[Path] = (),
) -> str:  # fmt: skip
    """One FINISHED run tagged ``dpops.role=<role>`` holding a report (a scaling fit, a benchmark): its finite
    numbers as metrics, its settings as params, its files as artifacts. Returns the run id."""
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(get_or_create_experiment(client, experiment, uri), run_name=run_name,
                            tags={"dpops.role": role, **_git_tags()})  # fmt: skip
    finite = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    client.log_batch(
        run.info.run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in finite.items()],
        params=[Param(k, str(v)[:6000]) for k, v in params.items()], synchronous=True,
    )  # fmt: skip
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run.info.run_id


def round_runs(client: MlflowClient, run_id: str) -> list:
    """The child (round) runs of an experiment run, ordered by round."""
    parent = client.get_run(run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_ID_TAG}` = '{run_id}'", max_results=10_000
    )
    return sorted(children, key=lambda r: int(r.data.tags.get("dpops.round", -1)))


def shard_md5s(rounds: list) -> dict[int, str | None]:
    """``round -> shard md5`` as the round runs record it (None for a run made without versioning)."""
    return {int(r.data.tags["dpops.round"]): r.data.tags.get("dpops.shard_md5") for r in rounds}
