"""What a tracked run leaves in MLflow for a user: the final classifier as a logged (and registered) model,
the run described (standard tags, the generator it loaded, its real inputs, its config), round runs with
their real times and pictures on the parent. Real MLflow on a temporary SQLite store, a real git + DVC
workspace, a real tiny generator saved to disk."""

import sys
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from dp_ops import __version__
from dp_ops.config import build_config, flatten, from_flat
from dp_ops.engine.backends.pixel import PixelDiffusion
from dp_ops.engine.data import from_uint8
from dp_ops.engine.learner import build_learner
from dp_ops.records.checkpoint import checkpoint_path, load_checkpoint
from dp_ops.records.plots import save_sample_grid
from dp_ops.records.tracking import EXPERIMENT_KIND, KIND_TAG, NOTE_TAG, config_params, round_runs
from dp_ops.runner import run_tracked

from conftest import tiny_tree

BF16 = {"train_precision": "bfloat16"}  # (recorded as if trained so: a run's params say what the generator was)


@pytest.fixture
def saved_generator(tmp_path, tiny_generator):
    """The tiny generator (trained for 30 iterations) saved with a quality figure, as a cached one is."""
    g = PixelDiffusion(
        tiny_generator.unet,
        tiny_generator.scheduler,
        replace(tiny_generator.meta, quality={"judge": 0.5}, training=tiny_generator.meta.training | BF16),
    )
    g.save(tmp_path / "generator")
    return tmp_path / "generator"


def _cfg(uri, generator_path, tracking=None, **sections):
    # the config says 999 generator iterations; the generator on disk was trained for 30
    generator = {"path": str(generator_path), "train_iterations": 999}
    tracking = {"uri": uri, "experiment": "t", "log_model": True, **(tracking or {})}
    return build_config(tiny_tree(tracking=tracking, generator=generator, **sections))


@pytest.mark.slow  # (end to end: whole tiny runs or a dpops process, seconds each)
def test_a_static_run_logs_and_registers_the_classifier_that_scored_final_test_acc(
    dvc_workspace, saved_generator, tiny_generator, real, mlflow_store, capfd
):
    workspace = dvc_workspace(with_generator=False, here=True).path
    cfg = _cfg(mlflow_store(workspace), saved_generator, dp={"strategy": "static"}, tracking={"register_model": "dg"})
    run = run_tracked(cfg, tiny_generator, real)
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(run.run_id)
    final_test_acc = parent.data.metrics["final_test_acc"]
    assert final_test_acc == run.result.summary.final_test_acc

    # the logged model, reloaded as a user would, scores the held-out test split exactly as the run did
    mlflow.set_tracking_uri(cfg.tracking.uri)
    try:
        model = mlflow.pytorch.load_model(f"runs:/{run.run_id}/model")
        again = mlflow.pytorch.load_model(run.model.uri)
        metadata = mlflow.models.get_model_info(run.model.uri).metadata
    finally:
        mlflow.set_tracking_uri(None)
    for loaded in (model, again):
        with torch.no_grad():
            size = cfg.train.eval_batch_size
            logits = torch.cat(
                [loaded(from_uint8(real.test.images[i : i + size])) for i in range(0, len(real.test), size)]
            )
        correct = int((logits.argmax(-1) == real.test.labels).sum())
        assert correct / len(real.test) == final_test_acc
    # what a user needs to feed it and read its logits
    assert metadata == {"classes": list(real.class_names), "input_range": [-1.0, 1.0], "input_dtype": "float32"}
    logged = client.get_logged_model(run.model.model_id)
    assert logged.source_run_id == run.run_id and logged.name == "model" and logged.status.to_int() == 2  # READY
    assert logged.tags["mlflow.user"] == parent.data.tags["mlflow.user"]  # (the UI's "Created by")
    # linked to the summary only (not to what else the run logged at some step: round 0's curve, system metrics),
    # at the step it was measured at, the accuracies to the real split they were measured on
    summary = run.result.summary.to_dict()
    del summary["strategy"]
    assert {m.key: m.value for m in logged.metrics} == pytest.approx(summary)
    assert {m.step for m in logged.metrics} == {cfg.train.iterations}
    splits = {i.tags[0].value: i.dataset for i in parent.inputs.dataset_inputs}
    on = {m.key: (m.dataset_name, m.dataset_digest) for m in logged.metrics}
    assert (
        on["final_test_acc"] == (splits["test"].name, splits["test"].digest) == ("digits-test", splits["test"].digest)
    )
    assert on["final_val_acc"] == on["best_val_acc"] == (splits["validation"].name, splits["validation"].digest)
    assert on["pool_size"] == (None, None)
    assert [m.step for m in client.get_metric_history(run.run_id, "final_test_acc")] == [cfg.train.iterations]  # once
    assert [(o.model_id, o.step) for o in parent.outputs.model_outputs] == [(run.model.model_id, cfg.train.iterations)]
    version = client.get_model_version("dg", run.model.version)
    assert version.source == run.model.uri and version.run_id == run.run_id and run.model.registered_name == "dg"

    # the checkpoint holds the final learner too (a static run has one round: it used to hold iteration 0)
    state = load_checkpoint(checkpoint_path(cfg.output.checkpoints, run.run_id))
    assert state["trainer"]["iteration"] == cfg.train.iterations
    learner = build_learner(cfg.learner, real.num_classes, 1, cfg.seed)
    learner.load_state_dict(state["trainer"]["model"])
    with torch.no_grad():
        assert torch.equal(learner.eval()(from_uint8(real.test.images[:8])), model(from_uint8(real.test.images[:8])))
    assert "Successfully registered" not in "".join(capfd.readouterr())  # (library code prints nothing)


def test_the_run_and_its_rounds_say_what_ran(
    dvc_workspace, saved_generator, tiny_generator, real, mlflow_store, monkeypatch
):
    workspace = dvc_workspace(with_generator=False, here=True).path
    monkeypatch.setattr(sys, "argv", ["/venv/bin/dpops", "run", "-S", "dp.max_rounds=1"])
    cfg = _cfg(mlflow_store(workspace), saved_generator, dp={"max_rounds": 1})
    run = run_tracked(cfg, tiny_generator, real)
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(run.run_id)
    tags, params = parent.data.tags, parent.data.params

    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags[KIND_TAG] == EXPERIMENT_KIND and exp.tags[NOTE_TAG]  # the UI opens it for model training
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == "/venv/bin/dpops" and tags["dpops.version"] == __version__
    assert (
        tags["dpops.command"] == "dpops run -S dp.max_rounds=1" and "`dpops run -S dp.max_rounds=1`" in tags[NOTE_TAG]
    )

    # the generator that ran, not the config's idea of it
    assert params["generator.train_iterations"] == "30" and params["generator.channels"] == "[8, 16]"
    assert params["generator_meta.quality.judge"] == "0.5" and len(params["generator_meta.sha256"]) == 64
    assert params["generator.train_precision"] == "bfloat16"  # (the config said float32)
    assert from_flat(config_params(params)).generator.train_iterations == 30  # (what a resume rebuilds)
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config", "reports", "generator"} <= artifacts
    conf = yaml.safe_load(Path(client.download_artifacts(run.run_id, "config/params.yaml", str(workspace))).read_text())
    assert flatten(build_config(conf)) == flatten(from_flat(config_params(params)))  # the config that ran
    assert [a.path for a in client.list_artifacts(run.run_id, "generator")] == ["generator/dpops_generator.json"]

    # the real splits are the run's inputs, with contexts, schema and profile
    inputs = {i.tags[0].value: i.dataset for i in parent.inputs.dataset_inputs}
    assert set(inputs) == {"validation", "test"}
    assert inputs["test"].name == "digits-test" and f'"targets_shape": [{len(real.test)}]' in inputs["test"].profile
    assert "tensor" in inputs["validation"].schema

    # round runs span their generation, and their pictures are on the parent at step = round
    rounds = round_runs(client, run.run_id)
    assert len(rounds) == 2
    for child, record in zip(rounds, run.result.records, strict=True):
        assert child.info.end_time - child.info.start_time >= int(record.gen_seconds * 1000) - 1
        (shard,) = child.inputs.dataset_inputs
        assert f'"num_rows": {record.n_new}' in shard.dataset.profile and "uint8" in shard.dataset.schema
    assert "untrained learner" in rounds[0].data.tags[NOTE_TAG] and "ω=0.1" in rounds[1].data.tags[NOTE_TAG]
    images = [a.path for a in client.list_artifacts(run.run_id, "images")]
    for key in ("samples", "entropy"):  # images/<key>+step+<step>+timestamp+…(.png | +compressed.webp)
        steps = sorted(p.split("+")[2] for p in images if p.startswith(f"images/{key}+step+") and p.endswith(".png"))
        assert steps == ["0", "1"], images


def test_the_sample_grid_names_its_classes(tmp_path, tiny_generator):
    """Row labels: the grid is wider than its cells by a margin holding the class names."""
    from dp_ops.engine.rounds import Sampling, generate_round

    labels = torch.arange(20) % 10
    parts = generate_round(
        tiny_generator,
        labels,
        np.arange(20),
        tmp_path / "r",
        Sampling(2, 2.0, 1, 32, lambda x: torch.zeros(len(x), 10)),
        round_index=0,
        omega=0.0,
        part_size=32,
        fmt="raw",
    )
    save_sample_grid(parts, tmp_path / "plain.png", [str(k) for k in range(10)], per_class=2)
    save_sample_grid(parts, tmp_path / "named.png", [f"class number {k}" for k in range(10)], per_class=2)
    plain, named = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "named.png")
    assert plain.height == named.height == 10 * 9 * 3 and named.width > plain.width > 2 * 9 * 3
    ink = np.asarray(named)[:, : named.width - 2 * 9 * 3] < 128
    assert ink.any(axis=1).reshape(10, -1).any(axis=1).all()  # a label in every row


def test_a_dataset_another_run_adds_at_the_same_moment_is_linked_on_the_retry(mlflow_uri, tmp_path, monkeypatch):
    """MLflow's SQL store checks for a dataset, then inserts it: two sweep workers starting together race on the
    validation split's row. The loser is played here by letting the other run add it between the two steps."""
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput
    from mlflow.exceptions import MlflowException

    from dp_ops.records.tracking.runs import _log_inputs

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("race", artifact_location=(tmp_path / "a").as_uri())
    mine, theirs = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    datasets = [DatasetInput(from_numpy(np.zeros((3, 2)), name="digits-val")._to_mlflow_entity())]
    log_inputs, calls = client.log_inputs, []

    def lose_the_race_once(run_id, datasets=None, **kw):
        calls.append(run_id)
        if len(calls) == 1:
            log_inputs(theirs, datasets=datasets)  # the other worker inserts the row first
            raise MlflowException("UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest")
        return log_inputs(run_id, datasets=datasets, **kw)

    monkeypatch.setattr(client, "log_inputs", lose_the_race_once)
    _log_inputs(client, mine, datasets)
    assert calls == [mine, mine]
    for run_id in (mine, theirs):
        assert [i.dataset.name for i in client.get_run(run_id).inputs.dataset_inputs] == ["digits-val"]
