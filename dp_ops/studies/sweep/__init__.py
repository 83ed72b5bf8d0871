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
created under a file lock beside it (:func:`dp_ops.files.file_lock`), so exactly one creates
the tables and the others find them; a storage that cannot be opened (unknown scheme, driver not
installed, a folder, a missing folder) is one line naming ``sweep.storage`` before any work.

Two modules: ``study`` holds what the workers share through the storage (opening the storage and the study,
the budget's count, retries and the journal lease); ``worker`` holds one worker (:class:`Sweep`, which asks,
runs and tells trials) and what it writes for Optuna's views and prints (notes, replay and dashboard commands).
Import from ``dp_ops.studies.sweep``: these are its names.
"""

from dp_ops.studies.sweep.study import (
    check_separate_stores,
    check_storage,
    counted_trials,
    is_rdb,
    last_heartbeat,
    local_file,
    make_storage,
    objective_names,
    open_study,
    requeue_stale,
    retried_trials,
    retry,
)
from dp_ops.studies.sweep.worker import (
    RunTrial,
    Sweep,
    SweepOutcome,
    TrialObserver,
    TrialOutcome,
    best_trials,
    dashboard_command,
    fmt_params,
    replay_command,
    run_note,
    save_note,
    tracked_runner,
    trial_config,
)

__all__ = [
    "RunTrial",
    "Sweep",
    "SweepOutcome",
    "TrialObserver",
    "TrialOutcome",
    "best_trials",
    "check_separate_stores",
    "check_storage",
    "counted_trials",
    "dashboard_command",
    "fmt_params",
    "is_rdb",
    "last_heartbeat",
    "local_file",
    "make_storage",
    "objective_names",
    "open_study",
    "replay_command",
    "requeue_stale",
    "retried_trials",
    "retry",
    "run_note",
    "save_note",
    "tracked_runner",
    "trial_config",
]
