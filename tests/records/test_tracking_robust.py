"""The tracking store when things go wrong: processes starting together on a new store, a tracking server
that is not there or dies mid-run, a bad MLFLOW_TRACKING_URI, a crash inside a round, a resume, and
store values that become paths. Real MLflow (SQLite stores, a real `mlflow server`), real processes."""

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from dp_ops.cli import app
from dp_ops.config import build_config
from dp_ops.engine.loop import RoundRecord
from dp_ops.engine.rounds import RoundParts
from dp_ops.errors import ConfigError, DataError
from dp_ops.records.tracking import (
    HTTP_DEFAULTS,
    PARENT_ID_TAG,
    MlflowTracker,
    StoreUnavailable,
    TrackingStore,
    browse_hint,
    filter_equals,
)
from dp_ops.records.versioning import cache_path, parse_parts, restore_file

from conftest import outputs_in, tiny_tree


@pytest.fixture
def cfg(mlflow_uri):
    return build_config(tiny_tree(tracking={"uri": mlflow_uri, "experiment": "t"}))


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- processes starting together on a fresh store --------------------------------------------------------
STARTER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dp_ops.records.tracking import TrackingStore
    go = Path(sys.argv[2])
    while not go.exists():  # every process has imported MLflow: start together
        time.sleep(0.01)
    print(TrackingStore(sys.argv[1]).experiment_id("e"))
    """
)


@pytest.mark.slow
def test_processes_starting_together_on_a_fresh_store_all_succeed(tmp_path):
    """MLflow's migrations run twice at once leave a half-migrated database; under the lock one process
    migrates and the others find the schema complete."""
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, uri, str(go)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(4)
    ]
    time.sleep(8)  # (imports)
    go.touch()
    outs = [p.communicate(timeout=600)[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-600:] for o in outs)
    ids = {o.splitlines()[-1] for o in outs}  # (MLflow logs the migrations on stderr)
    assert ids == {TrackingStore(uri).find_experiment("e")}  # one experiment, the same id for all


def test_a_store_in_a_missing_folder_or_a_folder_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^tracking.uri='sqlite:///.*/nope/mlflow.db': folder .*nope does not exist"):
        TrackingStore(f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}")
    with pytest.raises(DataError, match=r"is a folder, not a database file$"):
        TrackingStore(f"sqlite:///{tmp_path}")


# ---- MLFLOW_TRACKING_URI=garbage -------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["garbage", "file:///tmp/mlruns", "sqlite:///", "http://"])
def test_a_bad_mlflow_tracking_uri_names_the_variable_and_what_is_allowed(monkeypatch, value):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    with pytest.raises(ConfigError) as info:
        TrackingStore()
    assert str(info.value).startswith(f"MLFLOW_TRACKING_URI={value!r}: not a tracking store URI; allowed: sqlite:///")
    assert "\n" not in str(info.value)


def test_a_bad_tracking_uri_in_the_config_names_the_key(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"^tracking.uri='mlruns': not a tracking store URI"):
        TrackingStore("mlruns")


# ---- a tracking server that is not there, or dies mid-run ------------------------------------------------
def test_a_closed_port_is_one_line_before_any_work(monkeypatch):
    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(StoreUnavailable) as info:
        TrackingStore(url)
    assert str(info.value) == (
        f"tracking.uri={url!r}: no MLflow server answers there ([Errno 111] Connection refused); start it, "
        "or set tracking.uri to a running one"
    )
    # MLflow's ~4 minutes of retries are bounded for the rest of the process (unless the environment says)
    assert {k: os.environ[k] for k in HTTP_DEFAULTS} == HTTP_DEFAULTS


def test_retry_settings_the_environment_gives_are_kept(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    with pytest.raises(StoreUnavailable):
        TrackingStore(f"http://127.0.0.1:{_closed_port()}")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"


def test_dpops_run_against_a_closed_port_is_one_line_and_trains_nothing(tmp_path, tiny_params):
    url = f"http://127.0.0.1:{_closed_port()}"
    params = tiny_params(
        tmp_path, generator={"path": str(tmp_path / "gen")}, tracking={"uri": url}, output=outputs_in(tmp_path / "out")
    )
    result = CliRunner().invoke(app, ["run", "--params", str(params)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        f"error: tracking.uri={url!r}: no MLflow server answers there ([Errno 111] Connection refused); "
        "start it, or set tracking.uri to a running one"
    ]
    assert not (tmp_path / "gen").exists()  # the generator was not trained


def test_dpops_scaling_with_a_bad_mlflow_tracking_uri_is_one_line(tmp_path, monkeypatch, tiny_params):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "garbage")
    params = tiny_params(tmp_path)
    result = CliRunner().invoke(app, ["scaling", "--params", str(params)])
    assert result.exit_code == 1
    assert result.output.startswith("error: MLFLOW_TRACKING_URI='garbage': not a tracking store URI; allowed: ")
    assert len(result.output.strip().splitlines()) == 1


class Server:
    """A real `mlflow server` on a copy of the migrated template store, stopped with SIGKILL and started
    again on the same database and port."""

    def __init__(self, db: Path, port: int) -> None:
        self.db, self.port, self.proc = db, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        log = (self.db.parent / "server.log").open("a")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}"),
                *("--default-artifact-root", str(self.db.parent / "art")),
                *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.db.parent / "server.log").read_text()
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    return
            time.sleep(0.3)
        raise AssertionError("mlflow server not up:\n" + (self.db.parent / "server.log").read_text())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path, mlflow_template):
    shutil.copyfile(mlflow_template, tmp_path / "server.db")
    s = Server(tmp_path / "server.db", _closed_port())
    s.start()
    yield s
    s.kill()


@pytest.mark.slow
def test_a_server_that_dies_mid_run_stops_it_in_one_line_and_it_resumes_once_back(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # (the default bound is ~30 s of retries)
    cfg = build_config(tiny_tree(tracking={"uri": server.url, "experiment": "t"}))
    tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg)

    def run_until_the_server_dies() -> None:
        with tracker.lifecycle():
            tracker.on_eval(10, 0.5)
            server.kill()
            tracker.on_eval(20, 0.6)

    with pytest.raises(StoreUnavailable) as info:
        run_until_the_server_dies()
    message = str(info.value)
    assert message.startswith(f"the tracking server {server.url} stopped answering ([Errno 111] Connection refused)")
    assert message.endswith(
        f"once the server is back: dpops run -S tracking.uri={server.url} --resume {tracker.run_id}"
    )
    assert "\n" not in message

    server.start()  # back, on the same database
    store = TrackingStore(server.url)
    assert store.run(tracker.run_id).status == "RUNNING"  # resumable
    resumed = MlflowTracker(store, cfg, run_id=tracker.run_id)
    with resumed.lifecycle():
        resumed.on_eval(10, 0.5)  # (re-evaluated after the checkpoint: logged once)
        resumed.on_eval(20, 0.6)
    assert store.run(tracker.run_id).status == "FINISHED"
    assert store.history(tracker.run_id, "val_acc") == ((10, 0.5), (20, 0.6))


def test_the_summary_points_at_a_server_rather_than_mlflow_ui():
    assert browse_hint("http://127.0.0.1:5000") == "open http://127.0.0.1:5000 in a browser"
    assert browse_hint("sqlite:///mlflow.db") == "mlflow ui --backend-store-uri sqlite:///mlflow.db"


# ---- a crash inside a round ends its round run too -------------------------------------------------------
class FullDisk:
    """A round's version whose parts listing cannot be written: the disk filled up inside the round."""

    round = 0
    path = Path("runs/r/round_00")
    md5 = "0" * 32 + ".dir"
    versioned_by = "dvc add"

    def parts_json(self) -> list[dict]:
        raise OSError(errno.ENOSPC, "No space left on device")


def _record() -> RoundRecord:
    return RoundRecord(0, 40, 40, 40, 0.0, 1.0, 1.0, 2.0, None, 0, 1, 0.1, 0.0, 0)


@pytest.mark.parametrize(("exc", "status"), [(OSError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_crash_inside_a_round_ends_its_round_run_with_the_parent(cfg, tmp_path, exc, status):
    tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg)
    round_parts = RoundParts(tmp_path, (), np.zeros(40, np.int64), np.arange(40), np.ones(40, np.float32), 0.0, 0)

    class Interrupting(FullDisk):
        def parts_json(self) -> list[dict]:
            raise KeyboardInterrupt

    version = FullDisk() if exc is OSError else Interrupting()
    with pytest.raises(exc), tracker.lifecycle():
        tracker.log_round(_record(), round_parts, version)
    client = MlflowClient(cfg.tracking.uri)
    (child,) = client.search_runs([tracker.experiment_id], filter_equals(f"tags.`{PARENT_ID_TAG}`", tracker.run_id))
    assert client.get_run(tracker.run_id).info.status == status
    assert child.info.status == status


# ---- also: val_acc logged once after a resume; store values used as paths -----------------------------
def test_a_resumed_run_logs_each_validation_point_once(cfg):
    store = TrackingStore.from_config(cfg)
    tracker = MlflowTracker(store, cfg)
    for step, acc in ((10, 0.5), (20, 0.6), (30, 0.62)):  # then interrupted; the checkpoint was at 10
        tracker.on_eval(step, acc)
    with pytest.raises(KeyboardInterrupt), tracker.lifecycle():
        raise KeyboardInterrupt
    resumed = MlflowTracker(store, cfg, run_id=tracker.run_id)
    with resumed.lifecycle():
        for step, acc in ((20, 0.6), (30, 0.62), (40, 0.7)):
            resumed.on_eval(step, acc)
    assert store.history(tracker.run_id, "val_acc") == ((10, 0.5), (20, 0.6), (30, 0.62), (40, 0.7))


@pytest.mark.parametrize("tag", ["-7", "1e3", "../x", ""])
def test_a_round_tag_that_is_not_a_round_index_is_refused(cfg, tag):
    store = TrackingStore.from_config(cfg)
    tracker = MlflowTracker(store, cfg)
    tracker.client.create_run(
        tracker.experiment_id, tags={PARENT_ID_TAG: tracker.run_id, "dpops.role": "round", "dpops.round": tag}
    )
    with pytest.raises(DataError, match=rf"tag dpops.round={tag!r} is not a round index \(a non-negative integer\)$"):
        store.round_runs(tracker.run_id)


@pytest.mark.parametrize("md5", ["../../../../etc/passwd", "0" * 31, "0" * 32 + ".dir/../x", "/abs"])
def test_an_md5_from_the_registry_never_becomes_a_path_outside_the_cache(tmp_path, md5):
    with pytest.raises(DataError, match=r"not an md5"):
        cache_path(tmp_path, md5)
    with pytest.raises(DataError, match=r"not an md5"):
        restore_file(tmp_path, md5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tampered_round_digest_is_refused_as_an_md5():
    listing = [{"relpath": "part_00000.safetensors", "md5": "a" * 32, "size": 1, "count": 1}]
    with pytest.raises(DataError, match=r"^round digest \(tag dpops.shard_md5\) '\.\./x': not an md5"):
        parse_parts(listing, "../x")


def test_filter_values_with_quotes_are_quoted_for_mlflow(cfg):
    store = TrackingStore.from_config(cfg)
    exp = store.experiment_id("t")
    for name in ("it's", 'say "hi"', "plain"):
        store.client.create_run(exp, tags={"dpops.study": name})
    for name in ("it's", 'say "hi"', "plain"):
        (run,) = store.search([exp], filter_equals("tags.`dpops.study`", name))
        assert run.tags["dpops.study"] == name
    with pytest.raises(ConfigError, match="both kinds of quote"):
        filter_equals("tags.x", "a'b\"c")


@pytest.mark.slow
def test_a_hung_server_stops_a_run_in_about_half_a_minute(server, monkeypatch):
    """A SIGSTOPped server accepts connections and never answers: MLflow's read timeouts and retries
    (HTTP_DEFAULTS) and the check that follows give up in about 30 s, as the README says."""
    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    cfg = build_config(tiny_tree(tracking={"uri": server.url, "experiment": "t"}))
    tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg)
    os.killpg(server.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info, tracker.lifecycle():
            tracker.on_eval(10, 0.5)
        took = time.monotonic() - start
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    assert f"the tracking server {server.url} stopped answering" in str(info.value)
    assert 15 < took < 40, took
