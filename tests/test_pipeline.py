"""`dvc repro` of the real dvc.yaml in a temporary git + DVC workspace, on a tiny params file."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from dp_ops.records.versioning import cache_path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = yaml.safe_load((REPO / "params.yaml").read_text())["sweep"]["static_sizes"]
PLOTS = ["validation accuracy (dp and static)", "dp pool size per round", "dp entropy of the new samples per round"]


def _run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_and_a_second_repro_does_nothing(dvc_workspace):
    sizes = [20, 40, 60, 80]
    # (the pipeline trains its own generator; DVC needs every declared param present: params.yaml is whole)
    ws, env = dvc_workspace(with_generator=False, dp={"max_rounds": 1}, sweep={"static_sizes": sizes})
    shutil.copytree(REPO / "dp_ops", ws / "dp_ops", ignore=shutil.ignore_patterns("__pycache__"))
    pipeline = (REPO / "dvc.yaml").read_text()
    for default, tiny in zip(DEFAULT_SIZES, sizes, strict=True):  # the plot's files
        pipeline = pipeline.replace(f"results/static/{default}/curve.json", f"results/static/{tiny}/curve.json")
    (ws / "dvc.yaml").write_text(pipeline)

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

    _check_metrics(ws, env)
    _check_plots(ws, env)

    lock_before, runs_before = (ws / "dvc.lock").read_text(), len(client.search_runs([exp.experiment_id]))
    second = _run([sys.executable, "-m", "dvc", "repro"], ws, env)
    assert "Running stage" not in second
    assert "up to date" in second
    assert (ws / "dvc.lock").read_text() == lock_before  # nothing re-recorded ...
    assert len(client.search_runs([exp.experiment_id])) == runs_before  # ... and nothing re-run or re-tracked


def _check_metrics(ws, env):
    """The pipeline's metrics are the dp stage's numbers only, so `dvc exp show` names them bare."""
    shown = json.loads(_stdout([sys.executable, "-m", "dvc", "metrics", "show", "--json"], ws, env))
    (metrics,) = shown.values()
    assert list(metrics["data"]) == ["results/dp/metrics.json"]
    values = metrics["data"]["results/dp/metrics.json"]["data"]
    assert "final_test_acc" in values and all(isinstance(v, int | float) for v in values.values())


def _stdout(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _check_plots(ws, env):
    """`dvc plots show --json` reads each plot from its own list: round k at its own iteration."""
    shown = json.loads(_stdout([sys.executable, "-m", "dvc", "plots", "show", "--json"], ws, env))
    rounds = json.loads((ws / "results" / "dp" / "rounds.json").read_text())
    assert rounds["strategy"] == "dp"  # (a string: in the run's header, not among the metrics)
    data = shown["data"]
    assert [p for p in PLOTS if p in data] == PLOTS
    values = data[PLOTS[0]][0]["content"]["data"]["values"]
    curve = json.loads((ws / "results" / "dp" / "curve.json").read_text())
    assert [(v["iteration"], v["val_acc"]) for v in values if v["filename"] == "dp/curve.json"] == [
        (c["iteration"], c["val_acc"]) for c in curve
    ]
    assert {v["filename"] for v in values} == {"dp/curve.json"} | {f"static/{n}/curve.json" for n in (20, 40, 60, 80)}
    pool = data[PLOTS[1]][0]["content"]["data"]["values"]
    records = rounds["rounds"]
    assert [(v["iteration"], v["pool_size"]) for v in pool] == [(r["iteration"], r["pool_size"]) for r in records]
    assert "val_acc" not in pool[0]  # (no curve point zipped into a round: round 1 at its own iteration)
    entropy = data[PLOTS[2]][0]["content"]["data"]["values"]
    assert [v["entropy_mean"] for v in entropy] == [r["entropy_mean"] for r in records]
    (image,) = data["results/scaling/scaling.png"]
    assert image["type"] == "image"
    assert "errors" not in shown  # (every declared plot is a file the pipeline writes)


def test_the_validation_plot_names_the_static_runs_of_params_yaml():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    plot = next(p for p in pipeline["plots"] if isinstance(p, dict) and PLOTS[0] in p)[PLOTS[0]]
    assert list(plot["y"]) == ["results/dp/curve.json"] + [f"results/static/{n}/curve.json" for n in DEFAULT_SIZES]
