"""MLflow, in one place: the only package of dp_ops that imports mlflow, one module per job.

- :mod:`~dp_ops.records.tracking.store` — the store and its URI rules: :class:`TrackingStore` (one store: the
  client, experiments, run lookups returning :class:`RunFacts`, report runs, the outer run a new run nests
  under), ``resolve_uri``/``check_uri``, how to browse a store and a run's page;
- :mod:`~dp_ops.records.tracking.runs` — a run and its round runs: :class:`MlflowTracker` (the parent run,
  a child run per round with its shard as a dataset input, its status), :func:`system_metrics`;
- :mod:`~dp_ops.records.tracking.model` — the logged model (the final classifier) and its registration;
- :mod:`~dp_ops.records.tracking.names` — what a run is called and says: names, descriptions, tags.

The names other modules use are importable from here. The file lock a new SQLite store is created under
is the general :func:`dp_ops.files.file_lock` (Optuna's storage takes it too).
"""

from dp_ops.records.tracking.model import INPUT_RANGE, MODEL_NAME, SavedModel
from dp_ops.records.tracking.names import (
    EXPERIMENT_KIND,
    EXPERIMENT_NOTE,
    GENERATOR_META,
    KIND_TAG,
    NOTE_TAG,
    PARENT_ID_TAG,
    RUN_NAME_TAG,
    config_params,
    pictures_markdown,
    round_note,
    run_name,
    run_note,
    run_tags,
)
from dp_ops.records.tracking.runs import GeneratorFacts, MlflowTracker, RoundDataset, VersionedRound, system_metrics
from dp_ops.records.tracking.store import (
    DEFAULT_URI,
    HTTP_DEFAULTS,
    RunFacts,
    StoreUnavailable,
    TrackingStore,
    artifact_root,
    browse_hint,
    check_uri,
    filter_equals,
    is_server,
    quiet_logs,
    resolve_uri,
    round_index,
    round_runs,
    run_url,
    sqlite_path,
    tracking_uri,
)

__all__ = [
    "DEFAULT_URI",
    "EXPERIMENT_KIND",
    "EXPERIMENT_NOTE",
    "GENERATOR_META",
    "HTTP_DEFAULTS",
    "INPUT_RANGE",
    "KIND_TAG",
    "MODEL_NAME",
    "NOTE_TAG",
    "PARENT_ID_TAG",
    "RUN_NAME_TAG",
    "GeneratorFacts",
    "MlflowTracker",
    "RoundDataset",
    "RunFacts",
    "SavedModel",
    "StoreUnavailable",
    "TrackingStore",
    "VersionedRound",
    "artifact_root",
    "browse_hint",
    "check_uri",
    "config_params",
    "filter_equals",
    "is_server",
    "pictures_markdown",
    "quiet_logs",
    "resolve_uri",
    "round_index",
    "round_note",
    "round_runs",
    "run_name",
    "run_note",
    "run_tags",
    "run_url",
    "sqlite_path",
    "system_metrics",
    "tracking_uri",
]
