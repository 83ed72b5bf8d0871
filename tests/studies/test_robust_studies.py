"""Studies when things go wrong: sweep workers starting together on a new storage, storages that cannot be
opened, a tracking server that stops answering during a sweep, and `dpops scaling` on bad input. Real
Optuna (SQLite, journal file), real MLflow SQLite stores, real processes."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from dp_ops.cli import app
from dp_ops.config import SweepConfig, build_config
from dp_ops.errors import ConfigError, DataError
from dp_ops.records.tracking import MlflowTracker, StoreUnavailable, TrackingStore
from dp_ops.studies.scaling_report import points_from_files, points_from_mlflow
from dp_ops.studies.sweep import Sweep, make_storage, retried_trials

from conftest import tiny_tree

SPACE = {
    "omega": {"low": 0.05, "high": 0.5},
    "patience": {"low": 1, "high": 3},
    "round_size": {"low": 10, "high": 30, "step": 10},
    "static_sizes": [30, 50, 70],
}

# ---- sweep workers starting together on a new storage ----------------------------------------------------
OPENER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dp_ops.config import SweepConfig
    from dp_ops.studies.sweep import open_study
    go = Path(sys.argv[2])
    while not go.exists():  # every process has imported Optuna: start together
        time.sleep(0.005)
    study = open_study(SweepConfig(storage=sys.argv[1], static_sizes=[30, 50, 70]), "s", "static")
    print(len(study.trials))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_sweep_workers_starting_together_on_a_new_storage_all_open_one_study(tmp_path, kind):
    """Optuna's table creation run at once by several processes on a new SQLite file fails in all but one
    (``table … already exists``); under the lock one creates the tables and the grid, the others load it."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else str(tmp_path / "optuna.log")
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, storage, str(go)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(6)
    ]
    time.sleep(6)  # (imports)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, "\n".join(err.decode()[-400:] for _, err in outs)
    assert {out.decode().split()[-1] for out, _ in outs} == {"3"}  # the grid enqueued once, seen by all
    study = optuna.load_study(study_name="s", storage=make_storage(storage))
    assert [t.params for t in study.trials] == [{}, {}, {}] and len(study.trials) == 3


# ---- storages that cannot be opened, one line each -------------------------------------------------------
@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ("{tmp}/missing/optuna.log", r"folder .*missing does not exist; create it"),
        ("{tmp}", r": .* is a folder; give a journal file path there$"),
        ("sqlite:///{tmp}/missing/optuna.db", r"folder .*missing does not exist; create it"),
        ("sqlite:///{tmp}", r"is a folder; give a database file path there$"),
        ("foo://host/db", r": unknown database scheme 'foo'; allowed: sqlite:///<file>"),
        ("c:/optuna.log", r": neither an SQLAlchemy URL nor a file path; allowed: sqlite:///"),
    ],
)
def test_a_storage_that_cannot_be_opened_is_one_line_naming_it(tmp_path, storage, message):
    url = storage.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as info:
        make_storage(url)
    assert str(info.value).startswith(f"sweep.storage={url!r}")
    assert "\n" not in str(info.value)
    assert re.search(message, str(info.value)), str(info.value)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    ("url", "module", "install"),
    [
        ("postgresql+psycopg2://u@127.0.0.1:1/db", "psycopg2", "pip install psycopg2-binary"),
        ("mysql://u@127.0.0.1:1/db", "MySQLdb", "pip install mysqlclient"),
        ("mysql+pymysql://u@127.0.0.1:1/db", "pymysql", "pip install PyMySQL"),
    ],
)
def test_a_missing_database_driver_says_what_to_install(url, module, install):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(ConfigError) as info:
        make_storage(url)
    assert str(info.value).startswith(f"sweep.storage={url!r}: its database driver")
    assert f"is not installed; {install}" in str(info.value)


def test_the_cli_says_it_in_one_line_before_any_work(tmp_path, mlflow_store, tiny_params):
    params = tiny_params(tmp_path, generator={"path": str(tmp_path / "gen")}, tracking={"uri": mlflow_store(tmp_path)})
    storage = str(tmp_path / "nope" / "optuna.log")
    result = CliRunner().invoke(app, ["sweep", "--params", str(params), "--storage", storage])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: sweep.storage={storage!r}: folder ")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "gen").exists()


# ---- in a sweep: a tracking server that stops answering stops the worker ---------------------------------
def test_a_tracking_server_that_stops_answering_stops_the_sweep_and_requeues_the_trial(tmp_path, mlflow_uri):
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_uri}))
    sc = SweepConfig(**SPACE, storage=str(tmp_path / "optuna.log"), n_trials=4, sampler_seed=0)
    worker = Sweep(cfg, sc, strategy="dp", study_name="s", store=TrackingStore(mlflow_uri))
    calls = []

    def run_trial(cfg, tags, observers, resume):
        calls.append(tags["dpops.trial"])
        raise StoreUnavailable("gone", why="[Errno 111] Connection refused", run_id="abc")

    with pytest.raises(StoreUnavailable) as info:
        worker.run(run_trial)
    assert calls == ["0"]  # no second trial burnt against a dead server
    assert str(info.value) == (
        f"the tracking server {mlflow_uri} stopped answering ([Errno 111] Connection refused) during trial 0 "
        "(run abc); the trial was re-queued: once the server is back, run the same dpops sweep command to "
        "continue the study"
    )
    trials = worker.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert retried_trials(trials[1]) == [0]  # (the retry, enqueued with the same parameters)


def test_a_study_name_with_both_quotes_is_refused_before_any_work(tmp_path, mlflow_uri):
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_uri}))
    sc = SweepConfig(**SPACE, storage=str(tmp_path / "optuna.log"))
    with pytest.raises(ConfigError, match=r"^--study-name 'a\\'b\"c': may hold ' or \" but not both$"):
        Sweep(cfg, sc, strategy="dp", study_name="a'b\"c", store=TrackingStore(mlflow_uri))
    assert not (tmp_path / "optuna.log").exists()


# ---- dpops scaling on bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [[1, 2, 3], "text", None])
def test_a_metrics_file_that_is_not_an_object_is_one_line(tmp_path, payload):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError, match=rf"^--metrics {path}: not a dp_ops metrics.json \(ValueError: holds a JSON"):
        points_from_files([path])


def test_report_files_of_the_wrong_shape_are_one_line(tmp_path):
    metrics = {"pool_size": 1, "generated_samples": 1, "iterations": 1}
    (tmp_path / "metrics.json").write_text(json.dumps({**metrics, "final_val_acc": 0.5, "final_test_acc": 0.5}))
    with pytest.raises(DataError, match=r"not a dp_ops metrics.json \(FileNotFoundError: .*rounds.json"):
        points_from_files([tmp_path / "metrics.json"])  # (the run's strategy is in its rounds.json)
    (tmp_path / "rounds.json").write_text(json.dumps([]))
    with pytest.raises(DataError, match=r"\(ValueError: rounds.json beside it holds a JSON list, not an object\)"):
        points_from_files([tmp_path / "metrics.json"])
    (tmp_path / "rounds.json").write_text(json.dumps({"strategy": "dp", "rounds": []}))
    (tmp_path / "curve.json").write_text(json.dumps([1, 2]))
    with pytest.raises(DataError, match=r"not a dp_ops metrics.json \(TypeError"):
        points_from_files([tmp_path / "metrics.json"])


def _finished_run(store, cfg, study):
    tracker = MlflowTracker(store, cfg, tags={"dpops.study": study})
    metrics = {"pool_size": 40, "generated_samples": 40, "iterations": 60, "final_val_acc": 0.5, "final_test_acc": 0.5}
    for key, value in metrics.items():
        tracker.client.log_metric(tracker.run_id, key, value)
    with tracker.lifecycle():
        pass
    return tracker.run_id


@pytest.mark.parametrize("study", ["it's", 'say "hi"'])
def test_a_study_name_with_a_quote_is_matched_exactly(mlflow_uri, study):
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_uri, "experiment": "t"}))
    store = TrackingStore(mlflow_uri)
    run_id = _finished_run(store, cfg, study)
    _finished_run(store, cfg, "other")
    assert [p.source for p in points_from_mlflow(store, ["t"], study=study, with_curves=False)] == [run_id]


@pytest.mark.parametrize("bad", ["params.seed == '0' and", "nonsense", "tags.x = 'a'b'"])
def test_an_invalid_filter_is_one_line_naming_it(mlflow_uri, bad):
    store = TrackingStore(mlflow_uri)
    store.experiment_id("t")
    with pytest.raises(ConfigError) as info:
        points_from_mlflow(store, ["t"], filter_string=bad)
    assert str(info.value).startswith(f"--filter {bad!r}: not a valid MLflow filter (")
    assert "\n" not in str(info.value)


def test_dpops_scaling_with_a_quote_in_the_study_and_a_list_file_is_one_line(tmp_path, mlflow_store, tiny_params):
    uri = mlflow_store(tmp_path)
    params = tiny_params(tmp_path, tracking={"uri": uri, "experiment": "t"})
    TrackingStore(uri).experiment_id("t")
    base = ["scaling", "--params", str(params), "--out", str(tmp_path / "out"), "--no-log"]
    result = CliRunner().invoke(app, [*base, "--study", "it's"])
    assert result.exit_code == 1 and result.output.startswith("error: too few points to fit"), result.output
    (tmp_path / "m.json").write_text("[]")
    result = CliRunner().invoke(app, [*base, "--metrics", str(tmp_path / "m.json")])
    assert result.exit_code == 1 and result.output.startswith(f"error: --metrics {tmp_path / 'm.json'}: not a")
    result = CliRunner().invoke(app, [*base, "--filter", "nonsense"])
    assert result.exit_code == 1 and result.output.startswith("error: --filter 'nonsense': not a valid MLflow filter")
    assert not (tmp_path / "out").exists()
