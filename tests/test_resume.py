"""Kill a real `dpops run` with SIGKILL mid-run, resume it, and get the uninterrupted numbers."""

import json
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from dp_ops.config import load_config
from dp_ops.records.tracking import MlflowTracker, Registry
from dp_ops.records.versioning import md5_file

DPOPS = [sys.executable, "-m", "dp_ops"]
TIMINGS = {"gen_seconds", "train_seconds"}


def _strip(rounds):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rounds]


@pytest.fixture
def workspace(dvc_workspace):
    """A git + DVC workspace with the tiny generator and a run of a few rounds."""
    return dvc_workspace(train={"iterations": 160, "eval_every": 10}, dp={"max_rounds": 4})


def _dpops(ws, env, *args, **kw):
    return subprocess.Popen(
        [*DPOPS, *args], cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_equals_uninterrupted(workspace):
    ws, env = workspace
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

    victim = _dpops(ws, env, "run")
    runs = ws / "data" / "runs"
    deadline = time.time() + 600
    while not list(runs.glob("*/round_001/part_*.safetensors")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed: " + victim.stdout.read()
    victim.send_signal(signal.SIGKILL)  # in round 1's bookkeeping, before its checkpoint
    victim.wait(timeout=60)
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dp-ops")
    running = client.search_runs(
        [exp.experiment_id], "attributes.status = 'RUNNING' and tags.`dpops.role` = 'experiment'"
    )
    (run,) = running  # SIGKILL leaves the parent RUNNING: exactly the run to resume
    run_id = run.info.run_id
    (lost,) = (runs / run_id / "round_000").glob("part_*.safetensors")
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
    children = Registry(f"sqlite:///{ws / 'mlflow.db'}").round_runs(run_id)
    assert [c.round for c in children] == list(range(len(ref_rounds["rounds"])))
    assert all(c.status == "FINISHED" for c in children)
    assert [r["omega"] for r in got_rounds["rounds"]] == [0.0] + [0.1] * (len(children) - 1)  # the records' ω
    (entry,) = Registry(f"sqlite:///{ws / 'mlflow.db'}").round_parts(children[:1])[0]
    assert md5_file(lost) == entry["md5"]  # the lost part came back byte for byte


@pytest.mark.slow
def test_resume_refuses_a_finished_run(workspace):
    ws, env = workspace
    cfg = load_config(ws / "params.yaml", [f"tracking.uri=sqlite:///{ws / 'mlflow.db'}"])
    tracker = MlflowTracker(Registry.from_config(cfg), cfg)  # a dp_ops parent run, as `dpops run` opens it,
    with tracker.lifecycle():  # ended FINISHED (what its rounds were does not matter here)
        pass
    again = _dpops(ws, env, "run", "--resume", tracker.run_id)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 1 and "already FINISHED; nothing to resume" in out
