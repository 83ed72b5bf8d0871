"""Real git + DVC workspace in a temporary directory, real MLflow on a temporary SQLite store."""

import json
import os
import re
import shutil
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
from dp_ops.resume import restore_run_data
from dp_ops.runner import preflight, run_tracked

from conftest import tiny_tree


def load_file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return fh.metadata()


def _sh(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture
def tracked_run(dvc_workspace, tiny_generator, real, mlflow_store):
    """A run made exactly as `dpops run` makes it (shards under data/runs/<run id>/ in the workspace): its
    config, the run and the workspace."""
    workspace = dvc_workspace(with_generator=False, here=True).path
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_store(workspace)}, dp={"max_rounds": 2}))
    run = run_tracked(cfg, tiny_generator, real)
    return cfg, run, workspace


def _parts(folder):
    return sorted(folder.glob("part_*.safetensors"))


def test_a_run_is_one_dvc_added_folder_and_each_round_its_own_digest_mlflow_links(tracked_run):
    cfg, run, workspace = tracked_run
    result = run.result
    client = MlflowClient(cfg.tracking.uri)
    children = round_runs(client, run.run_id)
    assert len(children) == len(result.records) == len(run.versions) == 3
    runs = workspace / "data" / "runs"
    assert sorted(p.name for p in runs.rglob("*.dvc")) == [f"{run.run_id}.dvc"]  # one per run, not per round
    dvc_file = yaml.safe_load((runs / f"{run.run_id}.dvc").read_text())
    listing = json.loads(cache_path(workspace, dvc_file["outs"][0]["md5"]).read_text())  # DVC's own listing ...
    assert dir_md5(listing) == dvc_file["outs"][0]["md5"]  # ... whose digest we compute exactly as DVC does
    for child, record in zip(children, result.records, strict=True):
        shard = run.versions[record.round]
        assert shard.path.parts[:3] == ("data", "runs", run.run_id)  # relative to the DVC root
        folder = workspace / shard.path
        assert shard.md5.endswith(".dir") and len(shard.md5) == 36
        mine = [{**e, "relpath": e["relpath"].split("/")[1]} for e in listing if e["relpath"].startswith(folder.name)]
        assert dir_md5(mine) == shard.md5  # the round's digest: of its parts as DVC lists them
        assert {e["relpath"]: e["md5"] for e in mine} == {p.relpath: p.md5 for p in shard.parts}
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
    (part,) = scan_round(workspace / run.versions[1].path)
    assert PartReader(part.path).array("entropy").mean() == pytest.approx(result.records[1].entropy_mean, rel=1e-5)


def _bytes(folder):
    return [f.read_bytes() for f in _parts(folder)]


def test_restore_rebuilds_identical_bytes_from_the_registry_alone(tracked_run, tmp_path):
    import shutil

    cfg, run, workspace = tracked_run
    originals = {k: _bytes(workspace / s.path) for k, s in run.versions.items()}
    for s in run.versions.values():
        shutil.rmtree(workspace / s.path)  # the workspace copy is gone; only cache + store remain
    out = restore_run_data(run.run_id, tmp_path / "all", tracking_uri=cfg.tracking.uri)
    assert [p.read_bytes() for p in out] == [b for k in sorted(originals) for b in originals[k]]
    one = restore_run_data(run.run_id, tmp_path / "one", tracking_uri=cfg.tracking.uri, round_index=1)
    assert [p.parent.name for p in one] == ["round_001"] and [p.read_bytes() for p in one] == originals[1]
    pool = restore_run_data(run.run_id, tmp_path / "pool", tracking_uri=cfg.tracking.uri, round_index=1, pool=True)
    assert [p.parent.name for p in pool] == ["round_000", "round_001"]
    with pytest.raises(DataError, match=r"--round 9: run .* has rounds \[0, 1, 2\]"):
        restore_run_data(run.run_id, tmp_path / "x", tracking_uri=cfg.tracking.uri, round_index=9)


def test_restore_fails_loudly_on_a_corrupt_cache(tracked_run, tmp_path):
    cfg, run, workspace = tracked_run
    cached = cache_path(workspace, run.versions[0].parts[0].md5)
    cached.chmod(0o644)
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataError, match="restored bytes have md5"):
        restore_run_data(run.run_id, tmp_path / "r", tracking_uri=cfg.tracking.uri, round_index=0)
    assert not list((tmp_path / "r").rglob("part_*"))


def test_restore_refuses_a_tampered_parts_listing(tracked_run, tmp_path):
    from dp_ops.records.versioning import parse_parts

    _, run, _ = tracked_run
    shard = run.versions[0]
    listing = shard.parts_json()
    assert parse_parts(listing, shard.md5) == shard.parts
    with pytest.raises(DataError, match="does not match the round's digest"):
        parse_parts([{**listing[0], "md5": "0" * 32}], shard.md5)
    with pytest.raises(DataError, match="is not a part name with an md5"):
        parse_parts([{**listing[0], "relpath": "../../etc/passwd"}])


def test_restore_pulls_from_the_dvc_remote_when_the_cache_lacks_it(tracked_run, tmp_path):
    import shutil

    cfg, run, workspace = tracked_run
    _sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=workspace)
    _sh(sys.executable, "-m", "dvc", "push", "-q", cwd=workspace)
    original = _bytes(workspace / run.versions[2].path)
    shutil.rmtree(workspace / ".dvc" / "cache")
    shutil.rmtree(workspace / run.versions[2].path)
    out = restore_run_data(run.run_id, tmp_path / "r", tracking_uri=cfg.tracking.uri, round_index=2)
    assert [p.read_bytes() for p in out] == original
    assert all(cache_path(workspace, p.md5).is_file() for p in run.versions[2].parts)


def test_restore_without_cache_or_remote_says_so(tracked_run, tmp_path):
    import shutil

    cfg, run, workspace = tracked_run
    shutil.rmtree(workspace / ".dvc" / "cache")
    with pytest.raises(DataError, match=r"not in the DVC cache .* and no remote has it"):
        restore_run_data(run.run_id, tmp_path / "r", tracking_uri=cfg.tracking.uri, round_index=0)


def test_a_configured_remote_holds_every_finished_round_after_the_run(
    dvc_workspace, tiny_generator, real, mlflow_store
):
    workspace = dvc_workspace(with_generator=False, here=True).path
    remote = workspace.parent / "remote"
    _sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote), cwd=workspace)
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_store(workspace)}, dp={"max_rounds": 1}))
    run = run_tracked(cfg, tiny_generator, real)
    assert len(run.versions) == 2
    for shard in run.versions.values():  # pushed round by round, by the run itself: no `dvc push` here
        for p in shard.parts:
            assert (remote / "files" / "md5" / p.md5[:2] / p.md5[2:]).is_file()
    listing = yaml.safe_load((workspace / "data" / "runs" / f"{run.run_id}.dvc").read_text())["outs"][0]["md5"]
    assert (remote / "files" / "md5" / listing[:2] / listing[2:]).is_file()  # the run's .dir listing too: pullable


def test_the_commit_hint_names_what_keeps_the_run_and_dvc_gc_keeps_it(tracked_run, tmp_path):
    import shutil

    cfg, run, workspace = tracked_run
    hint = run.versioner.commit_hint()
    files = [f"data/runs/{run.run_id}.dvc", "data/runs/.gitignore"]
    assert hint == f"to keep this run's data: git add {' '.join(files)} && git commit"
    _sh("git", "add", *files, cwd=workspace)
    untracked = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "data"], cwd=workspace, capture_output=True, text=True
    ).stdout.splitlines()
    assert sorted(untracked) == [f"A  {f}" for f in sorted(files)]  # the rounds' parts are DVC's, not git's
    _sh("git", "commit", "-q", "-m", "run", cwd=workspace)
    _sh(sys.executable, "-m", "dvc", "gc", "-w", "-f", cwd=workspace)  # what no .dvc file names goes ...
    shutil.rmtree(workspace / "data" / "runs" / run.run_id)
    out = restore_run_data(run.run_id, tmp_path / "r", tracking_uri=cfg.tracking.uri)  # ... this run stays
    assert len(out) == sum(len(s.parts) for s in run.versions.values())


def test_no_commit_hint_inside_dvc_repro_or_without_dvc(dvc_workspace, tmp_path, monkeypatch):
    from dp_ops.records.versioning import DvcVersioner

    workspace = dvc_workspace(with_generator=False, here=True).path
    run = workspace / "data" / "runs" / "r1"
    (run / "round_000").mkdir(parents=True)
    (run.parent / "r1.dvc").write_text("outs: []\n")
    assert DvcVersioner(run).commit_hint() is not None
    assert DvcVersioner(tmp_path / "elsewhere" / "r1").commit_hint() is None  # no DVC workspace above it
    monkeypatch.setenv("DVC_STAGE", "dp")
    assert DvcVersioner(run).commit_hint() is None  # the stage's outs are in dvc.lock
    monkeypatch.delenv("DVC_STAGE")
    _sh(sys.executable, "-m", "dvc", "config", "core.no_scm", "true", cwd=workspace)
    assert DvcVersioner(run).commit_hint() == (
        "to keep this run's data: keep data/runs/r1.dvc (dvc gc deletes cached data no .dvc file names)"
    )


def test_quiet_dvc_turns_off_dvc_output_keeps_its_warnings_and_restores_everything(caplog):
    import io
    import logging

    from dvc.progress import Tqdm
    from dvc.ui import ui

    from dp_ops.records.versioning import quiet_dvc

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    names = ("dvc", "dvc_objects", "dvc_data", "dvc.progress", "dvc_data.callbacks")
    before = {n: logging.getLogger(n).level for n in names}
    assert not Tqdm(total=3, file=Terminal()).disable  # a terminal gets DVC's bars ...
    log = logging.getLogger("dvc.repo.add")
    with quiet_dvc():
        with quiet_dvc():  # (the push thread's call may overlap the loop's)
            pass
        assert Tqdm(total=3, file=Terminal()).disable  # ... but not during our calls
        assert ui.error_console.quiet  # (the "Checking graph" status spinner)
        log.info("Adding...")
        log.warning("a DVC warning")
        log.error("a DVC error")
    assert [r.getMessage() for r in caplog.records] == ["a DVC warning", "a DVC error"]
    assert {n: logging.getLogger(n).level for n in names} == before and not ui.error_console.quiet
    assert not Tqdm(total=3, file=Terminal()).disable


def test_a_real_dvc_warning_still_shows(dvc_workspace, caplog):
    from dp_ops.records.versioning import restore_file

    workspace = dvc_workspace(with_generator=False, here=True).path
    _sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(workspace.parent / "remote"), cwd=workspace)
    with pytest.raises(DataError, match="not in the DVC cache"):
        restore_file(workspace, "0" * 32, workspace / "x")
    assert any("do not exist neither locally nor on remote" in r.getMessage() for r in caplog.records)


def _in_a_terminal(args, cwd, env):
    """Run ``args`` on a pseudo-terminal of 120 columns (so DVC and rich draw what they draw for a user);
    returns (exit code, everything it wrote)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 900
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_dpops_run_in_a_dvc_workspace_shows_no_dvc_output(dvc_workspace, tiny_params):
    workspace = dvc_workspace(with_generator=False, here=True).path  # (the default store: sqlite:///mlflow.db)
    tiny_params(workspace, dp={"max_rounds": 2}, generator={"path": "gen"})
    _sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(workspace.parent / "remote"), cwd=workspace)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_STAGE")}
    code, out = _in_a_terminal([sys.executable, "-m", "dp_ops", "run", "--params", "params.yaml"], workspace, env)
    assert code == 0, out
    assert "train learner" in out and "final val acc" in out  # dp_ops's own progress view and summary
    for fragment in ("Waiting to acquire lock", "Checking graph", "Adding", "Collecting", "Checking out", "Querying"):
        assert fragment not in out, fragment  # DVC's bars, lock line and status spinner
    assert "\x1b[A" not in out and not re.search(r"(^|[\r\n])!", out)  # tqdm's cursor-ups and bar stubs
    assert len(list((workspace / "data" / "runs").glob("*.dvc"))) == 1  # versioned ...
    assert (workspace.parent / "remote" / "files" / "md5").is_dir()  # ... and pushed


# ---- a resume adopts a round: exactly the store's bytes, placed where their headers say -------------
def _flip(path, where):
    data = bytearray(path.read_bytes())
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def test_adopting_a_round_hashes_only_what_dvc_state_does_not_know_and_restores_it(tracked_run, monkeypatch):
    from dp_ops.records import versioning

    _, run, workspace = tracked_run
    shard = run.versions[1]
    folder = workspace / shard.path
    (path,) = _parts(folder)
    hashed = []
    monkeypatch.setattr(versioning, "md5_file", lambda p: hashed.append(p.name) or md5_file(p))
    adopted = versioning.adopt_round(workspace, shard.parts, folder, 1, 10)
    assert [p.path for p in adopted] == [path] and hashed == []  # unchanged since `dvc add`: DVC's state answers
    original = path.read_bytes()
    _flip(path, len(original) - 5)  # one image byte: same size, same inode
    versioning.adopt_round(workspace, shard.parts, folder, 1, 10)
    assert path.read_bytes() == original  # restored from the DVC cache
    assert hashed[0] == path.name and len(hashed) == 2  # the changed file, then the restored (temporary) copy


def test_adopting_a_round_refuses_a_part_whose_header_places_it_elsewhere(tracked_run):
    from dp_ops.records.versioning import adopt_round

    _, run, workspace = tracked_run
    folder = workspace / run.versions[1].path  # a listing edited consistently (digest too) to round 2's parts
    with pytest.raises(DataError, match=r"header says round 2 part 0 .*store places it as round 1 part 0"):
        adopt_round(workspace, run.versions[2].parts, folder, 1, 10)


def _lone_part(folder, labels):
    import numpy as np

    from dp_ops.engine.shards import write_part
    from dp_ops.records.versioning import PartEntry

    n = len(labels)
    path = folder / "part_00000.safetensors"
    images = np.zeros((n, 1, 8, 8), np.uint8)
    write_part(path, images, np.asarray(labels), np.zeros(n), np.arange(n), round_index=0, index=0, start=0, omega=0.0)
    return path, PartEntry(path.name, md5_file(path), path.stat().st_size, n)


def test_adopting_outside_dvc_checks_md5_labels_and_header_in_one_line(tmp_path):
    from dp_ops.records.versioning import adopt_round

    path, entry = _lone_part(tmp_path, [0, 9, 3])
    (part,) = adopt_round(None, [entry], tmp_path, 0, 10)
    assert (part.round, part.count) == (0, 3)
    with pytest.raises(DataError, match=r"label 9 outside \[0, 5\); not a part of this run's classes"):
        adopt_round(None, [entry], tmp_path, 0, 5)
    _flip(path, 20)
    with pytest.raises(DataError, match=r"part_00000.safetensors missing or not the store's bytes, and no DVC"):
        adopt_round(None, [entry], tmp_path, 0, 10)


@pytest.mark.parametrize("where", [0, 7, 20])
def test_a_damaged_header_is_one_line(tmp_path, where):
    from dp_ops.engine.shards import part_info, read_part

    path, _ = _lone_part(tmp_path, [1, 2])
    data = bytearray(path.read_bytes())
    data[where] = 0xFF  # the header's length (its low or high byte), or a byte of its JSON
    path.write_bytes(bytes(data))
    for read in (part_info, read_part):
        with pytest.raises(DataError, match=r"part_00000.safetensors: not a part file \("):
            read(path)


def test_the_commit_hint_is_a_command_a_shell_runs_as_printed(dvc_workspace):
    """Spaces, quotes and unicode in output.shards: the printed `git add` adds exactly those files."""
    from dp_ops.records.versioning import DvcVersioner

    workspace = dvc_workspace(with_generator=False, here=True).path
    run = workspace / "my data" / "runs ü'x" / "r1"
    (run / "round_000").mkdir(parents=True)
    (run.parent / "r1.dvc").write_text("outs: []\n")
    (run.parent / ".gitignore").write_text("/r1\n")
    hint = DvcVersioner(run).commit_hint()
    folder = "'my data/runs ü'\"'\"'x"  # (shlex: the ' closed, quoted as "'", reopened)
    assert hint == f"to keep this run's data: git add {folder}/r1.dvc' {folder}/.gitignore' && git commit"
    command = hint.removeprefix("to keep this run's data: ").removesuffix(" && git commit")
    subprocess.run(["sh", "-c", command], cwd=workspace, check=True, capture_output=True)
    staged = subprocess.run(
        ["git", "-c", "core.quotepath=off", "diff", "--cached", "--name-only"],
        cwd=workspace,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert sorted(f for f in staged if not f.startswith(".dvc")) == [  # (dvc init stages its own files)
        "my data/runs ü'x/.gitignore",
        "my data/runs ü'x/r1.dvc",
    ]


@pytest.mark.parametrize(
    "cache_type",
    ["copy", pytest.param("hardlink", marks=pytest.mark.slow), pytest.param("symlink", marks=pytest.mark.slow)],
)
def test_a_shared_cache_outside_the_workspace_versions_and_restores_every_round(
    dvc_workspace, tiny_generator, real, mlflow_store, tmp_path, cache_type
):
    """`dvc cache dir` elsewhere (a team's cache on one file system) and any cache.type: the cache's layout
    is DVC's to say, never assumed to be .dvc/cache/files/md5 (where round 0 would look in vain)."""
    import shutil

    workspace = dvc_workspace(with_generator=False, here=True).path
    shared = tmp_path / "team-cache"
    _sh(sys.executable, "-m", "dvc", "cache", "dir", str(shared), cwd=workspace)
    _sh(sys.executable, "-m", "dvc", "config", "cache.type", cache_type, cwd=workspace)
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_store(workspace)}, dp={"max_rounds": 1}))
    run = run_tracked(cfg, tiny_generator, real)
    assert sorted(run.versions) == [0, 1] and {s.versioned_by for s in run.versions.values()} == {"dvc add"}
    assert not (workspace / ".dvc" / "cache").exists()
    parts = [p for s in run.versions.values() for p in s.parts]
    assert all((shared / "files" / "md5" / p.md5[:2] / p.md5[2:]).is_file() for p in parts)
    assert all(cache_path(workspace, p.md5).parent.parent.parent.parent == shared for p in parts)
    links = [(workspace / s.path / p.relpath).is_symlink() for s in run.versions.values() for p in s.parts]
    assert all(links) if cache_type == "symlink" else not any(links)
    originals = [(workspace / s.path / p.relpath).read_bytes() for s in run.versions.values() for p in s.parts]
    shutil.rmtree(workspace / "data" / "runs" / run.run_id)
    restored = restore_run_data(run.run_id, tmp_path / "restored", tracking_uri=cfg.tracking.uri)
    assert [p.read_bytes() for p in restored] == originals


def test_a_dvc_failure_while_versioning_is_one_line(dvc_workspace, tiny_generator, real, mlflow_store):
    """DVC refusing `dvc add` (here: the shards folder is already a dvc.yaml stage's output) stops
    the run with one DataError line naming the workspace and DVC's reason, not DVC's traceback."""
    workspace = dvc_workspace(with_generator=False, here=True).path
    (workspace / "dvc.yaml").write_text("stages:\n  made:\n    cmd: 'true'\n    outs:\n      - data/runs\n")
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_store(workspace)}, dp={"max_rounds": 0}))
    with pytest.raises(DataError) as err:
        run_tracked(cfg, tiny_generator, real)
    line = str(err.value)
    assert line.startswith(f"DVC in {workspace}: ") and "overlaps with an output of stage: 'made'" in line
    assert "\n" not in line


def test_a_dvc_workspace_outside_git_is_refused_before_any_work_unless_it_sets_no_scm(
    dvc_workspace, tiny_generator, real, mlflow_store
):
    """`dvc add` needs git for its .dvc file: a DVC workspace with no git repository at or above it (a copied
    folder, a .git left behind) is one line before any work, not a failure at round 0 after the generator
    loaded; with `core.no_scm` set (`dvc init --no-scm`) it runs and versions every round."""
    workspace = dvc_workspace(with_generator=False, here=True).path
    shutil.rmtree(workspace / ".git")
    cfg = build_config(tiny_tree(tracking={"uri": mlflow_store(workspace)}, dp={"max_rounds": 1}))
    with pytest.raises(DataError) as err:
        preflight(cfg)
    assert str(err.value) == (
        f"DVC workspace {workspace}: not inside a git repository and its DVC config does not set core.no_scm, so "
        "no round could be versioned; run git init there, or dvc config core.no_scm true"
    )
    assert not (workspace / "data").exists() and not (workspace / "checkpoints").exists()
    _sh(sys.executable, "-m", "dvc", "config", "core.no_scm", "true", cwd=workspace)
    preflight(cfg)
    run = run_tracked(cfg, tiny_generator, real)
    assert sorted(p.name for p in (workspace / "data" / "runs").glob("*.dvc")) == [f"{run.run_id}.dvc"]
    assert len(run.versions) == 2


def test_the_push_hint_says_what_a_clone_needs_pushed(dvc_workspace, monkeypatch, tmp_path):
    """A run's data (or a stage's outputs) that never reached a remote fails a clone's dvc pull: the hint
    says what to push."""
    from dp_ops.records.versioning import DvcVersioner, push_hint

    workspace = dvc_workspace(with_generator=False, here=True).path
    run = workspace / "data" / "runs" / "r1"
    (run / "round_000").mkdir(parents=True)
    (run.parent / "r1.dvc").write_text("outs: []\n")
    added = DvcVersioner(run)
    assert added.push_hint() == (
        "to share this run's data: dvc remote add -d <name> <url>, then dvc push data/runs/r1.dvc "
        "(a clone's dvc pull needs it)"
    )
    assert push_hint(workspace) is None  # (outside a stage with nothing versioned: nothing to push)
    _sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(tmp_path / "remote"), cwd=workspace)
    assert added.push_hint() is None  # (each round is pushed to the default remote as it is made)
    monkeypatch.setenv("DVC_STAGE", "dp")
    assert DvcVersioner(run).push_hint() == (
        "to share this stage's outputs: dvc push once DVC has finished (a clone's dvc pull needs them)"
    )
    assert push_hint(None) is None
