"""A run's logged model: its final classifier, saved, linked to what measured it, and registered.

:func:`log_model` makes the MLflow logged model ``model`` of a run (:class:`~dp_ops.records.tracking.runs.
MlflowTracker` calls it at the end of a run): the classifier saved by ``mlflow.pytorch`` in its default
format (``torch.export``: it loads without dp_ops) with a signature, an input example, its class names and
input range; linked to the run's summary metrics and the accuracies to the real split they were measured on;
a new version of ``tracking.register_model`` when that is set. :class:`SavedModel` is what the run reports
of it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException

from dp_ops.config import flatten
from dp_ops.records.tracking.names import NOTE_TAG

if TYPE_CHECKING:
    from dp_ops.records.tracking.runs import MlflowTracker

MODEL_NAME = "model"  # the logged model of a run: its final classifier
INPUT_RANGE = (-1.0, 1.0)  # the classifier's input: float32 images scaled to this range


@dataclass(frozen=True)
class SavedModel:
    """A run's logged classifier: its MLflow model id and URI (``models:/<id>``, what
    ``mlflow.pytorch.load_model`` takes) and, when registered, the registered name and version."""

    model_id: str
    uri: str
    registered_name: str | None = None
    version: str | None = None


def log_model(tracker: MlflowTracker, model: torch.nn.Module, example: torch.Tensor) -> SavedModel:
    """``model`` (the final classifier: raw logits of float images in [-1, 1], shape ``example``'s with
    any batch size) as ``tracker``'s run's MLflow logged model ``model``, saved by ``mlflow.pytorch`` in its
    default format (``torch.export``: loads without dp_ops), with a signature, ``example`` as its input
    example and its class names and input range as metadata; linked to the summary metrics (call after
    :meth:`MlflowTracker.on_finish`), the accuracies to the real split they were measured on; registered as
    a new version of ``tracking.register_model`` when that is set.

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
    classes = list(tracker.classes) or [str(k) for k in range(logits.shape[-1])]
    metadata = {"classes": classes, "input_range": list(INPUT_RANGE), "input_dtype": "float32"}
    note = (
        f"The final classifier of run {tracker.run_id} ({tracker.cfg.learner.model}): float32 images (N, "
        f"{', '.join(map(str, x.shape[1:]))}) in [-1, 1] -> logits over its {len(classes)} classes "
        f"({', '.join(classes[:20])}{', …' if len(classes) > 20 else ''}; in order, the model's metadata)."
    )
    params = {k: str(v) for k, v in flatten(tracker.cfg).items()}
    standard = {k: v for k, v in tracker.standard_tags.items() if k.startswith("mlflow.")}  # ("Created by", …)
    logged = tracker.client.create_logged_model(
        tracker.experiment_id,
        name=MODEL_NAME,
        source_run_id=tracker.run_id,
        params=params,
        tags={**standard, NOTE_TAG: note},
    )
    try:
        with tempfile.TemporaryDirectory() as tmp, _use_tracking_uri(tracker.uri), _quiet("mlflow"):
            local = Path(tmp) / MODEL_NAME
            description = Model(artifact_path=logged.artifact_location, run_id=tracker.run_id, model_id=logged.model_id)
            mlflow.pytorch.save_model(
                model,
                str(local),
                mlflow_model=description,
                signature=signature,
                input_example=x.numpy(),
                pip_requirements=requirements,
                metadata=metadata,
            )
            tracker.client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        tracker.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    tracker.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    step = tracker.summary_metrics[0].step if tracker.summary_metrics else 0
    tracker.client.log_outputs(tracker.run_id, [LoggedModelOutput(logged.model_id, step)])
    _link_summary(tracker, logged.model_id)
    name = tracker.cfg.tracking.register_model
    version = None
    if name:
        try:
            tracker.client.create_registered_model(name)
        except MlflowException as exc:  # (registered by an earlier run)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        created = tracker.client.create_model_version(
            name, f"models:/{logged.model_id}", run_id=tracker.run_id, model_id=logged.model_id
        )
        version = str(created.version)
    return SavedModel(logged.model_id, f"models:/{logged.model_id}", name or None, version)


def _link_summary(tracker: MlflowTracker, model_id: str) -> None:
    """The summary metrics as the model's (the same points again: the run keeps one of each), the
    validation and test accuracies with the real split they were measured on (the run's inputs)."""
    splits = {}
    inputs = tracker.client.get_run(tracker.run_id).inputs
    for entry in inputs.dataset_inputs if inputs is not None else []:
        context = {t.key: t.value for t in entry.tags}.get("mlflow.data.context")
        splits[context] = entry.dataset
    measured_on = {"final_test_acc": "test", "final_val_acc": "validation", "best_val_acc": "validation"}
    linked = []
    for m in tracker.summary_metrics:
        dataset = splits.get(measured_on.get(m.key, ""))
        name, digest = (dataset.name, dataset.digest) if dataset is not None else (None, None)
        linked.append(
            Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, dataset_name=name, dataset_digest=digest)
        )
    tracker.client.log_batch(tracker.run_id, metrics=linked, synchronous=True)


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
