"""Where teams lose work in DVC, with the real tools: a real DVC experiment queue worked off by
`dvc queue start`, a real MLflow store, a git clone that pulls from a real DVC remote."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from dp_ops.config import build_config

from conftest import tiny_tree

DVC = [sys.executable, "-m", "dvc"]
# One stage, as dvc.yaml's dp stage: the shards and reports are its outs (collected by DVC from wherever
# the stage ran), the checkpoints and the tracking store are not (they must outlive a temporary copy).
STAGE = {
    "stages": {
        "dp": {
            "cmd": "dpops run -S output.shards=data/dp -S output.metrics=results/metrics.json "
            "-S output.rounds=results/rounds.json -S output.curve=results/curve.json",
            "deps": ["models/generator"],
            "params": ["dp"],
            "outs": ["data/dp", {"results/rounds.json": {"cache": False}}, {"results/curve.json": {"cache": False}}],
            "metrics": [{"results/metrics.json": {"cache": False}}],
        }
    }
}
# The smallest run that versions a round: round 0 (40 samples), one evaluation, and the budget is spent.
SMALL = {"dp": {"max_rounds": 1}, "train": {"iterations": 10, "eval_every": 10}}


def _run(args, cwd, env, timeout=600):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
    return out.stdout + out.stderr


@pytest.fixture
def team_workspace(dvc_workspace):
    """A committed git + DVC workspace with the one-stage pipeline, the tiny generator DVC-tracked (a
    temporary copy and a clone get it from the cache or remote) and the default MLflow store."""
    ws, env = dvc_workspace(**SMALL)  # (the store: sqlite:///mlflow.db in the workspace, untracked as a user's is)
    (ws / "dvc.yaml").write_text(yaml.safe_dump(STAGE, sort_keys=False))
    (ws / ".gitignore").write_text("/mlflow.db\n/mlartifacts\n/checkpoints\n/restored\n")
    _run([*DVC, "add", "-q", "models/generator"], ws, env)
    _run(["git", "add", "-A"], ws, env)
    _run(["git", "commit", "-qm", "pipeline"], ws, env)
    return ws, env


def _parents(ws):
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dp-ops")
    runs = [] if exp is None else client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'experiment'")
    return client, runs


@pytest.mark.slow
def test_queued_experiments_keep_their_runs_rounds_and_data_in_the_workspace(team_workspace):
    """`dvc exp run --queue` + `dvc queue start`: each experiment runs in a temporary copy that DVC deletes;
    the default `sqlite:///mlflow.db`, its artifacts and the checkpoints are the workspace's all the same,
    and `dpops data restore` rebuilds each run's rounds from what DVC collected."""
    ws, env = team_workspace
    for omega in ("0.1", "0.2"):
        _run([*DVC, "exp", "run", "--queue", "-S", f"dp.omega={omega}"], ws, env)
    _run([*DVC, "queue", "start", "-j", "1"], ws, env)
    deadline = time.monotonic() + 600
    while True:  # (the worker runs detached: its queue is done when nothing is queued or running)
        status = _run([*DVC, "queue", "status"], ws, env)
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert status.count("Success") == 2, status + _run([*DVC, "queue", "logs", "-h"], ws, env)
    assert not any((ws / ".dvc" / "tmp" / "exps").glob("tmp*"))  # the copies are gone

    client, parents = _parents(ws)
    assert sorted(r.data.params["dp.omega"] for r in parents) == ["0.1", "0.2"]
    for parent in parents:
        assert parent.info.status == "FINISHED"
        assert parent.info.artifact_uri.startswith((ws / "mlartifacts").as_uri())  # not in the deleted copy
        run_id = parent.info.run_id
        rounds = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
        assert [r.data.tags["dpops.round"] for r in rounds] == ["0"]
        assert (ws / "checkpoints" / run_id / "state.pt").is_file()
        restored = _run(["dpops", "data", "restore", run_id], ws, env)
        assert "md5 verified" in restored
        assert sorted(p.parent.name for p in (ws / "restored" / run_id).rglob("part_*")) == ["round_000"]


@pytest.mark.slow
def test_a_colleagues_clone_pulls_restores_and_reruns_once_the_printed_push_is_done(team_workspace, tmp_path):
    """`dvc repro` made the generator's and the stage's outputs in the local cache only: a clone's `dvc pull`
    fails until they are pushed. The stage says so (as the run summary says what to commit); done as
    printed, a clone pulls them, restores the run's rounds from MLflow's md5s and reruns, its own run pushed
    round by round to the default remote."""
    ws, env = team_workspace
    _run([*DVC, "remote", "add", "-d", "team", str(tmp_path / "remote")], ws, env)
    made = _run([*DVC, "repro"], ws, env)
    assert "to share this stage's outputs: dvc push once DVC has finished (a clone's dvc pull needs them)" in made
    _run(["git", "add", "-A"], ws, env)
    _run(["git", "commit", "-qm", "run"], ws, env)
    _run(["git", "clone", "-q", str(ws), "clone"], tmp_path, env)
    clone = tmp_path / "clone"
    unpushed = subprocess.run([*DVC, "pull"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert unpushed.returncode == 1  # (nothing was pushed)

    _run([*DVC, "push"], ws, env)  # what the stage said
    _run([*DVC, "pull"], clone, env)
    assert (clone / "models" / "generator").is_dir() and any((clone / "data" / "dp").rglob("part_*"))
    store = f"tracking.uri=sqlite:///{ws / 'mlflow.db'}"  # (the team's store; a server in real life)
    run_id = json.loads((ws / "results" / "rounds.json").read_text())["run_id"]
    restored = _run(["dpops", "data", "restore", run_id, "-S", store], clone, env)
    assert "md5 verified" in restored

    rerun = _run(["dpops", "run", "-S", store, "-S", "dp.omega=0.2"], clone, env)
    assert "to share" not in rerun  # (every round was pushed as it was made)
    (dvc_file,) = (clone / "data" / "runs").glob("*.dvc")
    synced = _run([*DVC, "status", "--cloud", str(dvc_file)], clone, env)
    assert "Cache and remote 'team' are in sync" in synced


def _in_copy(tmp_path, monkeypatch):
    """This process as DVC runs a stage of a queued experiment: in a copy under the workspace's
    .dvc/tmp/exps/, in its subfolder `sub`, with DVC_ROOT naming the workspace."""
    ws = tmp_path / "ws"
    copy = ws / ".dvc" / "tmp" / "exps" / "tmpabc"
    (copy / ".dvc").mkdir(parents=True)
    (copy / "sub").mkdir()
    monkeypatch.chdir(copy / "sub")
    monkeypatch.setenv("DVC_ROOT", str(ws))
    monkeypatch.setenv("DVC_STAGE", "dp")
    return ws, copy


def test_in_an_experiments_copy_what_must_outlive_it_resolves_to_the_workspace(tmp_path, monkeypatch):
    from dp_ops.files import experiment_copy, workspace_path, workspace_storage, workspace_uri
    from dp_ops.runner import outliving_copy

    ws, copy = _in_copy(tmp_path, monkeypatch)
    assert experiment_copy() == (copy.resolve(), ws)
    assert workspace_path("checkpoints") == ws / "sub" / "checkpoints"
    assert workspace_path("/abs/x") == Path("/abs/x")
    assert workspace_uri("sqlite:///mlflow.db") == f"sqlite:///{ws / 'sub' / 'mlflow.db'}"
    assert workspace_uri("sqlite:///db/optuna.db?timeout=5") == f"sqlite:///{ws / 'sub' / 'db' / 'optuna.db'}?timeout=5"
    assert workspace_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert workspace_uri("http://host:5000") == "http://host:5000"
    assert workspace_storage("sqlite:///optuna.db") == f"sqlite:///{ws / 'sub' / 'optuna.db'}"
    assert workspace_storage("studies/journal.log") == str(ws / "sub" / "studies" / "journal.log")
    assert workspace_storage("postgresql://db/optuna") == "postgresql://db/optuna"
    cfg = outliving_copy(build_config(tiny_tree()))
    assert cfg.output.checkpoints == str(ws / "sub" / "checkpoints")
    assert (cfg.output.shards, cfg.output.metrics) == ("data/runs", "metrics.json")  # (stage outs: DVC collects them)


@pytest.mark.parametrize("env", [{}, {"DVC_STAGE": "dp"}, {"DVC_STAGE": "dp", "DVC_ROOT": "."}])
def test_outside_an_experiments_copy_paths_stay_as_given(tmp_path, monkeypatch, env):
    from dp_ops.files import experiment_copy, workspace_path, workspace_uri

    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    for key, value in env.items():  # (dvc repro and a workspace `dvc exp run`: DVC_ROOT is the workspace)
        monkeypatch.setenv(key, str(tmp_path) if value == "." else value)
    assert experiment_copy() is None
    assert workspace_path("checkpoints") == Path("checkpoints")
    assert workspace_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_in_an_experiments_copy_parts_no_stage_out_keeps_are_refused_before_any_work(tmp_path, monkeypatch):
    from dp_ops.errors import ConfigError
    from dp_ops.records.versioning import check_kept_by_stage

    _, copy = _in_copy(tmp_path, monkeypatch)
    monkeypatch.chdir(copy)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)  # (DVC's copy is a git repository)
    (copy / "dvc.yaml").write_text(yaml.safe_dump(STAGE))
    check_kept_by_stage("data/dp")  # (the stage's out: DVC collects it into the experiment)
    check_kept_by_stage("data/dp/more")
    with pytest.raises(ConfigError, match=r"^output.shards='data/runs': not among the outs of DVC stage 'dp', "):
        check_kept_by_stage("data/runs")
    monkeypatch.setenv("DVC_ROOT", str(copy))  # (dvc repro, a workspace `dvc exp run`: the folder stays)
    check_kept_by_stage("data/runs")
