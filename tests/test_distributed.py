"""One run on two processes: real `torchrun --standalone --nproc-per-node 2 -m dp_ops run` on gloo (CPU).

A 2-rank run is compared with a 1-rank run of 2 micro-batches (what a 2-rank run computes by default):
every round's DVC digest, the round records and the validation curve must be equal. The rounds are cut
into an uneven number of parts (5 for round 0 on 2 ranks), validation into 6 chunks of 64 (each rank
scores its own), and the rounds after round 0 are entropy-guided.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import optuna
import psutil
import pytest
from mlflow import MlflowClient

from dp_ops.config import build_config, run_files
from dp_ops.records.tracking import TrackingStore
from dp_ops.studies.sweep import make_storage

from conftest import make_dvc_workspace, tiny_tree

DPOPS = [sys.executable, "-m", "dp_ops"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dp_ops"]
TIMINGS = {"gen_seconds", "train_seconds"}
SECTIONS = {  # (of the workspace's params.yaml)
    "data": {"resolution": 8, "part_size": 32},
    "generator": {"batch_size": 16},
    "dp": {"initial_size": 160, "round_size": 96, "max_rounds": 2},  # parts: 5, then 3 per round
    "train": {"iterations": 80, "eval_every": 10, "batch_size": 16, "eval_batch_size": 64},  # 360 val: 6 chunks
}


def _strip(rounds):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rounds]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_generator, mlflow_template):
    """A git + DVC workspace with a migrated MLflow store and the tiny generator, shared by the module's runs
    (each writes its reports to its own folder); system metrics sampled every second."""
    ws, env = make_dvc_workspace(tmp_path_factory.mktemp("dist") / "ws", mlflow_template, tiny_generator, **SECTIONS)
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    return ws, env


def _start(ws, env, launcher, *args):
    return subprocess.Popen(
        [*launcher, *args],
        cwd=ws,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run(ws, env, launcher, name, *args):
    """A run whose metrics, rounds and checkpoints go to ``name/``; returns (its output, its MLflow run)."""
    proc = _start(ws, env, launcher, "run", *_files(name), *args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out, _report(ws, name)


def _files(name):
    """``-S`` options that put a run's report files in ``name/``."""
    return [x for o in run_files(name) for x in ("-S", o)]


def _report(ws, name):
    """The round records and the validation curve a run wrote in ``name/``."""
    rounds = json.loads((ws / name / "rounds.json").read_text())["rounds"]
    return {"rounds": rounds, "curve": json.loads((ws / name / "curve.json").read_text())}


def _experiment_runs(ws):
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    return client, client.search_runs(
        [client.get_experiment_by_name("dp-ops").experiment_id], "tags.`dpops.role` = 'experiment'"
    )


def _digests(ws, run_id):
    return [r.tags["dpops.shard_md5"] for r in TrackingStore(f"sqlite:///{ws / 'mlflow.db'}").round_runs(run_id)]


def _run_id(out):
    return next(line.split()[2] for line in out.splitlines() if line.startswith("MLflow run "))


@pytest.fixture(scope="module")
def one_rank(workspace):
    """The reference: 1 process computing each iteration's batch as 2 accumulated micro-batches."""
    ws, env = workspace
    out, rounds = _run(ws, env, DPOPS, "one", "-S", "train.micro_batches=2")
    return _run_id(out), rounds


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_two_micro_batches(workspace, one_rank):
    ws, env = workspace
    ref_id, ref = one_rank
    before = {r.info.run_id for r in _experiment_runs(ws)[1]}
    out, got = _run(ws, env, TORCHRUN, "two")  # train.micro_batches=0: one per process, so 2
    run_id = _run_id(out)

    assert _digests(ws, run_id) == _digests(ws, ref_id)  # every round's parts, byte for byte
    assert len(_digests(ws, run_id)) == 3
    assert _strip(got["rounds"]) == _strip(ref["rounds"]) and got["curve"] == ref["curve"]
    assert [r["omega"] for r in got["rounds"]] == [0.0, 0.1, 0.1]  # guided rounds

    # one writer: one new parent run (FINISHED), one child per round, one checkpoint, one progress display
    client, runs = _experiment_runs(ws)
    (new,) = [r for r in runs if r.info.run_id not in before]
    assert new.info.run_id == run_id and new.info.status == "FINISHED"
    assert new.data.params["train.micro_batches"] == "2"  # recorded resolved: resumable on any world size
    assert [c.round for c in TrackingStore(f"sqlite:///{ws / 'mlflow.db'}").round_runs(run_id)] == [0, 1, 2]
    assert [p.name for p in (ws / "checkpoints" / run_id).iterdir()] == ["state.pt"]
    assert out.count("MLflow run ") == 1 and "error" not in out.lower()
    assert [len(list((ws / "data" / "runs" / run_id / f"round_{k:03d}").glob("*.safetensors"))) for k in range(3)] == [
        5,
        3,
        3,
    ]
    # the node's system-metrics monitor (local rank 0 of node 0) logged to the parent run
    assert any(k.startswith("system/node0/") for k in client.get_run(run_id).data.metrics)


@pytest.mark.slow
def test_two_nodes_through_a_c10d_rendezvous_equal_one_rank(workspace, one_rank):
    """Two torchrun agents ("nodes", one process each) meet at a c10d rendezvous endpoint, as on a cluster."""
    ws, env = workspace
    ref_id, ref = one_rank
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    node += [
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "dpops-test",
        "-m",
        "dp_ops",
    ]
    args = ["run", *_files("nodes")]
    agents = [_start(ws, env, node, *args) for _ in range(2)]
    outs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs
    (out,) = [o for o in outs if "MLflow run " in o]  # rank 0's node reports; the other says nothing
    run_id = _run_id(out)
    got = _report(ws, "nodes")
    assert _digests(ws, run_id) == _digests(ws, ref_id)
    assert _strip(got["rounds"]) == _strip(ref["rounds"]) and got["curve"] == ref["curve"]
    metrics = _experiment_runs(ws)[0].get_run(run_id).data.metrics
    assert {k.split("/")[1] for k in metrics if k.startswith("system/")} == {"node0", "node1"}  # one monitor per node


@pytest.mark.slow
def test_oversample_on_two_ranks_keeps_what_one_rank_keeps(workspace):
    ws, env = workspace
    args = ("-S", "dp.strategy=oversample", "-S", "dp.max_rounds=1")  # 288 candidates: 9 parts, 3 kept
    one_out, one = _run(ws, env, DPOPS, "over1", *args, "-S", "train.micro_batches=2")
    two_out, two = _run(ws, env, TORCHRUN, "over2", *args)
    assert _digests(ws, _run_id(two_out)) == _digests(ws, _run_id(one_out))
    assert _strip(two["rounds"]) == _strip(one["rounds"]) and two["curve"] == one["curve"]
    assert [r["n_generated"] for r in two["rounds"]] == [160, 288]
    assert not list((ws / "data" / "runs" / _run_id(two_out)).glob("*.candidates"))  # the scratch folder is gone


@pytest.mark.slow
def test_sigkill_of_two_ranks_then_resume_on_one_equals_uninterrupted(workspace, one_rank):
    ws, env = workspace
    _, ref = one_rank
    before = {r.info.run_id for r in _experiment_runs(ws)[1]}
    victim = _start(ws, env, TORCHRUN, "run", *_files("kill"))
    runs, deadline, found = ws / "data" / "runs", time.time() + 300, []
    while not found and victim.poll() is None and time.time() < deadline:
        found = [p for p in runs.glob("*/round_001/part_*.safetensors") if p.parts[-3] not in before]
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed: " + victim.stdout.read()
    tree = [victim.pid] + [c.pid for c in psutil.Process(victim.pid).children(recursive=True)]
    for pid in tree:  # torchrun and both ranks (torchrun starts them in sessions of their own), in round 1
        os.kill(pid, signal.SIGKILL)
    victim.wait(timeout=60)
    run_id = found[0].parts[-3]
    assert _experiment_runs(ws)[0].get_run(run_id).info.status == "RUNNING"

    resumed = _start(ws, env, DPOPS, "run", "--resume", run_id)  # one process now
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    got = _report(ws, "kill")
    assert _strip(got["rounds"]) == _strip(ref["rounds"]) and got["curve"] == ref["curve"]
    client, _ = _experiment_runs(ws)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [c.round for c in TrackingStore(f"sqlite:///{ws / 'mlflow.db'}").round_runs(run_id)] == [0, 1, 2]


def _rank_pids(launcher_pid):
    """The worker processes of a torchrun launcher, by their RANK."""
    ranks = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        rank = child.environ().get("RANK")
        if rank is not None and child.environ().get("LOCAL_RANK") is not None:
            ranks[int(rank)] = child.pid
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["alive", "slow", "dead"])
def test_a_rank_killed_in_training_leaves_rank_0_saying_how_to_resume(workspace, tmp_path, launcher):
    """SIGKILL of rank 1 while round 0 trains: rank 0 says in one line that the run stopped and how to resume
    it, whether torchrun stops it with SIGTERM first (``alive``: it watches its workers every 0.1 s), rank 0
    meets the dead peer in DDP's gloo all-reduce first (``slow``: torchrun looks every 30 s; the run ends
    FAILED), or torchrun was killed before (``dead``: rank 0 meets the dead peer, nobody sends SIGTERM)."""
    ws, env = workspace
    logs = tmp_path / "logs"
    watch = ["--monitor-interval", "30"] if launcher == "slow" else []
    command = [*TORCHRUN[:-2], *watch, "--log-dir", str(logs), "--redirects", "3", *TORCHRUN[-2:]]
    before = {p.name for p in (ws / "checkpoints").glob("*")}
    victim = _start(ws, env, command, "run", *_files("rankkill"))
    deadline, found = time.time() + 300, []
    while not found and victim.poll() is None and time.time() < deadline:
        found = [p for p in (ws / "checkpoints").glob("*/state.pt") if p.parts[-2] not in before]
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed: " + victim.stdout.read()
    run_id, ranks = found[0].parts[-2], _rank_pids(victim.pid)
    rank0 = psutil.Process(ranks[0])
    if launcher == "dead":
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    os.kill(ranks[1], signal.SIGKILL)
    rank0.wait(timeout=180)
    victim.wait(timeout=180)

    (err,) = logs.glob("*/attempt_0/0/stderr.log")
    lines = [line for line in err.read_text().splitlines() if line.strip()]
    assert "Traceback" not in err.read_text(), err.read_text()
    assert len(lines) == 1 and "dpops run " in lines[0] and lines[0].endswith(f"--resume {run_id}"), lines
    status = _experiment_runs(ws)[0].get_run(run_id).info.status
    assert status == "FAILED" if launcher != "alive" else status in {"FAILED", "KILLED"}


@pytest.mark.slow
def test_a_batchnorm_learner_guided_over_uneven_parts_finishes(workspace):
    """Guidance runs through the unwrapped learner: through DDP's wrapper, rank 0's third part would wait
    forever in DDP's buffer broadcast for rank 1, which has only two parts to guide."""
    ws, env = workspace
    args = ("-S", "learner.model=test_efficientnet", "-S", "dp.initial_size=96", "-S", "dp.round_size=96")
    args += ("-S", "dp.max_rounds=1", "-S", "train.iterations=40")
    _, got = _run(ws, env, TORCHRUN, "bn", *args)
    assert [r["n_new"] for r in got["rounds"]] == [96, 96] and got["rounds"][1]["omega"] == 0.1


def test_micro_batches_that_the_processes_cannot_share_are_refused_before_work(workspace):
    ws, env = workspace
    proc = _start(ws, env, DPOPS, "run", "-S", "train.micro_batches=3")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert out.strip().splitlines()[-1] == "error: train.micro_batches=3: must divide train.batch_size=16"


def _study_runs(ws, experiment):
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    return client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], "tags.`dpops.role` = 'experiment'"
    )


@pytest.mark.slow
def test_a_sweep_worker_on_two_ranks_runs_the_trials_one_rank_runs(workspace):
    """Rank 0 asks and tells Optuna and hands each trial's config to rank 1: the same seeded study on one
    process (with 2 micro-batches) and on two gives the same trials, values and records."""
    ws, env = workspace
    space = ["-S", "sweep.omega.low=0.05", "-S", "sweep.omega.high=0.2"]
    space += ["-S", "sweep.patience.low=1", "-S", "sweep.patience.high=2"]
    space += ["-S", "sweep.round_size.low=32", "-S", "sweep.round_size.high=64", "-S", "sweep.round_size.step=32"]
    space += ["-S", "sweep.sampler_seed=0", "-S", "dp.max_rounds=1"]
    outcomes = {}
    for name, launcher, extra in (("one", DPOPS, ["-S", "train.micro_batches=2"]), ("two", TORCHRUN, [])):
        storage = ws / f"sweep-{name}.journal"
        args = ["sweep", "--n-trials", "2", "--study-name", f"s-{name}", "--storage", str(storage), *space, *extra]
        args += _files(f"sweep-{name}")
        proc = _start(ws, env, launcher, *args)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        study = optuna.load_study(study_name=f"s-{name}", storage=make_storage(str(storage)))
        outcomes[name] = [(t.state.name, t.params, t.values) for t in study.trials]
        runs = _study_runs(ws, f"s-{name}")
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
        assert {r.data.params["train.micro_batches"] for r in runs} == {"2"}
    assert outcomes["two"] == outcomes["one"] and [s for s, _, _ in outcomes["one"]] == ["COMPLETE", "COMPLETE"]


@pytest.mark.slow
def test_a_benchmark_on_two_ranks_runs_every_arm_across_both(workspace):
    ws, env = workspace
    args = ["bench", "--quick", "--seeds", "1", "--experiment", "bench-two", "--out", "bench-two"]
    args += ["-S", "sweep.static_sizes=[96,160]", "-S", "dp.max_rounds=1"]
    proc = _start(ws, env, TORCHRUN, *args)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "across 2 processes" in out
    report = json.loads((ws / "bench-two" / "bench.json").read_text())
    runs = _study_runs(ws, "bench-two")
    # static ×2, dp, dp at half its N and P, dp ω=0, oversample; then static at its best size with 2× the budget
    assert len(runs) == 7 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["train.micro_batches"] for r in runs} == {"2"}
    arms = [row["arm"] for row in report["rows"]]
    assert arms[:6] == ["static N=96", "static N=160", "dp ω=0.1", "dp N=80 P=48", "dp ω=0", "oversample r=4"]
    assert arms[6] in ("static N=96 2× iters", "static N=160 2× iters")


SCORE = """
import json, sys
from pathlib import Path

import torch
from dp_ops.config import build_config
from dp_ops.engine import dist
from dp_ops.engine.learner import Trainer, build_learner
from dp_ops.runner import load_real_data

cfg = build_config(json.loads(sys.argv[1]))
world = dist.join("cpu")
try:
    real = load_real_data(cfg, world)
    model = build_learner(cfg.learner, real.num_classes, 3, cfg.seed)
    model.load_state_dict(torch.load(Path(sys.argv[2]) / "learner.pt"))
    trainer = Trainer(model, cfg.train, cfg.seed, world=world)
    score = [len(real.val), trainer.accuracy(real.val), trainer.accuracy(real.test)]
    (Path(sys.argv[2]) / f"{world.rank}.json").write_text(json.dumps(score))
finally:
    dist.leave()
"""


@pytest.mark.slow
def test_folder_splits_read_in_blocks_score_what_one_process_scores(tmp_path, tiny_cfg):
    import torch

    from dp_ops.engine.folders import load_folder_data
    from dp_ops.engine.learner import Trainer, build_learner

    from conftest import make_image_folder

    make_image_folder(tmp_path / "val", per_class=7)  # 21 rows, chunks of 4: blocks of 12 and 9 rows
    make_image_folder(tmp_path / "test", per_class=3, seed=1)
    tree = tiny_tree(
        device="cpu",
        data={"name": "folder", "val_root": str(tmp_path / "val"), "test_root": str(tmp_path / "test")},
        generator={"backend": "sd", "model": "unused"},
        train={"eval_batch_size": 4},
    )
    cfg = build_config(tree)
    whole = load_folder_data(cfg.data)
    one = Trainer(build_learner(cfg.learner, 3, 3, cfg.seed), cfg.train, cfg.seed)
    one.train(whole.val, 1)  # (a learner half-way: right on some classes, wrong on others)
    torch.save(one.model.state_dict(), tmp_path / "learner.pt")
    expected = [one.accuracy(whole.val), one.accuracy(whole.test)]
    assert all(0 < a < 1 for a in expected)
    (tmp_path / "score.py").write_text(SCORE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*launch, str(tmp_path / "score.py"), json.dumps(tree), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [r[0] for r in ranks] == [21, 9]  # rank 1 read its block only (rank 0 logs the splits: whole)
    assert all(r[1:] == expected for r in ranks)  # and every rank scores the whole split, as one process does

    (tmp_path / "val" / "cat" / "0.png").write_bytes(b"not a png")  # in rank 0's block, not rank 1's
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    errors = [line for line in done.stderr.splitlines() if "DataError: " in line]
    assert done.returncode != 0 and len(errors) == 1 and errors[0].startswith("[rank0]"), done.stderr  # who read it
    assert "cat/0.png: unreadable image (data.val_root)" in errors[0]


@pytest.mark.slow
def test_a_worker_killed_under_max_restarts_is_restarted_and_the_group_resumes_the_run(workspace, one_rank):
    """``torchrun --max-restarts 1``: SIGKILL of rank 1 in round 1; torchrun stops rank 0 and restarts both,
    which find the run by its name (``torchrun-<rdzv id>``) and resume it from round 0's checkpoint: the job
    finishes by itself, as one MLflow run with one round run per round, equal to the uninterrupted run."""
    ws, env = workspace
    _, ref = one_rank
    runs = ws / "data" / "runs"
    before = {p.name for p in runs.glob("*")}  # (every run's folder so far, the other experiments' too)
    job = _start(ws, env, [*TORCHRUN[:-2], "--max-restarts", "1", *TORCHRUN[-2:]], "run", *_files("elastic"))
    deadline, found = time.time() + 300, []
    while not found and job.poll() is None and time.time() < deadline:
        found = [p for p in runs.glob("*/round_001/part_*.safetensors") if p.parts[-3] not in before]
        time.sleep(0.02)
    assert job.poll() is None, "the run finished before it could be killed: " + job.stdout.read()
    os.kill(_rank_pids(job.pid)[1], signal.SIGKILL)
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out
    client, _ = _experiment_runs(ws)
    run = client.get_run(found[0].parts[-3])  # the run the first group started ...
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("torchrun-")
    named = f"tags.`dpops.run_name` = '{run.info.run_name}'"
    assert len(client.search_runs([run.info.experiment_id], named)) == 1  # ... the only one of its name
    got = _report(ws, "elastic")
    assert _strip(got["rounds"]) == _strip(ref["rounds"]) and got["curve"] == ref["curve"]
    assert [c.round for c in TrackingStore(f"sqlite:///{ws / 'mlflow.db'}").round_runs(run.info.run_id)] == [0, 1, 2]
