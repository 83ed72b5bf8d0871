"""SIGTERM while a stopped run is being ended: noted, not raised into the store write (a real SQLite store,
a real signal to this process)."""

import os
import signal

import pytest
from mlflow import MlflowClient

from dp_ops.config import build_config
from dp_ops.records.tracking import MlflowTracker, TrackingStore
from dp_ops.signals import sigterm_as_interrupt, terminated

from conftest import tiny_tree


@pytest.mark.parametrize(("exc", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_sigterm_while_the_run_ends_lets_it_end(mlflow_uri, monkeypatch, exc, status):
    """torchrun's SIGTERM reached rank 0 while it ended a run that a lost peer had failed: raised inside
    SQLAlchemy's fetch, it left the run half-ended and SQLAlchemy logging "Error closing cursor" with a
    traceback. Now the run ends with its status and the exception that stopped it is the one that leaves."""
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_uri, "experiment": "t"}))
    tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg)
    end = tracker.client.set_terminated

    def signalled(run_id: str, name: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # (delivered at once: Python runs the handler before the write)
        end(run_id, name)

    monkeypatch.setattr(tracker.client, "set_terminated", signalled)
    with pytest.raises(exc), sigterm_as_interrupt(), tracker.lifecycle():
        raise exc("stopped")
    assert terminated()  # (noted: the command's exit code says SIGTERM)
    assert MlflowClient(mlflow_uri).get_run(tracker.run_id).info.status == status
