"""Real `dpops` processes stopped the ways clusters and disks stop them: SIGTERM, a second process resuming a
live run, SIGKILL then a take-over, an output path that cannot be written, a full disk."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from dp_ops.config import build_config
from dp_ops.files import atomic_path, disk_error, unwritable, write_json
from dp_ops.records.tracking import TrackingStore

from conftest import tiny_tree

DPOPS = [sys.executable, "-m", "dp_ops"]


# A run long enough to be stopped mid-way (dvc_workspace sections).
LONG = {"train": {"iterations": 400, "eval_every": 10}, "dp": {"max_rounds": 3}}


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
    return TrackingStore(f"sqlite:///{ws / 'mlflow.db'}").round_runs(run_id)


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_says_how_to_resume_then_resume_finishes(dvc_workspace):
    ws, env = dvc_workspace(**LONG)
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
def test_resume_of_a_live_run_is_refused_and_a_dead_ones_lease_taken_over(dvc_workspace):
    ws, env = dvc_workspace(**LONG)
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
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, tiny_params):
    """A path under a regular file fails for root too (ENOTDIR), unlike permission bits."""
    (tmp_path / "blocker").write_text("a file where a folder is wanted\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    tiny_params(tmp_path)
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
    assert caught.value.filename == str(target)  # the file meant, not its temporary sibling
    assert disk_error(caught.value, [tmp_path]) == f"{target}: no space left on device"
    assert disk_error(RuntimeError("wrapped"), [tmp_path]) is None


def _experiment_runs(ws, experiment):
    client = _client(ws)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'experiment'")


@pytest.mark.slow
def test_sigterm_to_a_sweep_worker_requeues_its_trial_at_once(dvc_workspace):
    import optuna

    from dp_ops.studies.sweep import make_storage

    ws, env = dvc_workspace(**LONG)
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
def test_sigterm_to_a_benchmark_stops_every_worker_killed(dvc_workspace):
    ws, env = dvc_workspace(**LONG)
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


def _read_only_bind(source, target):
    """``source`` seen read-only at ``target`` (a real read-only mount: root ignores file modes); None when
    this machine allows no mount (not root, or no CAP_SYS_ADMIN in a container)."""
    target.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True).returncode:
        return None
    if subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True).returncode:
        subprocess.run(["umount", str(target)], check=True)
        return None
    return target


@pytest.mark.slow
def test_a_read_only_workspaces_runs_restore_to_a_writable_folder(
    dvc_workspace, tiny_generator, real, tmp_path, monkeypatch
):
    from dp_ops.config import load_config
    from dp_ops.records.versioning import md5_file
    from dp_ops.runner import run_tracked

    ws, env = dvc_workspace(dp={"max_rounds": 1})
    monkeypatch.chdir(ws)  # (the run's outputs where `dpops run` puts them)
    run = run_tracked(load_config(ws / "params.yaml"), tiny_generator, real)
    ro = _read_only_bind(ws, tmp_path / "ro")
    if ro is None:
        pytest.skip("no read-only mount can be made here (mount --bind needs root with CAP_SYS_ADMIN)")
    try:
        assert subprocess.run(["touch", str(ro / "mlflow.db.dpops.lock")], capture_output=True).returncode
        restore = subprocess.run(
            [*DPOPS, "data", "restore", run.run_id, "--to", str(tmp_path / "out")],
            cwd=ro,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert restore.returncode == 0, restore.stdout + restore.stderr
        for k, shard in run.versions.items():
            got = sorted((tmp_path / "out" / f"round_{k:03d}").glob("part_*.safetensors"))
            assert [md5_file(p) for p in got] == [p.md5 for p in shard.parts]
    finally:
        subprocess.run(["umount", str(ro)], check=True)


# ---- a full disk under the MLflow store ------------------------------------------------------------------
# `dpops run`, with the workspace's disk filled just before round 1's checkpoint: state.pt fails, and the
# store (mlflow.db on the same disk) cannot be written either.
_FILL_BEFORE_SECOND_CHECKPOINT = """
import sys
from dp_ops.records import checkpoint

original, calls = checkpoint.Checkpointer.on_checkpoint, []

def fill_then_checkpoint(self, state):
    calls.append(1)
    if len(calls) == 2:
        with open("filler", "wb") as f:
            try:
                while True:
                    f.write(bytes(65536))
                    f.flush()
            except OSError:
                pass
    return original(self, state)

checkpoint.Checkpointer.on_checkpoint = fill_then_checkpoint
from dp_ops.cli import app

sys.argv = ["dpops", *sys.argv[1:]]
app()
"""


@pytest.fixture
def tmpfs(tmp_path):
    """A real 48 MiB tmpfs at ``tmp_path/disk`` (unmounted at the end); skipped where no mount can be made."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("no tmpfs can be mounted here (mount needs root with CAP_SYS_ADMIN)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_under_the_store_is_one_line_naming_the_checkpoint_then_resume_is_exact(
    dvc_workspace, tmpfs, tmp_path
):
    ws, env = dvc_workspace(train={"iterations": 60, "eval_every": 10}, dp={"max_rounds": 1})
    shutil.copytree(ws, tmpfs, dirs_exist_ok=True, symlinks=True)  # the workspace, store included, on the tmpfs
    (tmp_path / "driver.py").write_text(_FILL_BEFORE_SECOND_CHECKPOINT)
    code, out = _finish(
        subprocess.Popen(
            [sys.executable, str(tmp_path / "driver.py"), "run"],
            cwd=tmpfs,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
    assert code == 1, out
    (run_id,) = [p.name for p in (tmpfs / "checkpoints").iterdir()]
    line = _error_line(out)  # (and no traceback: MLflow's log of the database error is off the screen)
    assert line == (
        f"error: checkpoints/{run_id}/state.pt: no space left on device; run {run_id} stopped at its last "
        "completed round and stays RUNNING in MLflow (its store could not be written); free space or make it "
        f"writable, then: dpops run --resume {run_id}"
    ), out
    assert "mlflow.store" not in out and "SQLAlchemy" not in out, out
    (tmpfs / "filler").unlink()
    assert _client(tmpfs).get_run(run_id).info.status == "RUNNING"  # what the line says

    code, out = _finish(_dpops(tmpfs, env, "run", "--resume", run_id))
    assert code == 0, out
    assert _client(tmpfs).get_run(run_id).info.status == "FINISHED"
    resumed = _numbers(tmpfs / "metrics.json")
    code, out = _finish(_dpops(tmpfs, env, "run"))  # the same config, never interrupted
    assert code == 0, out
    assert _numbers(tmpfs / "metrics.json") == resumed


def _numbers(metrics):
    """A run's summary without its timings."""
    return {k: v for k, v in json.loads(metrics.read_text()).items() if not k.endswith("_seconds")}


def test_parts_behind_a_symlink_that_leaves_the_workspace_are_refused_before_work(tmp_path, monkeypatch):
    """DVC versions where the files really are: output.shards through a link to outside the DVC
    workspace would leave every round unversioned without a word. A link that stays inside is fine, and so
    is the workspace itself reached through a link."""
    from dp_ops.errors import ConfigError
    from dp_ops.paths import check_outputs

    ws, outside = tmp_path / "ws", tmp_path / "outside"
    (ws / ".dvc").mkdir(parents=True)
    (ws / "inside").mkdir()
    outside.mkdir()
    (ws / "data").symlink_to(outside)
    (ws / "kept").symlink_to(ws / "inside")
    (tmp_path / "ws-link").symlink_to(ws)
    monkeypatch.chdir(ws)
    cfg = build_config(tiny_tree(output={"shards": "data/runs"}))
    with pytest.raises(ConfigError) as caught:
        check_outputs(cfg)
    assert str(caught.value) == (
        f"output.shards='data/runs': leads through a symlink to {outside / 'runs'}, outside the DVC workspace {ws}, "
        "where its rounds cannot be versioned; use a folder inside the workspace"
    )
    check_outputs(build_config(tiny_tree(output={"shards": "kept/runs"})))
    check_outputs(build_config(tiny_tree(output={"shards": str(tmp_path / "ws-link" / "inside" / "runs")})))


@pytest.mark.slow
def test_a_full_temporary_folder_is_named_as_tmpdir(tmpfs, tmp_path, tiny_generator, real, mlflow_uri, monkeypatch):
    """The round's pictures go through a temporary folder on their way to MLflow; with TMPDIR on a
    full disk (one Python still accepts at startup: a little room left), the line names TMPDIR, not an output."""
    import tempfile

    from dp_ops.errors import DataError
    from dp_ops.runner import run_tracked

    (tmpfs / "filler").write_bytes(bytes((48 << 20) - (16 << 10)))  # 16 KiB left
    monkeypatch.setattr(tempfile, "tempdir", str(tmpfs))  # (what TMPDIR sets, read once per process)
    cfg = build_config(
        tiny_tree(
            dp={"max_rounds": 1},
            tracking={"uri": mlflow_uri, "experiment": "t"},
            output={
                "metrics": str(tmp_path / "metrics.json"),
                "rounds": str(tmp_path / "rounds.json"),
                "curve": str(tmp_path / "curve.json"),
                "shards": str(tmp_path / "runs"),
                "checkpoints": str(tmp_path / "checkpoints"),
            },
        )
    )
    with pytest.raises(DataError) as caught:
        run_tracked(cfg, tiny_generator, real)
    client = MlflowClient(mlflow_uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("t").experiment_id], "attributes.run_name LIKE 'dp%'")
    run_id = parent.info.run_id
    assert str(caught.value) == (
        f"TMPDIR={tmpfs}: no space left on device; run {run_id} stopped (FAILED) at its last completed round; "
        "free space or make it writable, then start it again (no round had completed)"
    )
    assert parent.info.status == "FAILED"


def test_parts_and_a_saved_generator_get_the_mode_every_output_gets(tmp_path, tiny_generator):
    """Safetensors creates its files 0600; what dp_ops writes is 0644 under the usual umask (as
    open() makes it), readable by the group that shares a workspace or a DVC cache. Under umask 027 too."""
    import numpy as np

    from dp_ops.engine.shards import write_part

    def written(where):
        write_part(
            where / "part_00000.safetensors",
            np.zeros((2, 1, 8, 8), np.uint8),
            np.zeros(2),
            np.zeros(2),
            np.arange(2),
            round_index=0,
            index=0,
            start=0,
            omega=0.0,
        )
        write_json(where / "metrics.json", {})
        tiny_generator.save(where / "generator")
        return {p.relative_to(where).as_posix(): p.stat().st_mode & 0o777 for p in where.rglob("*") if p.is_file()}

    for umask in (0o022, 0o027):
        old = os.umask(umask)
        try:
            modes = written(tmp_path / oct(umask))
        finally:
            os.umask(old)
        assert "generator/unet/diffusion_pytorch_model.safetensors" in modes
        assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_requeued_job_loads_its_cached_generator_instead_of_training_another(
    tiny_cfg, tiny_generator, real, tmp_path
):
    """`runner.ensure_generator` (every command's generator): one already at generator.path is loaded as it
    is, its folder untouched, and no quality is measured (only a generator trained now has one)."""
    import torch

    from dp_ops.runner import ensure_generator

    tiny_generator.save(tmp_path / "gen")
    cfg = tiny_cfg.model_copy(
        update={"generator": tiny_cfg.generator.model_copy(update={"path": str(tmp_path / "gen")})}
    )
    saved = {p: p.stat().st_mtime_ns for p in (tmp_path / "gen").rglob("*")}
    generator, quality = ensure_generator(cfg, real)
    assert quality is None and {p: p.stat().st_mtime_ns for p in (tmp_path / "gen").rglob("*")} == saved
    for mine, theirs in zip(generator.unet.parameters(), tiny_generator.unet.parameters(), strict=True):
        assert torch.equal(mine, theirs)
