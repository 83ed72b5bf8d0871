"""`dpops sweep` workers on real services: a PostgreSQL server holding the Optuna study and an `mlflow server`
backed by a PostgreSQL database of its own, both started here from the commands of the README's scale-out
section, read from README.md and run as they are (their first line gets this test's folder and ports)."""

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from dp_ops.studies.sweep import counted_trials, retried_trials

from conftest import outputs_in, write_tiny_params

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Scale-out: sweep workers on PostgreSQL and an MLflow server"
PLACEHOLDERS = ("SERVICES", "PGPORT", "MLFLOW_PORT")  # what the test gives the block's first line
AS_POSTGRES = ("initdb", "pg_ctl")  # PostgreSQL refuses to run as root


def readme_commands() -> list[str]:
    """The lines of the fenced shell block in the README's scale-out section."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for line in block.splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _initdb_installed() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


class Services:
    """The README's block, run command by command with one environment: the exports, then the database,
    then the MLflow server in the background; :meth:`worker` starts the block's ``dpops sweep`` line."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.commands = readme_commands()
        exports, rest = self.commands[:2], self.commands[2:]
        assert all(c.startswith("export ") for c in exports), exports
        self.values = {"SERVICES": str(root), "PGPORT": str(_free_port()), "MLFLOW_PORT": str(_free_port())}
        self.env = self._exported(exports)
        *server, self.mlflow_line, self.worker_line = rest
        assert self.mlflow_line.startswith("mlflow server ") and self.worker_line.startswith("dpops sweep "), rest
        self.server_lines = server
        self.mlflow: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.pg_started = False

    def _exported(self, exports: list[str]) -> dict[str, str]:
        """Run the export lines in bash with this test's values for the placeholders; read back the environment."""
        first = exports[0]
        for name in PLACEHOLDERS:
            first, n = re.subn(rf"\b{name}=\S+", f"{name}={self.values[name]}", first)
            assert n == 1, f"the README's first line sets no {name}: {exports[0]}"
        base = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # mlflow, dpops
        script = "\n".join([first, *exports[1:], "env -0"])
        out = subprocess.run(["bash", "-c", script], env=base, capture_output=True, check=True).stdout
        return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)

    def _run(self, line: str) -> None:
        cmd = ["bash", "-c", line]
        if line.split()[0] in AS_POSTGRES and os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"

    def start(self) -> None:
        for line in self.server_lines:
            self._run(line)
            self.pg_started |= line.startswith("pg_ctl ")
        log = (self.root / "mlflow.log").open("w")
        self.mlflow = subprocess.Popen(
            ["bash", "-c", self.mlflow_line],
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_for_mlflow()

    def _wait_for_mlflow(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.mlflow is not None and self.mlflow.poll() is None, (self.root / "mlflow.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as r:
                    if r.read().strip() == b"OK":
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server not up in time:\n" + (self.root / "mlflow.log").read_text())

    def stop(self) -> None:
        for w in self.workers:  # a test that failed half-way may have left one running
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait(timeout=30)
        if self.mlflow is not None:
            os.killpg(self.mlflow.pid, signal.SIGTERM)  # the server and its uvicorn workers: its own group
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.mlflow.wait(timeout=3)  # (uvicorn would wait out open connections; the data is in PostgreSQL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.mlflow.pid, signal.SIGKILL)  # whatever of the group is left
            self.mlflow.wait(timeout=30)
        if self.pg_started:
            self._run("pg_ctl --mode=immediate --wait stop")

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.values['MLFLOW_PORT']}"

    def storage(self, database: str = "optuna") -> str:
        e = self.env
        return f"postgresql+psycopg://{e['PGUSER']}@{e['PGHOST']}:{e['PGPORT']}/{database}"

    def worker(self, ws: Path) -> subprocess.Popen:
        """The README's worker line, run in the workspace ``ws`` (its params.yaml holds the tiny settings)."""
        env = {**self.env, "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1", "COLUMNS": "200"}
        w = subprocess.Popen(
            ["bash", "-c", self.worker_line],
            cwd=ws,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.workers.append(w)
        return w


@pytest.fixture(scope="module")
def services():
    if not _initdb_installed():
        if os.environ.get("CI"):
            pytest.fail("initdb not found: .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL's initdb is not installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="dpops-services-"))  # not under pytest's root-only tmp: postgres writes here
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    s = Services(root)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(root, ignore_errors=True)


def _workspace(path: Path, generator: Path, study: str, **sweep) -> Path:
    """A folder with a tiny params.yaml (its study, its budget) and no stores: they are the services."""
    space = {
        "omega": {"low": 0.05, "high": 0.5},
        "patience": {"low": 1, "high": 2},
        "round_size": {"low": 10, "high": 30, "step": 10},
    }
    write_tiny_params(
        path,
        generator={"path": str(generator)},
        output=outputs_in(path / "out"),
        sweep={**space, "study": study, **sweep},
    )
    return path


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tiny_generator):
    folder = tmp_path_factory.mktemp("services-gen") / "gen"
    tiny_generator.save(folder)
    return folder


def _experiment_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'experiment'")


def test_the_readme_block_is_what_runs_here():
    commands = readme_commands()
    assert any(c.startswith("initdb ") for c in commands) and any(c.startswith("pg_ctl ") for c in commands)
    assert {c for c in commands if c.startswith("createdb ")} == {"createdb optuna", "createdb mlflow"}
    assert "--backend-store-uri postgresql+psycopg://$PGUSER@$PGHOST:$PGPORT/mlflow" in commands[-2]
    assert commands[-1] == (
        "dpops sweep --storage postgresql+psycopg://$PGUSER@$PGHOST:$PGPORT/optuna "
        "-S tracking.uri=http://127.0.0.1:$MLFLOW_PORT"
    )


@pytest.mark.slow
def test_two_workers_on_postgresql_and_an_mlflow_server_share_one_budget(services, generator, tmp_path):
    ws = _workspace(tmp_path / "ws", generator, "shared", n_trials=3, stale_after=30)
    workers = [services.worker(ws) for _ in range(2)]
    outputs = [w.communicate(timeout=400)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(outputs)
    trials = optuna.load_study(study_name="shared", storage=services.storage()).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and len(counted_trials(trials)) == 3, [(t.number, t.state) for t in trials]
    assert all(t.user_attrs.get("dpops.over_budget") for t in trials if t.state != TrialState.COMPLETE)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]  # none stuck
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3  # no duplicated configuration
    run_ids = [t.user_attrs["dpops.mlflow_run_id"] for t in complete]
    runs = _experiment_runs(MlflowClient(services.tracking_uri), "shared")
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids)  # one run per trial, on the server
    assert all(r.info.status == "FINISHED" for r in runs)
    ran = [int(o.split("this worker ran ")[1].split(" ")[0]) for o in outputs]
    assert sum(ran) == 3, outputs


@pytest.mark.slow
def test_a_sigkilled_worker_is_failed_by_optunas_heartbeat_and_the_retry_resumes_its_mlflow_run(
    services, generator, tmp_path
):
    ws = _workspace(tmp_path / "ws", generator, "killed", n_trials=1, stale_after=3)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["iterations"], params["dp"]["max_rounds"] = 160, 4
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    checkpoints = ws / "out" / "checkpoints"
    victim = services.worker(ws)
    deadline = time.time() + 300
    while not list(checkpoints.glob("*/state.pt")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the trial finished before it could be killed: " + victim.stdout.read()
    os.killpg(victim.pid, signal.SIGKILL)  # no handler runs: the trial stays RUNNING in Optuna and in MLflow
    victim.wait(timeout=60)
    (killed_run,) = [p.name for p in checkpoints.iterdir()]
    time.sleep(3.5)  # past sweep.stale_after: Optuna's heartbeat has stopped for longer than its grace period

    again = services.worker(ws)
    out = again.communicate(timeout=400)[0]
    assert again.returncode == 0, out
    trials = optuna.load_study(study_name="killed", storage=services.storage()).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], out
    assert retried_trials(trials[1]) == [0] and trials[1].params == trials[0].params
    assert len(counted_trials(trials)) == 1  # the retry took the killed trial's place in the budget
    assert trials[1].user_attrs["dpops.mlflow_run_id"] == killed_run  # resumed, not started over
    client = MlflowClient(services.tracking_uri)
    (run,) = _experiment_runs(client, "killed")
    assert run.info.run_id == killed_run and run.info.status == "FINISHED" and run.data.tags["dpops.trial"] == "1"
    rounds = client.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{killed_run}' and tags.`dpops.role` = 'round'"
    )
    numbers = sorted(int(r.data.tags["dpops.round"]) for r in rounds)
    assert numbers == list(range(len(numbers))) and len(numbers) >= 2  # every round once, none duplicated
