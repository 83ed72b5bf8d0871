"""Real git + DVC workspace in a temporary directory, real MLflow on a temporary SQLite store."""

import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

from dp_ops.config import build_config
from dp_ops.errors import DataError
from dp_ops.records.tracking import round_runs
from dp_ops.records.versioning import cache_path, md5_file, read_shard
from dp_ops.runner import restore_run_data, run_tracked

from conftest import tiny_tree


def load_file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return fh.metadata()


def _sh(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    _sh("git", "init", "-q", cwd=ws)
    _sh(sys.executable, "-m", "dvc", "init", "-q", cwd=ws)
    monkeypatch.chdir(ws)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return ws


@pytest.fixture
def tracked_run(workspace, tiny_generator, real, mlflow_store):
    """A run made exactly as `dpops run` makes it (shards under data/runs/<run id>/ in the workspace)."""
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_store(workspace)}, dp={"max_rounds": 2}))
    run = run_tracked(cfg, tiny_generator, real)
    return cfg, run


def test_each_round_is_one_dvc_added_shard_whose_md5_mlflow_links(tracked_run, workspace):
    cfg, run = tracked_run
    result = run.result
    client = MlflowClient(cfg.tracking.uri)
    children = round_runs(client, run.run_id)
    assert len(children) == len(result.records) == len(run.shards) == 3
    for child, record in zip(children, result.records, strict=True):
        shard = run.shards[record.round]
        assert shard.path.parts[:3] == ("data", "runs", run.run_id)  # relative to the DVC root
        path = workspace / shard.path
        dvc_file = yaml.safe_load(path.with_name(path.name + ".dvc").read_text())
        assert dvc_file["outs"][0]["md5"] == shard.md5 == md5_file(path)  # our md5 is DVC's
        assert cache_path(workspace, shard.md5).is_file()
        assert child.data.tags["dpops.shard_md5"] == shard.md5 and shard.versioned_by == "dvc add"
        (dataset_input,) = child.inputs.dataset_inputs
        assert dataset_input.dataset.digest == shard.md5
        assert dataset_input.dataset.name == f"{run.run_id}/round-{record.round}"
        data = read_shard(path)
        assert data["images"].dtype.name == "uint8" and data["images"].shape == (record.n_new, 1, 8, 8)
        assert load_file_metadata(path)["omega"] == repr(record.omega) == repr(0.1 if record.round else 0.0)
        assert len(data["labels"]) == len(data["entropy"]) == len(data["seeds"]) == record.n_new
    assert read_shard(workspace / run.shards[1].path)["entropy"].mean() == pytest.approx(
        result.records[1].entropy_mean, rel=1e-5
    )


def test_restore_rebuilds_identical_bytes_from_the_registry_alone(tracked_run, workspace, tmp_path):
    cfg, run = tracked_run
    originals = {k: (workspace / s.path).read_bytes() for k, s in run.shards.items()}
    for s in run.shards.values():
        (workspace / s.path).unlink()  # the workspace copy is gone; only cache + registry remain
    out = restore_run_data(run.run_id, tmp_path / "all", tracking_uri=cfg.tracking.uri)
    assert [p.read_bytes() for p in out] == [originals[k] for k in sorted(originals)]
    one = restore_run_data(run.run_id, tmp_path / "one", tracking_uri=cfg.tracking.uri, round_index=1)
    assert [p.name for p in one] == ["round_001.safetensors"] and one[0].read_bytes() == originals[1]
    pool = restore_run_data(run.run_id, tmp_path / "pool", tracking_uri=cfg.tracking.uri, round_index=1, pool=True)
    assert [p.name for p in pool] == ["round_000.safetensors", "round_001.safetensors"]
    with pytest.raises(DataError, match=r"--round 9: run .* has rounds \[0, 1, 2\]"):
        restore_run_data(run.run_id, tmp_path / "x", tracking_uri=cfg.tracking.uri, round_index=9)


def test_restore_fails_loudly_on_a_corrupt_cache(tracked_run, workspace, tmp_path):
    cfg, run = tracked_run
    cached = cache_path(workspace, run.shards[0].md5)
    cached.chmod(0o644)
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataError, match="restored bytes have md5"):
        restore_run_data(run.run_id, tmp_path / "r", tracking_uri=cfg.tracking.uri, round_index=0)
    assert not (tmp_path / "r" / "round_000.safetensors").exists()


def test_restore_pulls_from_the_dvc_remote_when_the_cache_lacks_it(tracked_run, workspace, tmp_path):
    import shutil

    cfg, run = tracked_run
    _sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=workspace)
    _sh(sys.executable, "-m", "dvc", "push", "-q", cwd=workspace)
    original = (workspace / run.shards[2].path).read_bytes()
    shutil.rmtree(workspace / ".dvc" / "cache")
    (workspace / run.shards[2].path).unlink()
    (out,) = restore_run_data(run.run_id, tmp_path / "r", tracking_uri=cfg.tracking.uri, round_index=2)
    assert out.read_bytes() == original and cache_path(workspace, run.shards[2].md5).is_file()


def test_restore_without_cache_or_remote_says_so(tracked_run, workspace, tmp_path):
    import shutil

    cfg, run = tracked_run
    shutil.rmtree(workspace / ".dvc" / "cache")
    with pytest.raises(DataError, match=r"not in the DVC cache .* and no remote has it"):
        restore_run_data(run.run_id, tmp_path / "r", tracking_uri=cfg.tracking.uri, round_index=0)
