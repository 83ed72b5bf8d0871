"""`dvc repro` of the real dvc.yaml in a temporary git + DVC workspace, on a tiny params file."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from dp_ops.config import build_config, to_tree
from dp_ops.records.versioning import cache_path

from conftest import tiny_tree

REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_and_a_second_repro_does_nothing(tmp_path, mlflow_store):
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    shutil.copytree(REPO / "dp_ops", ws / "dp_ops", ignore=shutil.ignore_patterns("__pycache__"))
    tree = to_tree(build_config(tiny_tree(dp={"max_rounds": 1})))  # DVC needs every declared param present
    tree["sweep"] = {"static_sizes": [20, 40, 60, 80]}
    (ws / "params.yaml").write_text(yaml.safe_dump(tree))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_store(ws)  # the default store, sqlite:///mlflow.db in the workspace, already migrated
    _run(["git", "init", "-q"], ws, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], ws, env)

    first = _run([sys.executable, "-m", "dvc", "repro"], ws, env)
    for stage in ("generator", "dp", "static@20", "static@80", "scaling"):
        assert f"Running stage '{stage}'" in first
    assert (ws / "models" / "generator" / "dpops_generator.json").is_file()
    assert (ws / "dvc.lock").is_file()
    rounds_dirs = sorted(p for p in (ws / "data" / "pipeline" / "dp").rglob("round_*") if p.is_dir())
    assert len(rounds_dirs) == 2 and all(list(d.glob("part_*.safetensors")) for d in rounds_dirs)  # round 0 + 1
    assert not list((ws / "data").rglob("*.dvc"))  # inside repro the stage outs version, not `dvc add`
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert lock["stages"]["dp"]["outs"][0]["path"] == "data/pipeline/dp"

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dp-ops")
    parents = client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'experiment'")
    assert sorted(r.data.tags["dpops.dvc_stage"] for r in parents) == [
        "dp",
        "static@20",
        "static@40",
        "static@60",
        "static@80",
    ]
    report = json.loads((ws / "results" / "scaling" / "scaling.json").read_text())
    assert report["fits"]["static"]["n_points"] == 4 and "data_multiplier_points" in report["headline"]
    assert (ws / "results" / "scaling" / "scaling.png").is_file()
    (scaling_run,) = client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'scaling'")
    assert scaling_run.data.params["metrics_files"] == "results/dp/metrics.json,results/static"
    assert all(r.info.status == "FINISHED" for r in parents)
    rounds = client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'round'")
    assert {r.data.tags["dpops.shard_versioned_by"] for r in rounds} == {"dvc stage outs"}
    for r in rounds:  # the stage outs put every part in the cache, so restore works from MLflow alone
        listing = json.loads(Path(client.download_artifacts(r.info.run_id, "parts.json", str(ws / ".."))).read_text())
        assert all(cache_path(ws, e["md5"]).is_file() for e in listing)

    lock_before, runs_before = (ws / "dvc.lock").read_text(), len(client.search_runs([exp.experiment_id]))
    second = _run([sys.executable, "-m", "dvc", "repro"], ws, env)
    assert "Running stage" not in second
    assert "up to date" in second
    assert (ws / "dvc.lock").read_text() == lock_before  # nothing re-recorded ...
    assert len(client.search_runs([exp.experiment_id])) == runs_before  # ... and nothing re-run or re-tracked
