"""Real git + DVC workspace in a temporary directory, real MLflow on a temporary SQLite store."""

import json
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

from dp_ops.config import build_config
from dp_ops.engine.shards import PartReader, scan_round
from dp_ops.errors import DataError
from dp_ops.records.tracking import round_runs
from dp_ops.records.versioning import cache_path, dir_md5, md5_file
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


def _parts(folder):
    return sorted(folder.glob("part_*.safetensors"))


def test_each_round_is_one_dvc_added_folder_whose_digest_mlflow_links(tracked_run, workspace):
    cfg, run = tracked_run
    result = run.result
    client = MlflowClient(cfg.tracking.uri)
    children = round_runs(client, run.run_id)
    assert len(children) == len(result.records) == len(run.shards) == 3
    for child, record in zip(children, result.records, strict=True):
        shard = run.shards[record.round]
        assert shard.path.parts[:3] == ("data", "runs", run.run_id)  # relative to the DVC root
        folder = workspace / shard.path
        dvc_file = yaml.safe_load(folder.with_name(folder.name + ".dvc").read_text())
        assert dvc_file["outs"][0]["md5"] == shard.md5 and shard.md5.endswith(".dir") and len(shard.md5) == 36
        listing = json.loads(cache_path(workspace, shard.md5).read_text())  # DVC's own .dir listing ...
        assert dir_md5(listing) == shard.md5  # ... whose digest we compute exactly as DVC does
        assert {e["relpath"]: e["md5"] for e in listing} == {p.relpath: p.md5 for p in shard.parts}
        assert [p.md5 for p in shard.parts] == [md5_file(f) for f in _parts(folder)]
        assert child.data.tags["dpops.shard_md5"] == shard.md5 and shard.versioned_by == "dvc add"
        (dataset_input,) = child.inputs.dataset_inputs
        assert dataset_input.dataset.digest == shard.md5
        assert dataset_input.dataset.name == f"{run.run_id}/round-{record.round}"
        (part,) = scan_round(folder)  # (tiny rounds: one part each)
        reader = PartReader(part.path)
        assert reader.images().dtype.name == "uint8" and reader.images().shape == (record.n_new, 1, 8, 8)
        assert reader.meta["omega"] == repr(record.omega) == repr(0.1 if record.round else 0.0)
        assert len(reader.array("labels")) == len(reader.array("entropy")) == len(reader.array("seeds")) == record.n_new
    (part,) = scan_round(workspace / run.shards[1].path)
    assert PartReader(part.path).array("entropy").mean() == pytest.approx(result.records[1].entropy_mean, rel=1e-5)


def _bytes(folder):
    return [f.read_bytes() for f in _parts(folder)]


def test_restore_rebuilds_identical_bytes_from_the_registry_alone(tracked_run, workspace, tmp_path):
    import shutil

    cfg, run = tracked_run
    originals = {k: _bytes(workspace / s.path) for k, s in run.shards.items()}
    for s in run.shards.values():
        shutil.rmtree(workspace / s.path)  # the workspace copy is gone; only cache + registry remain
    out = restore_run_data(run.run_id, tmp_path / "all", tracking_uri=cfg.tracking.uri)
    assert [p.read_bytes() for p in out] == [b for k in sorted(originals) for b in originals[k]]
    one = restore_run_data(run.run_id, tmp_path / "one", tracking_uri=cfg.tracking.uri, round_index=1)
    assert [p.parent.name for p in one] == ["round_001"] and [p.read_bytes() for p in one] == originals[1]
    pool = restore_run_data(run.run_id, tmp_path / "pool", tracking_uri=cfg.tracking.uri, round_index=1, pool=True)
    assert [p.parent.name for p in pool] == ["round_000", "round_001"]
    with pytest.raises(DataError, match=r"--round 9: run .* has rounds \[0, 1, 2\]"):
        restore_run_data(run.run_id, tmp_path / "x", tracking_uri=cfg.tracking.uri, round_index=9)


def test_restore_fails_loudly_on_a_corrupt_cache(tracked_run, workspace, tmp_path):
    cfg, run = tracked_run
    cached = cache_path(workspace, run.shards[0].parts[0].md5)
    cached.chmod(0o644)
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataError, match="restored bytes have md5"):
        restore_run_data(run.run_id, tmp_path / "r", tracking_uri=cfg.tracking.uri, round_index=0)
    assert not list((tmp_path / "r").rglob("part_*"))


def test_restore_refuses_a_tampered_parts_listing(tracked_run, workspace, tmp_path):
    from dp_ops.records.versioning import parse_parts

    _, run = tracked_run
    shard = run.shards[0]
    listing = shard.parts_json()
    assert parse_parts(listing, shard.md5) == shard.parts
    with pytest.raises(DataError, match="does not match the round's digest"):
        parse_parts([{**listing[0], "md5": "0" * 32}], shard.md5)
    with pytest.raises(DataError, match="is not a part name with an md5"):
        parse_parts([{**listing[0], "relpath": "../../etc/passwd"}])


def test_restore_pulls_from_the_dvc_remote_when_the_cache_lacks_it(tracked_run, workspace, tmp_path):
    import shutil

    cfg, run = tracked_run
    _sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=workspace)
    _sh(sys.executable, "-m", "dvc", "push", "-q", cwd=workspace)
    original = _bytes(workspace / run.shards[2].path)
    shutil.rmtree(workspace / ".dvc" / "cache")
    shutil.rmtree(workspace / run.shards[2].path)
    out = restore_run_data(run.run_id, tmp_path / "r", tracking_uri=cfg.tracking.uri, round_index=2)
    assert [p.read_bytes() for p in out] == original
    assert all(cache_path(workspace, p.md5).is_file() for p in run.shards[2].parts)


def test_restore_without_cache_or_remote_says_so(tracked_run, workspace, tmp_path):
    import shutil

    cfg, run = tracked_run
    shutil.rmtree(workspace / ".dvc" / "cache")
    with pytest.raises(DataError, match=r"not in the DVC cache .* and no remote has it"):
        restore_run_data(run.run_id, tmp_path / "r", tracking_uri=cfg.tracking.uri, round_index=0)


def test_a_configured_remote_holds_every_finished_round_after_the_run(workspace, tiny_generator, real, mlflow_store):
    remote = workspace.parent / "remote"
    _sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote), cwd=workspace)
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_store(workspace)}, dp={"max_rounds": 1}))
    run = run_tracked(cfg, tiny_generator, real)
    assert len(run.shards) == 2
    for shard in run.shards.values():  # pushed round by round, by the run itself: no `dvc push` here
        for p in shard.parts:
            assert (remote / "files" / "md5" / p.md5[:2] / p.md5[2:]).is_file()
        assert (remote / "files" / "md5" / shard.md5[:2] / shard.md5[2:]).is_file()  # the .dir listing too
