"""Kill a real `dpops run` with SIGKILL mid-run, resume it, and get the uninterrupted numbers."""

import json
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from dp_ops.config import load_config
from dp_ops.records.tracking import MlflowTracker, TrackingStore
from dp_ops.records.versioning import md5_file
from dp_ops.resume import elastic_run_name, name_safe

DPOPS = [sys.executable, "-m", "dp_ops"]
TIMINGS = {"gen_seconds", "train_seconds"}


def _strip(rounds):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rounds]


# The workspaces' runs (dvc_workspace sections): a few rounds; ...
FEW_ROUNDS = {"train": {"iterations": 160, "eval_every": 10}, "dp": {"max_rounds": 4}}
# ... the same with round 0 in five parts of 8 (so that each can be damaged its own way); ...
PARTED = {**FEW_ROUNDS, "generator": {"batch_size": 8}, "data": {"resolution": 8, "part_size": 8}}
# ... two rounds after round 0.
SHORT = {"dp": {"max_rounds": 2}}


def _dpops(ws, env, *args, **kw):
    return subprocess.Popen(
        [*DPOPS, *args], cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def test_a_torchrun_groups_run_name_is_a_valid_run_name():
    assert elastic_run_name("job/42:a") == "torchrun-job-42-a"  # (restarts of the group share it)
    assert name_safe("..x") == "x" and name_safe("//") == "run"


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_equals_uninterrupted(dvc_workspace):
    ws, env = dvc_workspace(**FEW_ROUNDS)
    ref = _dpops(
        ws,
        env,
        "run",
        "-S",
        "output.metrics=ref/metrics.json",
        "-S",
        "output.rounds=ref/rounds.json",
        "-S",
        "output.curve=ref/curve.json",
        "-S",
        "output.shards=ref/runs",
        "-S",
        "output.checkpoints=ref/checkpoints",
    )
    assert ref.wait(timeout=600) == 0, ref.stdout.read()

    killed, folder = _kill_after_round_0(ws, env)  # in round 1's bookkeeping, before its checkpoint
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dp-ops")
    running = client.search_runs(
        [exp.experiment_id], "attributes.status = 'RUNNING' and tags.`dpops.role` = 'experiment'"
    )
    (run,) = running  # SIGKILL leaves the parent RUNNING: exactly the run to resume
    run_id = run.info.run_id
    assert run_id == killed
    (lost,) = folder.glob("part_*.safetensors")
    lost.unlink()  # a checkpointed round's part is gone from the workspace: resume restores it from the DVC cache

    resumed = _dpops(ws, env, "run", "--resume", run_id)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "Downloading artifacts" not in out  # (MLflow's tqdm bars for the rounds' parts listings: kept off)

    ref_rounds = json.loads((ws / "ref" / "rounds.json").read_text())
    got_rounds = json.loads((ws / "rounds.json").read_text())
    assert _strip(got_rounds["rounds"]) == _strip(ref_rounds["rounds"])
    assert json.loads((ws / "curve.json").read_text()) == json.loads((ws / "ref" / "curve.json").read_text())
    ref_m, got_m = (json.loads(p.read_text()) for p in (ws / "ref" / "metrics.json", ws / "metrics.json"))
    assert {k: v for k, v in got_m.items() if k not in TIMINGS} == {k: v for k, v in ref_m.items() if k not in TIMINGS}

    assert client.get_run(run_id).info.status == "FINISHED"
    children = TrackingStore(f"sqlite:///{ws / 'mlflow.db'}").round_runs(run_id)
    assert [c.round for c in children] == list(range(len(ref_rounds["rounds"])))
    assert all(c.status == "FINISHED" for c in children)
    assert [r["omega"] for r in got_rounds["rounds"]] == [0.0] + [0.1] * (len(children) - 1)  # the records' ω
    (entry,) = TrackingStore(f"sqlite:///{ws / 'mlflow.db'}").round_parts(children[:1])[0]
    assert md5_file(lost) == entry["md5"]  # the lost part came back byte for byte


@pytest.mark.slow
def test_resume_refuses_a_finished_run(dvc_workspace):
    ws, env = dvc_workspace(**FEW_ROUNDS)
    cfg = load_config(ws / "params.yaml", [f"tracking.uri=sqlite:///{ws / 'mlflow.db'}"])
    tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg)  # a dp_ops parent run, as `dpops run` opens it,
    with tracker.lifecycle():  # ended FINISHED (what its rounds were does not matter here)
        pass
    again = _dpops(ws, env, "run", "--resume", tracker.run_id)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 1 and "already FINISHED; nothing to resume" in out


def _flip(path, where, value=None):
    """One byte of a part changed in place, as a disk or a hand would: ``where`` is a byte offset (the
    file's inode stays; its mtime moves, so DVC's state database no longer answers for it)."""
    data = bytearray(path.read_bytes())
    data[where] = (data[where] ^ 0xFF) if value is None else value
    path.write_bytes(bytes(data))


def _offset(path, tensor):
    from dp_ops.engine.shards import read_header

    header, start = read_header(path)
    return start + header[tensor]["data_offsets"][0]


def _kill_after_round_0(ws, env):
    """A `dpops run` SIGKILLed in round 1 (round 0 checkpointed): its run id and its round-0 folder."""
    victim = _dpops(ws, env, "run")
    runs = ws / "data" / "runs"
    deadline = time.time() + 600
    while not list(runs.glob("*/round_001/part_*.safetensors")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed: " + victim.stdout.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    (folder,) = runs.glob("*/round_000")
    return folder.parent.name, folder


@pytest.mark.slow
def test_resume_restores_parts_whose_bytes_changed_and_ends_as_the_uninterrupted_run(dvc_workspace):
    ws, env = dvc_workspace(**PARTED)
    outs = ["metrics", "rounds", "curve", "shards", "checkpoints"]
    where = {"metrics": "ref/metrics.json", "rounds": "ref/rounds.json", "curve": "ref/curve.json"}
    ref = _dpops(ws, env, "run", *(a for k in outs for a in ("-S", f"output.{k}={where.get(k, 'ref/' + k)}")))
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    run_id, folder = _kill_after_round_0(ws, env)
    parts = sorted(folder.glob("part_*.safetensors"))
    (listing,) = (
        TrackingStore(f"sqlite:///{ws / 'mlflow.db'}")
        .round_parts([c for c in TrackingStore(f"sqlite:///{ws / 'mlflow.db'}").round_runs(run_id) if c.round == 0])
        .values()
    )
    recorded = {e["relpath"]: e["md5"] for e in listing}
    assert len(parts) == 5 and all(md5_file(p) == recorded[p.name] for p in parts)
    _flip(parts[0], _offset(parts[0], "images") + 3)  # an image byte: trained on silently before
    _flip(parts[1], _offset(parts[1], "labels") + 7)  # a label's high byte: a label of -2⁵⁶-ish
    _flip(parts[2], 20, 0xFF)  # a header byte: no longer UTF-8

    resumed = _dpops(ws, env, "run", "--resume", run_id)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "Traceback" not in out
    assert all(md5_file(p) == recorded[p.name] for p in parts)  # the store's bytes, back from the cache
    got, want = (json.loads(p.read_text()) for p in (ws / "rounds.json", ws / "ref" / "rounds.json"))
    assert _strip(got["rounds"]) == _strip(want["rounds"])
    assert json.loads((ws / "curve.json").read_text()) == json.loads((ws / "ref" / "curve.json").read_text())
    ref_m, got_m = (json.loads(p.read_text()) for p in (ws / "ref" / "metrics.json", ws / "metrics.json"))
    assert {k: v for k, v in got_m.items() if k not in TIMINGS} == {k: v for k, v in ref_m.items() if k not in TIMINGS}


@pytest.mark.slow
def test_a_changed_part_no_copy_of_which_is_left_stops_the_resume_in_one_line(dvc_workspace):
    from dp_ops.records.versioning import cache_path

    ws, env = dvc_workspace(**PARTED)
    run_id, folder = _kill_after_round_0(ws, env)
    part = folder / "part_00001.safetensors"
    cache_path(ws, md5_file(part)).unlink()  # the cache's copy gone too (and no remote)
    _flip(part, _offset(part, "labels") + 7)
    resumed = _dpops(ws, env, "run", "--resume", run_id)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 1, out
    assert "Traceback" not in out and "IndexError" not in out
    (line,) = [line for line in out.splitlines() if "not in the DVC cache" in line]
    assert line.endswith("and no remote has it")


@pytest.mark.slow
def test_output_locations_given_on_resume_win_and_finished_rounds_are_found_there(dvc_workspace):
    """-S output.* on --resume is where this machine's files go: it wins over the store's values (said in
    one note naming both), the finished rounds' parts are restored into the new shards folder from DVC, and
    the reports land where -S says."""
    ws, env = dvc_workspace(**FEW_ROUNDS)
    run_id, _ = _kill_after_round_0(ws, env)
    moved = ["output.shards=moved/runs", "output.metrics=moved/metrics.json", "output.rounds=moved/rounds.json"]
    resumed = _dpops(ws, env, "run", *(a for o in moved for a in ("-S", o)), "--resume", run_id)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "ignored" not in out and "Traceback" not in out
    (note,) = [line for line in out.splitlines() if line.startswith("note: --resume")]
    assert "output.shards='moved/runs' (the run's: 'data/runs')" in note
    rounds = json.loads((ws / "moved" / "rounds.json").read_text())
    assert rounds["run_id"] == run_id and (ws / "moved" / "metrics.json").is_file()
    assert not (ws / "rounds.json").exists()
    store = TrackingStore(f"sqlite:///{ws / 'mlflow.db'}")
    listings = store.round_parts(store.round_runs(run_id))
    for k, listing in listings.items():  # every round, round 0 restored from the DVC cache, has its recorded bytes
        folder = ws / "moved" / "runs" / run_id / f"round_{k:03d}"
        assert {e["relpath"]: md5_file(folder / e["relpath"]) for e in listing} == {
            e["relpath"]: e["md5"] for e in listing
        }
    assert len(listings) == len(rounds["rounds"])


@pytest.mark.slow
def test_the_same_command_with_a_run_name_resumes_its_run_then_does_nothing(dvc_workspace):
    """What a requeued batch job does: ``dpops run --run-name NAME`` SIGKILLed in round 1 resumes that run when
    started again (a resumed run equals the uninterrupted one: the test above); started once more after it
    finished, it does nothing; with another config under the name, it refuses in one line."""
    ws, env = dvc_workspace(**SHORT)
    job = [*DPOPS, "run", "--run-name", "job-7"]
    victim = subprocess.Popen(job, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs, deadline = ws / "data" / "runs", time.time() + 600
    while not list(runs.glob("*/round_001/part_*.safetensors")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed: " + victim.stdout.read()
    victim.send_signal(signal.SIGKILL)  # (the lease's holder is gone: a requeue takes it over)
    victim.wait(timeout=60)
    (killed,) = [p for p in runs.iterdir() if p.is_dir()]

    other = subprocess.run([*job, "-S", "dp.omega=0.2"], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert other.returncode == 1, other.stdout + other.stderr
    assert other.stderr.strip().splitlines() == [
        f"error: tracking.run_name='job-7': run {killed.name} of that name ran another config (dp.omega=0.2 (the "
        f"run's: 0.1)); name this one otherwise, or continue that run with its own config: dpops run --resume "
        f"{killed.name}"
    ], other.stderr

    again = subprocess.run(job, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dp-ops")
    (run,) = client.search_runs([exp.experiment_id], "tags.`dpops.run_name` = 'job-7'")
    assert run.info.status == "FINISHED" and run.info.run_name == "job-7" and run.info.run_id == killed.name
    assert f"MLflow run {run.info.run_id}" in again.stdout
    rounds = json.loads((ws / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(len(rounds))) and len(rounds) >= 2
    assert len(TrackingStore(f"sqlite:///{ws / 'mlflow.db'}").round_runs(run.info.run_id)) == len(rounds)

    done = subprocess.run(job, cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == (
        f"run {run.info.run_id} named 'job-7' in experiment 'dp-ops' already FINISHED; nothing to do"
    ), done.stdout + done.stderr
    other = subprocess.run([*job, "-S", "dp.omega=0.2"], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert other.returncode == 0 and "already FINISHED" in other.stdout  # (finished: nothing to compare)
    assert len(client.search_runs([exp.experiment_id], "tags.`dpops.run_name` = 'job-7'")) == 1
