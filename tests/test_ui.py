"""A tiny run looked at in the real clients: `mlflow ui` and optuna-dashboard in headless Chromium
(tools/ui_check.py, which says what is checked)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ui_check():
    spec = importlib.util.spec_from_file_location("ui_check", ROOT / "tools" / "ui_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ui_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_tiny_run_reads_well_in_mlflow_ui_and_optuna_dashboard(tmp_path, mlflow_store, tiny_generator):
    ui_check = _ui_check()
    why = ui_check.browser_missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/run installs Debian's chromium and chromium-driver")
        pytest.skip(why)
    work = tmp_path / "run"
    mlflow_store(work)  # the store the tiny run logs to, already migrated
    tiny_generator.save(work / "models" / "generator")  # found, so the run trains none

    shots = ui_check.ui_check(None, tmp_path / "shots", work)  # CheckFailed: one line per failed check

    names = ["ui-experiment.png", "ui-run.png", "ui-round.png", "ui-model.png", "ui-optuna.png"]
    assert [p.name for p in shots] == names
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in shots)
