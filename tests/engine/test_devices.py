"""Device settings: the one precision switch and the ``deterministic`` option."""

import os

import pytest
import torch

from dp_ops.config import build_config, flatten
from dp_ops.engine.devices import autocast, set_deterministic
from dp_ops.runner import preflight

from conftest import tiny_tree


def test_autocast_changes_nothing_on_meta_only():
    with autocast("meta", "bfloat16"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bfloat16"):
        assert torch.is_autocast_enabled("cpu")


@pytest.fixture
def torch_defaults(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    set_deterministic(False)


@pytest.mark.usefixtures("torch_defaults")
def test_deterministic_is_set_before_work_and_recorded_with_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config(tiny_tree(deterministic=True))
    preflight(cfg)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert flatten(cfg)["deterministic"] is True  # (a run's params: what its MLflow run records)
    preflight(build_config(tiny_tree()))  # the next run of a benchmark worker: torch's defaults again
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
