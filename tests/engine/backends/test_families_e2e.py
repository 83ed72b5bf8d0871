"""``dpops run`` end to end for every pipeline family through ``generator.backend=diffusers``: a tiny random
pipeline saved with ``save_pretrained``, folder data, rounds versioned by DVC and logged to MLflow, a run stopped
after its first round (Ctrl-C) and resumed to the end as the same MLflow run, its data restorable."""

import importlib
import json
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from dp_ops.cli import app
from dp_ops.generators import BACKENDS
from dp_ops.records.checkpoint import Checkpointer
from dp_ops.records.tracking import round_runs
from dp_ops.records.versioning import md5_file
from dp_ops.resume import restore_run_data

from conftest import FOLDER_CLASSES, make_image_folder

# family -> keys its tiny pipeline needs beyond the shared tree
FAMILIES = {"sd": {}, "sdxl": {}, "dit": {"data": {"class_ids": [1, 2, 3]}}, "sd3": {}}


def test_every_pipeline_family_runs_end_to_end_here():
    assert set(FAMILIES) == {name for name, b in BACKENDS.items() if b.pretrained}


def _tree(tmp_path, family: str, model) -> dict:
    make_image_folder(tmp_path / "images" / "val", per_class=6)
    make_image_folder(tmp_path / "images" / "test", per_class=4, seed=1)
    extra = FAMILIES[family]
    return {
        "seed": 0,
        "device": "cpu",
        "data": {
            "name": "folder",
            "val_root": str(tmp_path / "images" / "val"),
            "test_root": str(tmp_path / "images" / "test"),
            "resolution": 16,
            "shard_resolution": 16,
            "part_size": 12,
            **extra.get("data", {}),
        },
        "generator": {"backend": "diffusers", "model": str(model), "steps": 2, "guide_every": 1, "batch_size": 12},
        "dp": {"initial_size": 24, "round_size": 12, "patience": 1, "incremental_patience": False, "max_rounds": 2},
        "learner": {"model": "dpops_convnet_tiny", "drop_rate": 0.0},
        "train": {"iterations": 40, "eval_every": 10, "batch_size": 8},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "output": {
            "metrics": "out/metrics.json",
            "rounds": "out/rounds.json",
            "curve": "out/curve.json",
            "shards": "data/runs",
            "checkpoints": "out/checkpoints",
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_dpops_run_through_the_diffusers_backend_stops_resumes_and_restores(
    family, tmp_path, monkeypatch, mlflow_store
):
    module = importlib.import_module(BACKENDS[family].adapter.split(":")[0] + "_random")
    model = module.save_pipeline(module.random_components("tiny", seed=0), tmp_path / f"tiny-{family}")
    mlflow_store(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=ws, check=True)
    monkeypatch.chdir(ws)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    tree = _tree(tmp_path, family, model)
    (ws / "params.yaml").write_text(yaml.safe_dump(tree))

    saved = Checkpointer.on_checkpoint
    calls = []

    def stop_after_round_0(self, state):  # Ctrl-C right after round 0 is checkpointed
        saved(self, state)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "on_checkpoint", stop_after_round_0)
    stopped = CliRunner().invoke(app, ["run"])
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.setattr(Checkpointer, "on_checkpoint", saved)
    client = MlflowClient(tree["tracking"]["uri"])
    experiment_id = client.get_experiment_by_name("dp-ops").experiment_id
    (run,) = client.search_runs([experiment_id], "tags.`dpops.role` = 'experiment'")
    assert run.info.status == "KILLED"

    resumed = CliRunner().invoke(app, ["run", "--resume", run.info.run_id])
    assert resumed.exit_code == 0, resumed.output
    (run,) = client.search_runs([experiment_id], "tags.`dpops.role` = 'experiment'")  # one run: the same one
    assert run.info.status == "FINISHED" and run.data.params["generator.backend"] == "diffusers"
    assert run.data.params["generator_meta.family"] == family
    rounds = json.loads((ws / "out" / "rounds.json").read_text())["rounds"]
    assert len(rounds) >= 2 and len(round_runs(client, run.info.run_id)) == len(rounds)  # none twice
    labels = {r["round"]: r["n_new"] for r in rounds}
    assert labels[0] == 24 and all(n == 12 for k, n in labels.items() if k > 0)
    restored = restore_run_data(run.info.run_id, tmp_path / "restored", tracking_uri=tree["tracking"]["uri"])
    originals = sorted((ws / "data" / "runs").rglob("part_*.safetensors"))
    assert [md5_file(p) for p in restored] == [md5_file(p) for p in originals] and len(originals) >= 2
    assert len(FOLDER_CLASSES) == 3
