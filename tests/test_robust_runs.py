"""Real `dpops` processes stopped the ways clusters and disks stop them: SIGTERM, a second process resuming a
live run, SIGKILL then a take-over, an output path that cannot be written, a full disk."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient

from dp_ops.config import build_config
from dp_ops.files import atomic_path, disk_error, unwritable, write_json
from dp_ops.records.tracking import Registry

from conftest import tiny_tree

DPOPS = [sys.executable, "-m", "dp_ops"]


@pytest.fixture
def workspace(dvc_workspace):
    """A git + DVC workspace with a trained tiny generator and a run long enough to be stopped mid-way."""
    return dvc_workspace(train={"iterations": 400, "eval_every": 10}, dp={"max_rounds": 3})


def _dpops(ws, env, *args):
    return subprocess.Popen(
        [*DPOPS, *args], cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _until_checkpointed(ws, proc):
    """The run id once round 0's checkpoint is written (the run is then mid-training, resumable)."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list((ws / "checkpoints").glob("*/state.pt"))
        if found:
            return found[0].parent.name
        time.sleep(0.05)
    raise AssertionError("no checkpoint before the run ended: " + proc.communicate()[0])


def _client(ws):
    return MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")


def _children(ws, run_id):
    return Registry(f"sqlite:///{ws / 'mlflow.db'}").round_runs(run_id)


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_says_how_to_resume_then_resume_finishes(workspace):
    ws, env = workspace
    victim = _dpops(ws, env, "run")
    run_id = _until_checkpointed(ws, victim)
    assert (ws / "checkpoints" / run_id / "lease.json").is_file()  # a live run holds its lease
    victim.send_signal(signal.SIGTERM)
    code, out = _finish(victim, 120)
    assert code == 143, out
    (line,) = [line for line in out.splitlines() if "SIGTERM" in line]
    assert line == (
        f"terminated (SIGTERM): run {run_id} ended KILLED at its last completed round; "
        f"resume it with: dpops run --resume {run_id}"
    )
    assert "Traceback" not in out
    assert _client(ws).get_run(run_id).info.status == "KILLED"
    assert all(c.status != "RUNNING" for c in _children(ws, run_id))
    assert not (ws / "checkpoints" / run_id / "lease.json").exists()  # released however the run ends
    assert not list((ws / "checkpoints" / run_id).glob(".*.tmp"))

    code, out = _finish(_dpops(ws, env, "run", "--resume", run_id, "-S", "dp.omega=0.3"))
    assert code == 0, out
    assert f"warning: --resume continues run {run_id} with its own config; ignored: -S dp.omega=0.3" in out
    assert _client(ws).get_run(run_id).info.status == "FINISHED"
    assert all(c.status == "FINISHED" for c in _children(ws, run_id))
    mode = (ws / "metrics.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # as a plain open() would make it, not 0600

    # `data restore` of this run to a place that cannot be written: one line, before anything is restored
    (ws / "a_file").write_text("x")
    code, out = _finish(_dpops(ws, env, "data", "restore", run_id, "--to", "a_file"), 120)
    assert code == 1, out
    assert _error_line(out) == (
        "error: --to a_file: cannot be written (a_file is a file, not a folder); choose another folder with --to"
    )
    (ws / "restored").write_text("x")  # the default destination, restored/<run id>, lies under a file
    code, out = _finish(_dpops(ws, env, "data", "restore", run_id), 120)
    assert code == 1, out
    assert _error_line(out) == (
        f"error: the default destination (--to) restored/{run_id}: cannot be written (restored is a file, not a "
        "folder); choose another folder with --to"
    )


@pytest.mark.slow
def test_resume_of_a_live_run_is_refused_and_a_dead_ones_lease_taken_over(workspace):
    ws, env = workspace
    victim = _dpops(ws, env, "run")
    run_id = _until_checkpointed(ws, victim)
    victim.send_signal(signal.SIGSTOP)  # alive, but it cannot finish while the second process starts

    code, out = _finish(_dpops(ws, env, "run", "--resume", run_id), 120)
    assert code == 1, out
    line = _error_line(out)
    assert line.startswith(f"error: --resume {run_id}: the run is still being trained by pid {victim.pid} on ")
    assert victim.poll() is None  # untouched

    victim.send_signal(signal.SIGKILL)
    victim.wait(60)
    assert _client(ws).get_run(run_id).info.status == "RUNNING"  # what SIGKILL leaves: the lease is stale now
    ckpt = ws / "checkpoints" / run_id / "state.pt"
    ckpt.rename(ckpt.with_name("aside.pt"))
    code, out = _finish(_dpops(ws, env, "run", "--resume", run_id), 120)
    assert code == 1, out
    assert f"note: taking over run {run_id} from pid {victim.pid} on " in out
    assert f"pid {victim.pid} is no longer running" in out
    assert "checkpoint missing, although round(s) up to 0 were logged" in out  # not "stopped before round 0"

    ckpt.with_name("aside.pt").rename(ckpt)
    code, out = _finish(_dpops(ws, env, "run", "--resume", run_id))
    assert code == 0, out
    assert _client(ws).get_run(run_id).info.status == "FINISHED"
    assert not (ws / "checkpoints" / run_id / "lease.json").exists()


def _error_line(out):
    """The one ``error:`` line of a refused command (and no traceback)."""
    assert "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.slow
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """A path under a regular file fails for root too (ENOTDIR), unlike permission bits."""
    (tmp_path / "blocker").write_text("a file where a folder is wanted\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_tree()))
    code, out = _finish(_dpops(tmp_path, env, "run", "-S", "output.shards=blocker/runs"), 120)
    assert code == 1, out
    line = _error_line(out)
    assert line == "error: output.shards='blocker/runs': cannot be written (blocker is a file, not a folder)"
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was opened


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("output.metrics", "blocker/m/metrics.json"),
        ("output.rounds", "blocker/rounds.json"),
        ("output.curve", "blocker/curve.json"),
        ("output.checkpoints", "blocker"),
        ("generator.path", "blocker/gen"),
    ],
)
def test_every_output_location_is_checked(tmp_path, monkeypatch, key, where):
    from dp_ops.errors import ConfigError
    from dp_ops.paths import check_outputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("x")
    section, name = key.split(".")
    cfg = build_config(tiny_tree(**{section: {name: where}}))
    with pytest.raises(ConfigError, match=rf"^{key}='{where}': cannot be written \(blocker is a file, not a folder\)$"):
        check_outputs(cfg)


def test_unwritable_names_the_reason():
    assert unwritable("/dev/null/x", folder=True) == "/dev/null is a file, not a folder"
    assert unwritable("/proc/version", folder=True) == "/proc/version is a file, not a folder"
    assert unwritable("/proc/sys/dpops_nope/metrics.json") is not None  # procfs: no new files, even for root


def _write_to_a_full_disk(target):
    with atomic_path(target) as tmp:
        os.symlink("/dev/full", tmp)
        with open(tmp, "w") as f:
            f.write("x" * 10_000)
            f.flush()


def test_a_failed_atomic_write_leaves_no_temporary_file_and_is_named_a_full_disk(tmp_path):
    """ENOSPC for real: the temporary file is /dev/full."""
    target = tmp_path / "state.pt"
    write_json(target, {"old": True})
    with pytest.raises(OSError, match="No space left") as caught:
        _write_to_a_full_disk(target)
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary sibling left
    assert json.loads(target.read_text()) == {"old": True}  # the old content, untouched
    assert disk_error(caught.value) == "no space left on device"
    assert disk_error(RuntimeError("wrapped"), [tmp_path]) is None


def _experiment_runs(ws, experiment):
    client = _client(ws)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'experiment'")


@pytest.mark.slow
def test_sigterm_to_a_sweep_worker_requeues_its_trial_at_once(workspace):
    import optuna

    from dp_ops.studies.sweep import make_storage

    ws, env = workspace
    storage = ws / "sweep.journal"
    args = ["sweep", "--n-trials", "2", "--study-name", "st", "--storage", str(storage)]
    worker = _dpops(ws, env, *args, "-S", "sweep.round_size.low=32", "-S", "sweep.round_size.high=64")
    run_id = _until_checkpointed(ws, worker)
    worker.send_signal(signal.SIGTERM)
    code, out = _finish(worker, 120)
    assert code == 143, out
    (line,) = [line for line in out.splitlines() if "SIGTERM" in line]
    assert line == (
        f"terminated (SIGTERM): the running trial (run {run_id}, ended KILLED) was re-queued at once; run the same "
        "dpops sweep command to continue the study"
    )
    assert _client(ws).get_run(run_id).info.status == "KILLED"
    study = optuna.load_study(study_name="st", storage=make_storage(str(storage)))
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # the retry is queued, not left RUNNING


@pytest.mark.slow
def test_sigterm_to_a_benchmark_stops_every_worker_killed(workspace):
    ws, env = workspace
    bench = subprocess.Popen(
        [*DPOPS, "bench", "--quick", "--workers", "2", "--out", "out"],
        cwd=ws,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _until_checkpointed(ws, bench)
    os.killpg(bench.pid, signal.SIGTERM)  # as Slurm does: every process of the job
    code, out = _finish(bench, 300)
    assert code == 143, out
    assert (
        "terminated (SIGTERM): every running run ended KILLED at its last completed round; run the same command "
        "again to resume them"
    ) in out
    assert "Traceback" not in out and "BrokenProcessPool" not in out
    runs = _experiment_runs(ws, "dp-ops-bench")
    assert any(r.info.status == "KILLED" for r in runs)
    assert all(r.info.status in ("KILLED", "FINISHED") for r in runs)  # nothing left RUNNING
