"""What a run is called and what it says about itself: its name, its description, its tags.

The MLflow UI shows a run's name, its description (the ``mlflow.note.content`` tag: :func:`run_note` for a
run, :func:`round_note` for a round, each led by its latest pictures, :func:`pictures_markdown`) and its
tags; an experiment opens in the UI's model-training mode (:data:`KIND_TAG`) with :data:`EXPERIMENT_NOTE`
as its description. A run carries the tags MLflow's own runs carry (:func:`run_tags`) and, inside a DVC
experiment, DVC's (:func:`dvc_tags`). The tag and param names every other module of the package reads
are here, so a run's words are written in one place. Nothing here talks to a store.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from dp_ops import __version__
from dp_ops.config import Config
from dp_ops.engine.loop import RoundRecord
from dp_ops.engine.strategies import STRATEGIES
from dp_ops.formats import FORMAT_TAG, FORMATS

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
PICTURES = "\n\n<!-- dpops:pictures -->\n"  # where a parent run's description gives way to its latest pictures
DVC_ENV_TAGS = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE")
RUN_NAME_TAG = "dpops.run_name"  # a named run's name (tracking.run_name), exactly as given
GENERATOR_META = "generator_meta."  # prefix of the params describing the loaded generator (not config keys)


def names_experiment(cfg: Config) -> bool:
    """Whether the config (``tracking.experiment``) or the environment (``MLFLOW_EXPERIMENT_NAME``) names
    the experiment; else a nested run goes to its outer run's (:meth:`TrackingStore.experiment_name`)."""
    return bool(cfg.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME"))


def run_name(cfg: Config) -> str:
    """An unnamed run's name: its strategy, the setting that sets its runs apart, its seed (``dp-ω0.05-seed0``)."""
    dp = cfg.dp
    return f"{dp.strategy}-{STRATEGIES[dp.strategy].run_detail(dp)}-seed{cfg.seed}"


def run_tags() -> dict[str, str]:
    """The tags MLflow's own runs carry (``mlflow.user``, ``mlflow.source.name``/``type``, the git commit of
    the working directory's repository) and the dp_ops version and command line that made the run."""
    from mlflow.tracking.context.registry import resolve_tags

    return {
        **resolve_tags({}),
        **_git_tags(),
        "dpops.version": __version__,
        "dpops.command": command_line(),
        FORMAT_TAG: str(FORMATS["run"].current),
    }


def command_line() -> str:
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def run_note(cfg: Config) -> str:
    """A parent run's description (the MLflow UI shows it on the run page): what ran, and how."""
    what = STRATEGIES[cfg.dp.strategy].note(cfg.dp)
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


def config_params(params: Mapping[str, str]) -> dict[str, str]:
    """A parent run's params that are config keys (what :func:`~dp_ops.config.from_flat` rebuilds)."""
    return {k: v for k, v in params.items() if not k.startswith(GENERATOR_META)}


def _git_tags() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip()}


def dvc_tags() -> dict[str, str]:
    """The variables DVC sets in an experiment's stage (its name, baseline, stage) as ``dpops.*`` tags."""
    return {f"dpops.{k.lower()}": os.environ[k] for k in DVC_ENV_TAGS if os.environ.get(k)}
