"""`dpops sweep` on real Optuna storages (SQLite, journal file) and a real MLflow SQLite store."""

import json
import os
import shlex
import subprocess
import sys
import time
import warnings
import wsgiref.util

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from dp_ops.cli import app
from dp_ops.config import build_config, flatten, load_config, load_tree, sweep_config
from dp_ops.engine.loop import Observer
from dp_ops.errors import ConfigError
from dp_ops.records.tracking import config_params, run_url
from dp_ops.studies.sweep import (
    Sweep,
    TrialObserver,
    counted_trials,
    dashboard_command,
    make_storage,
    replay_command,
    retried_trials,
    retry,
    run_note,
    save_note,
    tracked_runner,
)

from conftest import outputs_in

runner = CliRunner()
SPACE = {
    "omega": {"low": 0.05, "high": 0.5},
    "patience": {"low": 1, "high": 3},
    "round_size": {"low": 10, "high": 30, "step": 10},
    "static_sizes": [30, 50],
}


@pytest.fixture
def ws(tmp_path, tiny_generator, mlflow_uri, tiny_params):
    """params.yaml with tiny sections and the search space, a saved tiny generator, stores in tmp_path."""
    tiny_params(
        tmp_path,
        generator={"path": str(tmp_path / "gen")},
        tracking={"uri": mlflow_uri, "log_model": True},  # (a trial's run logs its model)
        output=outputs_in(tmp_path / "out"),
        sweep={**SPACE, "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "sampler_seed": 0},
    )
    tiny_generator.save(tmp_path / "gen")
    return tmp_path


def _worker(ws, tiny_generator, real, *overrides, strategy="dp", name="s"):
    tree = load_tree(ws / "params.yaml", list(overrides))
    worker = Sweep(build_config(tree), sweep_config(tree), strategy=strategy, study_name=name)
    return worker, tracked_runner(tiny_generator, real)


def _experiment_runs(ws, experiment):
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'experiment'")


@pytest.mark.slow
def test_three_trial_sweep_tracks_every_trial_and_rerun_continues_the_study(ws):
    args = ["sweep", "--params", str(ws / "params.yaml"), "--n-trials", "3", "--study-name", "s1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{ws / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert set(trials[0].params) == {"dp.omega", "dp.patience", "dp.round_size"}
    runs = {r.info.run_id: r for r in _experiment_runs(ws, "s1")}  # one experiment per study
    assert {t.user_attrs["dpops.mlflow_run_id"] for t in trials} == set(runs)
    for t in trials:
        run = runs[t.user_attrs["dpops.mlflow_run_id"]]
        assert run.data.tags["dpops.study"] == "s1" and run.data.tags["dpops.trial"] == str(t.number)
        assert float(run.data.params["dp.omega"]) == pytest.approx(t.params["dp.omega"])
        assert run.data.metrics["final_val_acc"] == pytest.approx(t.value)
    assert "replay the best: dpops run" in result.output and "dvc exp run -S" in result.output
    assert "this worker ran 3 trials; the study has 3/3 of its budget (raise --n-trials" in result.output
    assert f"study: optuna-dashboard sqlite:///{ws / 'optuna.db'}" in result.output

    # the printed replay command rebuilds the best trial's exact config
    best = study.best_trial
    overrides = [o for o in replay_command(best).split(" -S ")[1:]]
    replay = flatten(load_config(ws / "params.yaml", overrides))
    replay["train.micro_batches"] = replay["train.micro_batches"] or 1  # runs record 0 (one per process) resolved
    logged = config_params(runs[best.user_attrs["dpops.mlflow_run_id"]].data.params)  # (less generator_meta.*)
    assert {k: str(v) for k, v in replay.items() if not k.startswith("output.")} == {
        k: v for k, v in logged.items() if not k.startswith("output.")
    }

    again = runner.invoke(app, [*args[:-4], "--n-trials", "4", "--study-name", "s1"])
    assert again.exit_code == 0, again.output
    assert "this worker ran 1 trial; the study has 4/4" in again.output
    assert len(optuna.load_study(study_name="s1", storage=f"sqlite:///{ws / 'optuna.db'}").trials) == 4
    done = runner.invoke(app, [*args[:-4], "--n-trials", "4", "--study-name", "s1"])
    assert "this worker ran 0 trials" in done.output


class Boom(Observer):
    def on_round(self, record, round_parts):
        if record.round == 1:
            raise RuntimeError("disk full")


@pytest.mark.slow  # (end to end: whole tiny runs or a dpops process, seconds each)
def test_a_trial_that_raises_is_failed_and_the_sweep_goes_on(ws, tiny_generator, real):
    worker, run_trial = _worker(ws, tiny_generator, real, "sweep.n_trials=3")
    outcome = worker.run(run_trial, observers=lambda n: [Boom()] if n == 1 else [])
    states = [t.state for t in worker.study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    failed = worker.study.trials[1]
    assert failed.user_attrs["dpops.error"] == "RuntimeError: disk full"
    assert [o.state for o in outcome.ran] == ["COMPLETE", "FAIL", "COMPLETE"]
    run = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_run(failed.user_attrs["dpops.mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["dpops.trial"] == "1"


@pytest.mark.slow  # (end to end: whole tiny runs or a dpops process, seconds each)
def test_a_stale_running_trial_is_requeued_with_its_params(ws, tiny_generator, real):
    journal = f"sweep.storage={ws / 'sweep.journal'}"  # the lease is the journal's; RDB storage: Optuna's heartbeat
    worker, run_trial = _worker(ws, tiny_generator, real, "sweep.n_trials=2", "sweep.stale_after=0.5", journal)
    dead = worker.study.ask()  # a worker that died: RUNNING, and no heartbeat ever since
    omega, patience = dead.suggest_float("dp.omega", 0.05, 0.5, log=True), dead.suggest_int("dp.patience", 1, 3)
    dead.suggest_int("dp.round_size", 10, 30, step=10)
    time.sleep(0.6)
    worker.run(run_trial)
    trials = worker.study.get_trials()
    assert trials[0].state == TrialState.FAIL
    retry = next(t for t in trials if retried_trials(t) == [0])
    assert retry.state == TrialState.COMPLETE
    assert retry.params["dp.omega"] == pytest.approx(omega) and retry.params["dp.patience"] == patience
    assert len(counted_trials(trials)) == 2  # the dead trial's retry takes its place in the budget


def test_pruned_trial_is_pruned_in_optuna_and_killed_in_mlflow(ws, tiny_generator, real):
    worker, run_trial = _worker(ws, tiny_generator, real, "sweep.n_trials=1", "sweep.prune=true")
    worker.study.pruner = optuna.pruners.ThresholdPruner(lower=2.0)  # every accuracy is below: prune at once
    outcome = worker.run(run_trial)
    assert outcome.ran[0].state == "PRUNED"
    t = worker.study.trials[0]
    assert t.state == TrialState.PRUNED and t.intermediate_values  # reported per evaluation
    run = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_run(t.user_attrs["dpops.mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["dpops.pruned"] == "true"


def test_heartbeat_observer_reports_and_prunes():
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(lower=0.9))
    trial = study.ask()
    watch = TrialObserver(trial, beat_every=0.0, prune=True)
    first = study.trials[0].user_attrs["dpops.heartbeat"]
    watch.on_eval(10, 0.95)
    assert study.trials[0].user_attrs["dpops.heartbeat"] >= first
    with pytest.raises(optuna.TrialPruned):
        watch.on_eval(20, 0.5)


def test_observer_reports_every_evaluation_without_pruning_and_skips_steps_the_trial_holds():
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(lower=0.9))  # would prune 0.5
    trial = study.ask()
    watch = TrialObserver(trial, beat_every=None, prune=False, reported=[10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a step is reported twice
        for step, acc in [(10, 0.3), (20, 0.5), (30, 0.6), (30, 0.6)]:
            watch.on_eval(step, acc)
    assert study.trials[0].intermediate_values == {20: 0.5, 30: 0.6}  # 10 was the trial's already
    assert "dpops.heartbeat" not in study.trials[0].user_attrs  # RDB storage: Optuna's heartbeat thread


def _dashboard_get(app, path):
    """GET ``path`` from optuna-dashboard's WSGI app: what its browser page reads."""
    environ: dict = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (status, body[:300])
    return json.loads(body)


def _dashboard_study(storage, name):
    """The study as optuna-dashboard shows it, opened from the argument of the printed command."""
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    command = shlex.split(dashboard_command(storage))
    assert command[0] == "optuna-dashboard" and len(command) == 2
    app = optuna_dashboard.wsgi(command[1])
    (study_id,) = [
        s["study_id"] for s in _dashboard_get(app, "/api/studies")["study_summaries"] if s["study_name"] == name
    ]
    return _dashboard_get(app, f"/api/studies/{study_id}")


def test_optuna_views_name_the_metric_draw_every_trials_curve_and_link_its_mlflow_run(ws, tiny_generator, real):
    worker, run_trial = _worker(ws, tiny_generator, real, "sweep.n_trials=1")  # pruning off (the default)
    worker.run(run_trial)
    study = worker.study
    (t,) = study.get_trials()
    assert study.metric_names == ["final_val_acc"]
    assert "value_final_val_acc" in study.trials_dataframe().columns  # not "value"
    run_id = t.user_attrs["dpops.mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    curve = {m.step: m.value for m in client.get_metric_history(run_id, "val_acc")}
    assert len(curve) > 1 and t.intermediate_values == pytest.approx(curve, abs=1e-6)  # step = iteration
    experiment_id = client.get_experiment_by_name("s").experiment_id
    url = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    assert t.user_attrs["dpops.mlflow_run_url"] == url
    assert client.get_run(run_id).data.tags["dpops.torch_threads"] == str(torch.get_num_threads())

    seen = _dashboard_study(worker.sc.storage, "s")
    assert seen["objective_names"] == ["final_val_acc"] and seen["has_intermediate_values"]
    (shown,) = seen["trials"]
    assert {v["step"] for v in shown["intermediate_values"]} == set(curve)
    assert {"key": "dpops.mlflow_run_url", "value": url} in shown["user_attrs"]
    assert f"MLflow run [{run_id}]({url})" in shown["note"]["body"]  # a link, in the trial's note

    again, _ = _worker(ws, tiny_generator, real, "sweep.n_trials=1")  # a second worker of the same study
    assert again.study.metric_names == ["final_val_acc"]


def test_a_study_made_before_metric_names_gets_them_and_a_journal_opens_in_the_dashboard(ws):
    journal = ws / "old.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    old = optuna.create_study(study_name="old", storage=storage, directions=["maximize", "minimize"])
    for key, value in {"dpops.strategy": "dp", "dpops.objective": ["final_val_acc", "generated_samples"]}.items():
        old.set_user_attr(key, value)
    old.set_user_attr("dpops.ready", True)
    assert old.metric_names is None
    worker, _ = _worker(ws, None, None, f"sweep.storage={journal}", "sweep.objective=pareto", name="old")
    assert worker.study.metric_names == ["final_val_acc", "generated_samples"]
    assert _dashboard_study(str(journal), "old")["objective_names"] == ["final_val_acc", "generated_samples"]


def test_a_trials_note_links_its_mlflow_run_under_the_stores_own_url_as_optuna_dashboard_reads_it():
    """The trial's MLflow page is a Markdown link in the trial's note (not a plain-text attribute assuming
    port 5000): the server's own URL, or for a database the `mlflow ui` command and its default
    address, named as such."""
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    page = "#/experiments/3/runs/ab12?workflowType=machine_learning"
    assert run_note("https://mlflow.example.org/", "3", "ab12") == (
        f"MLflow run [ab12](https://mlflow.example.org/{page}) on the tracking server https://mlflow.example.org/"
    )
    local = run_note("sqlite:///mlflow.db", "3", "ab12")
    assert local.startswith(f"MLflow run [ab12](http://127.0.0.1:5000/{page}), once the store is served: ")
    assert "`mlflow ui --backend-store-uri sqlite:///mlflow.db` (the link assumes its default address" in local
    assert run_note("databricks", "3", "ab12") == "MLflow run `ab12` in experiment 3 at `databricks`"

    study = optuna.create_study(study_name="s")
    study.optimize(lambda t: 0.0, n_trials=2)  # (trial 1: its note must stay apart from trial 0's)
    trial = optuna.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, 0))
    long = "x" * 5000  # (longer than one of the dashboard's attributes)
    save_note(trial, long)
    assert optuna_dashboard.get_note(trial) == long
    save_note(trial, local)  # a second note replaces the first, every chunk of it
    assert optuna_dashboard.get_note(trial) == local
    other = optuna.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, 1))
    assert optuna_dashboard.get_note(other) == ""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert attrs[f"dashboard:{trial._trial_id}:note_ver"] == 2  # (the dashboard edits a note by its version)


def test_run_url_on_a_server_a_database_and_databricks():
    assert run_url("https://mlflow.example.org/", "3", "ab12") == (
        "https://mlflow.example.org/#/experiments/3/runs/ab12?workflowType=machine_learning"
    )
    assert (
        run_url("http://10.0.0.5:5000/prefix", "0")
        == "http://10.0.0.5:5000/prefix/#/experiments/0?workflowType=machine_learning"
    )
    db = "http://127.0.0.1:5000/#/experiments/7/runs/r?workflowType=machine_learning"  # `mlflow ui`'s default address
    assert run_url("sqlite:////tmp/mlflow.db", "7", "r") == db
    assert run_url("postgresql+psycopg://u@h/db", "7", "r") == db
    assert run_url("databricks", "7", "r") is None
    assert dashboard_command("my sweeps/sweep.journal") == "optuna-dashboard 'my sweeps/sweep.journal'"


@pytest.mark.slow  # (end to end: whole tiny runs or a dpops process, seconds each)
def test_static_grid_runs_each_size_once_and_pareto_objective_has_two_values(ws, tiny_generator, real):
    grid, run_trial = _worker(ws, tiny_generator, real, strategy="static", name="g")
    grid.run(run_trial)
    sizes = sorted(t.params["dp.initial_size"] for t in grid.study.trials)
    assert sizes == [30, 50] and all(t.state == TrialState.COMPLETE for t in grid.study.trials)
    assert {r.data.tags["dpops.strategy"] for r in _experiment_runs(ws, "g")} == {"static"}

    pareto, run_trial = _worker(ws, tiny_generator, real, "sweep.n_trials=2", "sweep.objective=pareto", name="p")
    outcome = pareto.run(run_trial)
    assert all(len(o.values) == 2 for o in outcome.ran) and outcome.best
    assert [d.name for d in pareto.study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert pareto.study.metric_names == ["final_val_acc", "generated_samples"]
    assert grid.study.metric_names == ["final_val_acc"]
    assert all(t.intermediate_values for t in grid.study.trials)
    # Optuna keeps no intermediate values for a multi-objective trial (Trial.report refuses them)
    assert not any(t.intermediate_values for t in pareto.study.trials)


def test_bad_sweep_input_fails_in_one_line_before_work(ws):
    base = ["sweep", "--params", str(ws / "params.yaml")]
    cases = {
        ("-S", "sweep.objective=pareto", "-S", "sweep.prune=true"): "sweep.prune=true needs sweep.objective=accuracy",
        ("--storage", f"sqlite:///{ws / 'mlflow.db'}"): "is MLflow's database",
        ("-S", "sweep.omega.low=2", "-S", "sweep.omega.high=1"): "low=2 must be <= high=1",
    }
    for args, message in cases.items():
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 1 and message in result.output, result.output
    result = runner.invoke(app, [*base, "--strategy", "random"])  # a choice: Typer names the allowed values
    said = " ".join(result.output.replace("│", " ").split())  # (rich wraps the error box at the terminal's width)
    assert result.exit_code == 2 and "--strategy': Value error, 'random' is not one of 'dp', 'static'" in said, said
    with pytest.raises(ConfigError, match="--strategy random: allowed dp"):  # (the library checks it too)
        _worker(ws, None, None, strategy="random")
    _worker(ws, None, None, strategy="static", name="s")
    with pytest.raises(ConfigError, match="study s holds the grid"):
        _worker(ws, None, None, "sweep.static_sizes=[10,20]", strategy="static", name="s")


@pytest.mark.slow
def test_two_workers_on_one_journal_file_share_a_four_trial_budget(ws):
    journal = ws / "sweep.journal"
    MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").search_experiments()  # create the MLflow store first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1", "COLUMNS": "200"}
    cmd = [
        sys.executable,
        "-m",
        "dp_ops",
        "sweep",
        "--params",
        str(ws / "params.yaml"),
        "--storage",
        str(journal),
        "--n-trials",
        "4",
        "--study-name",
        "shared",
        "-S",
        "sweep.sampler_seed=null",
        "-S",
        "train.iterations=100",
    ]
    workers = [
        subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(outputs)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and len(counted_trials(trials)) == 4
    assert all(t.user_attrs.get("dpops.over_budget") for t in trials if t.state != TrialState.COMPLETE)
    run_ids = [t.user_attrs["dpops.mlflow_run_id"] for t in complete]
    assert len(set(run_ids)) == 4
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4  # no duplicated configuration
    assert sorted(r.info.run_id for r in _experiment_runs(ws, "shared")) == sorted(run_ids)
    ran = [int(o.split("this worker ran ")[1].split(" ")[0]) for o in outputs]
    assert sum(ran) == 4, outputs


@pytest.mark.slow
def test_worker_killed_mid_trial_is_requeued_and_the_retry_resumes_its_mlflow_run(ws):
    MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").search_experiments()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "dp_ops",
        "sweep",
        "--params",
        str(ws / "params.yaml"),
        "--n-trials",
        "1",
        "--study-name",
        "k",
        "-S",
        "train.iterations=160",
        "-S",
        "dp.max_rounds=4",
    ]
    victim = subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while (
        not list((ws / "out" / "checkpoints").glob("*/state.pt")) and victim.poll() is None and time.time() < deadline
    ):
        time.sleep(0.05)
    assert victim.poll() is None, "the trial finished before it could be killed: " + victim.stdout.read()
    victim.kill()  # SIGKILL: no handler runs, the trial stays RUNNING in Optuna and in MLflow
    victim.wait(timeout=60)
    (killed_run,) = list((ws / "out" / "checkpoints").iterdir())
    time.sleep(4.1)  # Optuna's heartbeat on SQLite: stale after 3 s (its minimum), timestamps in whole seconds

    again = runner.invoke(app, [*cmd[3:], "-S", "sweep.stale_after=3"])
    assert again.exit_code == 0, again.output
    trials = optuna.load_study(study_name="k", storage=f"sqlite:///{ws / 'optuna.db'}").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], (again.output, trials[-1].user_attrs)
    assert retried_trials(trials[1]) == [0] and trials[1].params == trials[0].params
    assert trials[1].user_attrs["dpops.mlflow_run_id"] == killed_run.name  # resumed, not started over
    # the retry's curve (inherited, then continued by the resumed run) is the run's whole validation curve
    curve = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_metric_history(killed_run.name, "val_acc")
    assert trials[1].intermediate_values == pytest.approx({m.step: m.value for m in curve}, abs=1e-6)
    run = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_run(killed_run.name)
    assert run.info.status == "FINISHED" and run.data.tags["dpops.trial"] == "1"


def test_a_study_another_worker_is_still_setting_up_is_waited_for(ws):
    from dp_ops.studies.sweep.study import _wait_until_ready

    storage = f"sqlite:///{ws / 'optuna.db'}"
    study = optuna.create_study(study_name="half", storage=storage)  # created, not yet described
    with pytest.raises(ConfigError, match="never fully set up"):
        _wait_until_ready(study, "half", timeout=0.3)
    study.set_user_attr("dpops.ready", True)
    _wait_until_ready(study, "half", timeout=0.3)


class Interrupt(Observer):
    """Ctrl-C in the middle of the trial's second round (its first is checkpointed)."""

    def on_round(self, record, round_parts):
        if record.round == 1:
            raise KeyboardInterrupt


@pytest.mark.slow  # (end to end: whole tiny runs or a dpops process, seconds each)
def test_ctrl_c_on_rdb_storage_retries_the_trial_with_optunas_callback_and_the_retry_resumes_its_run(
    ws, tiny_generator, real
):
    worker, run_trial = _worker(
        ws, tiny_generator, real, "sweep.n_trials=1", "sweep.patience.high=1", "dp.max_rounds=2"
    )
    with pytest.raises(KeyboardInterrupt):
        worker.run(run_trial, observers=lambda n: [Interrupt()] if n == 0 else [])
    trials = worker.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert retried_trials(trials[1]) == [0] and trials[1].params == trials[0].params
    killed = worker._run_of(0)
    assert MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_run(killed).info.status == "KILLED"
    assert trials[0].intermediate_values and trials[1].intermediate_values == trials[0].intermediate_values

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is already reported")  # the resume evaluates them again
        outcome = worker.run(run_trial)
    trials = worker.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    curve = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_metric_history(killed, "val_acc")
    assert trials[1].intermediate_values == pytest.approx({m.step: m.value for m in curve}, abs=1e-6)
    assert outcome.ran[0].number == 1 and outcome.ran[0].mlflow_run_id == killed  # resumed, not started over
    assert len(counted_trials(trials)) == outcome.counted == 1  # the retry took the killed trial's place


def test_a_chain_of_retries_counts_once_against_the_budget():
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    killed = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(killed, state=TrialState.FAIL)
    retry(study, study.trials[1])
    again = study.ask()  # the retry, killed too
    study.tell(again, state=TrialState.FAIL)
    retry(study, study.trials[2])
    last = study.ask()
    study.tell(last, 0.5)
    trials = study.get_trials()
    assert retried_trials(trials[3]) == [1, 2] and trials[3].params == trials[1].params
    assert [t.number for t in counted_trials(trials)] == [0, 3]


def test_an_rdb_storage_that_cannot_be_opened_is_one_line_naming_it():
    url = "postgresql+psycopg://nobody@127.0.0.1:1/optuna"  # port 1: nothing listens
    with pytest.raises(ConfigError, match=r"^sweep.storage='postgresql\+psycopg://nobody@127.0.0.1:1/optuna': cannot"):
        make_storage(url)


@pytest.mark.slow  # (end to end: whole tiny runs or a dpops process, seconds each)
def test_resuming_a_sweep_trials_run_by_hand_is_refused_and_the_sweeps_retry_resumes_it(ws, tiny_generator, real):
    """The study owns its trials' runs: a hand `dpops run --resume` of one would finish it, and the study's
    retry would then resume it again and log a second model while the trial stays FAIL. It is refused in
    one line naming the study; the retry resumes the run and records its result."""
    worker, run_trial = _worker(
        ws, tiny_generator, real, "sweep.n_trials=1", "sweep.patience.high=1", "dp.max_rounds=2"
    )
    with pytest.raises(KeyboardInterrupt):
        worker.run(run_trial, observers=lambda n: [Interrupt()] if n == 0 else [])
    killed = worker._run_of(0)

    got = runner.invoke(app, ["run", "--params", str(ws / "params.yaml"), "--resume", killed])
    assert got.exit_code == 1
    assert got.output.strip().splitlines() == [
        f"error: --resume {killed}: trial 0 of sweep study 's' owns this run; a worker of that study retries the "
        "trial and resumes the run, recording its result: dpops sweep --study-name s (with the study's --storage)"
    ]
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    assert client.get_run(killed).info.status == "KILLED"  # untouched

    outcome = worker.run(run_trial)
    assert outcome.ran[0].mlflow_run_id == killed and outcome.ran[0].state == "COMPLETE"
    experiment = client.get_experiment_by_name(worker.experiment).experiment_id
    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{killed}'")
    assert len(models) == 1
