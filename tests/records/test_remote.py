"""A default DVC remote that cannot take a push: refused before any work when it is read-only or full
(a real read-only bind mount, a real tiny tmpfs), and one line with the resume command when it fills up
mid-run. Real `dpops run` processes in a real DVC workspace."""

import contextlib
import os
import re
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

DPOPS = [sys.executable, "-m", "dp_ops"]


@contextlib.contextmanager
def _mounted(*args):
    """``mount *args`` for the block (unmounted after it); the test is skipped where mounting is not allowed."""
    target = args[-1]
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", target], check=True)


def _with_remote(ws, env, folder):
    add = [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(folder)]
    subprocess.run(add, cwd=ws, env=env, check=True)


def _dpops(ws, env, *args, **kw):
    return subprocess.Popen(
        [*DPOPS, *args], cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def _refused(ws, env):
    proc = _dpops(ws, env, "run")
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.mark.slow  # (end to end: whole tiny runs or a dpops process, seconds each)
def test_a_read_only_remote_is_refused_before_any_work(dvc_workspace, tmp_path):
    ws, env = dvc_workspace()
    source, remote = tmp_path / "remote-src", tmp_path / "remote"
    source.mkdir()
    remote.mkdir()
    with _mounted("--bind", "-o", "ro", str(source), str(remote)):
        _with_remote(ws, env, remote)
        code, out = _refused(ws, env)
    assert code == 1, out
    assert out.strip().splitlines() == [
        f"error: DVC remote 'store' ({remote}): cannot be written (Read-only file system); every round is pushed "
        "there: free space or make it writable, or unset it (dvc remote default --unset)"
    ]
    assert not (ws / "data").exists() and not (ws / "checkpoints").exists()  # nothing generated


@pytest.mark.slow  # (end to end: whole tiny runs or a dpops process, seconds each)
def test_a_full_remote_is_refused_before_any_work(dvc_workspace, tmp_path):
    ws, env = dvc_workspace()
    remote = tmp_path / "remote"
    remote.mkdir()
    with _mounted("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(remote)):
        _with_remote(ws, env, remote / "dvc")  # (not there yet: DVC would create it; its parent is probed)
        code, out = _refused(ws, env)
        assert not list(remote.iterdir())  # the probe is gone
    assert code == 1, out
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith(f"error: DVC remote 'store' ({remote / 'dvc'}): cannot be written (No space left on device)")
    )
    assert not (ws / "data").exists()


def _fill(folder):
    """Write into ``folder`` until its filesystem is full."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with contextlib.suppress(OSError), (folder / "filler").open("wb") as f:
        f.write(b"\0" * (free + 65536))  # (more than fits: the write ends at ENOSPC)
    assert os.statvfs(folder).f_bavail == 0


@pytest.mark.slow
def test_a_remote_that_fills_mid_run_stops_it_with_the_resume_line(dvc_workspace, tmp_path):
    ws, env = dvc_workspace(dp={"max_rounds": 2}, train={"iterations": 160, "eval_every": 10})
    remote = tmp_path / "remote"
    remote.mkdir()
    with _mounted("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(remote)):
        _with_remote(ws, env, remote)
        victim = _dpops(ws, env, "run")
        deadline, found = time.time() + 300, []
        while not found and victim.poll() is None and time.time() < deadline:
            found = list((ws / "checkpoints").glob("*/state.pt"))  # round 0 pushed and checkpointed
            time.sleep(0.01)
        assert found, victim.communicate()[0]
        _fill(remote)  # round 1's push now fails
        out, _ = victim.communicate(timeout=300)
        run_id = found[0].parent.name
        assert victim.returncode == 1, out
        assert "Traceback" not in out
        last = out.strip().splitlines()[-1]
        assert re.fullmatch(
            r"error: dvc push of the last round to the default DVC remote failed \(\d+ files failed to upload\); "
            rf"run {run_id} stopped \(FAILED\) at its last completed round; free space or make it writable, "
            rf"then: dpops run --resume {run_id}",
            last,
        ), last
        assert MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_run(run_id).info.status == "FAILED"

        (remote / "filler").unlink()  # space freed: the resume finishes the run
        resumed = _dpops(ws, env, "run", "--resume", run_id)
        out, _ = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, out
    assert MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_run(run_id).info.status == "FINISHED"
