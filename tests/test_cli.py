import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from dp_ops.cli import app

from conftest import tiny_tree

runner = CliRunner()


def _params(tmp_path, **sections):
    tree = tiny_tree(**sections)
    tree["generator"]["path"] = str(tmp_path / "gen")
    tree["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = tmp_path / "out"
    tree["output"] = {
        "metrics": str(out / "metrics.json"),
        "rounds": str(out / "rounds.json"),
        "curve": str(out / "curve.json"),
        "shards": str(out / "runs"),
        "checkpoints": str(out / "checkpoints"),
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_help_lists_commands():
    from typer.main import get_command

    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    # the first column of the Commands panel (its other rows continue a description), not a substring anywhere
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if "─ Commands " in line)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("╰"))
    listed = [line.strip("│ ").split()[0] for line in lines[start + 1 : end] if not line.startswith("│  ")]
    expected = ["run", "theory", "sweep", "bench", "scaling", "generator", "config", "data"]
    assert listed == list(get_command(app).commands) == expected, result.output


def test_version_is_the_package_version():
    from importlib.metadata import version

    from dp_ops import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"dpops {__version__}\n"
    assert version("dp_ops") == __version__  # the package metadata reads the same one source


@pytest.mark.slow
def test_run_trains_missing_generator_then_runs_and_writes_metrics(tmp_path, mlflow_store):
    import torch
    from mlflow import MlflowClient

    mlflow_store(tmp_path)  # the store _params names, already migrated
    params = _params(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # (what the command must change: more threads than tests run with)
    try:
        result = runner.invoke(app, ["run", "--params", str(params), "-S", "dp.omega=0.2", "-S", "threads=1"])
        assert torch.get_num_threads() == 1  # the key's count, given to torch
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    (recorded,) = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        ["1"], "tags.`dpops.role` = 'experiment'"
    )
    assert recorded.data.tags["dpops.torch_threads"] == "1" and recorded.data.params["threads"] == "1"
    assert "training one first" in result.output and "final val acc" in result.output
    assert "MLflow run" in result.output and "mlflow ui --backend-store-uri sqlite:///" in result.output
    assert (tmp_path / "gen" / "dpops_generator.json").is_file()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rounds = json.loads((tmp_path / "out" / "rounds.json").read_text())
    assert rounds["strategy"] == "dp" and metrics["iterations"] == 60
    assert all(isinstance(v, int | float) for v in metrics.values())  # numbers only: `dvc exp show` columns
    assert 0 <= metrics["final_ood_acc"] <= 1 and "OOD acc" in result.output  # scored on MNIST, reported only
    curve = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert [c["iteration"] for c in curve] == list(range(10, 61, 10))  # (train.eval_every=10, 60 iterations)
    assert metrics["pool_size"] == rounds["rounds"][-1]["pool_size"]
    # the second run finds the cached generator
    again = runner.invoke(app, ["run", "--params", str(params), "-S", "dp.strategy=static"])
    assert again.exit_code == 0, again.output
    assert "training one first" not in again.output
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["rounds"] == 0


def test_bad_value_is_one_line_and_nonzero_exit_before_any_work(tmp_path):
    params = _params(tmp_path)
    result = runner.invoke(app, ["run", "--params", str(params), "-S", "dp.omega=-1"])
    assert result.exit_code == 1
    assert "dp.omega=-1: input should be greater than or equal to 0" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "gen").exists()  # nothing was started


def test_generator_folder_that_is_not_a_generator_is_refused(tmp_path):
    params = _params(tmp_path)
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "weights.bin").write_text("x")
    result = runner.invoke(app, ["run", "--params", str(params)])
    assert result.exit_code == 1 and "holds no trained generator" in result.output


def test_config_show_prints_dotted_keys(tmp_path):
    result = runner.invoke(app, ["config", "show", "--params", str(_params(tmp_path)), "-S", "seed=7"])
    assert result.exit_code == 0
    assert "dp.omega" in result.output and "7" in result.output


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dp_ops", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "generator" in out.stdout


def test_theory_writes_table_json_and_png(tmp_path):
    result = runner.invoke(app, ["theory", "--d", "64", "--n", "128", "--mc-reps", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "theory.json").read_text())
    assert len(report["kept_size"]) == 10 and len(report["oversampling"]) == 6
    assert (tmp_path / "theory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = runner.invoke(app, ["theory", "--rho", "2"])
    assert bad.exit_code == 1 and "rho" in bad.output


HEAVY = ("torch", "mlflow", "dvc", "optuna", "diffusers", "scipy")


def test_version_runs_without_loading_a_heavy_library():
    import subprocess
    import sys

    code = (
        "import sys\nfrom dp_ops.cli import main\nsys.argv = ['dpops', '--version']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    from dp_ops import __version__

    assert out.stdout.splitlines() == [f"dpops {__version__}", "[]"], out.stderr


def test_bad_config_and_bad_paths_are_refused_before_any_heavy_import(tmp_path):
    """Issue 19: the config and the paths are checked before torch & co. are imported, so the error is
    immediate (one line, exit code 1, and no heavy library in the process)."""
    import subprocess
    import sys

    params = _params(tmp_path)
    (tmp_path / "blocker").write_text("x")
    under_a_file = tmp_path / "blocker" / "runs"
    cases = [["-S", "dp.omega=-1"], ["-S", f"output.shards={under_a_file}"]]
    code = (
        "import json, sys\nfrom dp_ops.cli import main\n"
        f"for args in {cases!r}:\n"
        f"    sys.argv = ['dpops', 'run', '--params', {str(params)!r}, *args]\n"
        "    try:\n        main()\n    except SystemExit as exc:\n        code = exc.code\n"
        f"    print(json.dumps([code, sorted(m for m in {HEAVY!r} if m in sys.modules)]), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stdout.splitlines() == ["[1, []]", "[1, []]"], out.stderr
    assert out.stderr.splitlines() == [
        "error: dp.omega=-1: input should be greater than or equal to 0",
        f"error: output.shards='{under_a_file}': cannot be written ({tmp_path / 'blocker'} is a file, not a folder)",
    ]


def test_shell_completion_is_offered_and_completes_the_choices():
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output
    # the script --install-completion writes (--show-completion itself detects the shell from the process tree)
    shown = runner.invoke(app, [], prog_name="dpops", env={"_DPOPS_COMPLETE": "source_bash"})
    assert shown.exit_code == 0 and "_DPOPS_COMPLETE=complete_bash" in shown.output, (shown.output, shown.exception)
    for words, choices in {
        "dpops sweep --strategy ": ["dp", "static"],
        "dpops scaling --metric ": ["final_test_acc", "final_val_acc"],
        "dpops scaling --x ": ["pool_size", "generated_samples"],
        "dpops scaling --strategy ": ["dp", "static", "oversample"],
    }.items():
        env = {"_DPOPS_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()))}
        completed = runner.invoke(app, [], prog_name="dpops", env=env)
        assert completed.output.split() == choices, (words, completed.output)


def test_choice_options_are_the_configs_values_and_a_wrong_one_names_them():
    from typing import get_args

    from dp_ops.cli._app import Axis, Metric, Strategy, SweepStrategy
    from dp_ops.config import DPConfig
    from dp_ops.studies import scaling_report

    assert [s.value for s in Strategy] == list(get_args(DPConfig.model_fields["strategy"].annotation))
    assert {s.value for s in SweepStrategy} < {s.value for s in Strategy}
    assert [m.value for m in Metric] == list(get_args(scaling_report.Metric))
    assert [a.value for a in Axis] == list(get_args(scaling_report.Axis))
    result = runner.invoke(app, ["scaling", "--x", "pool"])
    said = " ".join(result.output.replace("│", " ").split())  # (rich wraps its error box)
    assert result.exit_code == 2, said
    assert "Invalid value for '--x': Value error, 'pool' is not one of 'pool_size', 'generated_samples'" in said


def test_bench_series_are_checked_before_any_work(tmp_path):
    params = _params(tmp_path)
    result = runner.invoke(app, ["bench", "-p", str(params), "--series", "headline, scalin,", "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        "error: --series scalin: choose from scaling, omega, oversample, iterations, headline (comma-separated)"
    ]
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store is opened


def test_a_strategy_new_to_the_config_is_offered_by_the_cli_as_it_is():
    """The CLI's strategies are read from the config's Literal (one source); a sweep offers only what it
    knows how to search, so a new strategy is not offered there."""
    code = (
        "import json\nfrom typing import Literal\nfrom dp_ops.config import DPConfig\n"
        "DPConfig.model_fields['strategy'].annotation = Literal['dp', 'static', 'oversample', 'greedy']\n"
        "from typer.testing import CliRunner\nfrom dp_ops.cli import app\n"
        "def offered(words):\n"
        "    env = {'_DPOPS_COMPLETE': 'complete_bash', 'COMP_WORDS': words, 'COMP_CWORD': str(len(words.split()))}\n"
        "    return CliRunner().invoke(app, [], prog_name='dpops', env=env).output.split()\n"
        "print(json.dumps([offered('dpops scaling --strategy '), offered('dpops sweep --strategy ')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [["dp", "static", "oversample", "greedy"], ["dp", "static"]]


def test_every_option_and_argument_of_every_command_has_help():
    from typer.main import get_command

    def commands(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from commands(sub, f"{path} {name}")

    missing = [
        f"{path} {p.name}" for path, cmd in commands(get_command(app), "dpops") for p in cmd.params if not p.help
    ]
    assert not missing, missing
    walked = [path for path, _ in commands(get_command(app), "dpops")]
    assert {"dpops data restore", "dpops generator quality", "dpops theory"} <= set(walked), walked


def _summary(strategy, rounds):
    from dp_ops.config import build_config
    from dp_ops.engine.loop import RunResult, RunSummary
    from dp_ops.render import run_summary

    cfg = build_config(tiny_tree(dp={"strategy": strategy, "omega": 0.05}))  # round_size 20, oversample_ratio 3
    pool = 40 + 20 * rounds
    generated = pool + (40 * rounds if strategy == "oversample" else 0)
    summary = RunSummary(strategy, 0.85, 0.84, 0.86, pool, generated, 60, rounds, 1.0, 2.0, 0)
    return "\n".join(run_summary(cfg, RunResult(summary, (), ())))


def test_run_summaries_say_what_ran_with_plurals_right():
    static = _summary("static", 0)
    assert "ω" not in static and static.startswith("[bold]static[/] (seed=0)")
    assert "pool 40 samples from 40 generated in round 0 only; 60 iterations" in static
    dp = _summary("dp", 1)
    assert "[bold]dp[/] (ω=0.05, seed=0)" in dp and "in round 0 and 1 more round;" in dp
    assert "in round 0 and 2 more rounds;" in _summary("dp", 2)
    over = _summary("oversample", 2)
    assert "ω" not in over and "(keeps 20 of 60 unguided per round, seed=0)" in over
    assert "pool 80 samples from 160 generated in round 0 and 2 more rounds" in over


def test_the_run_summary_names_the_ood_set_of_its_world_and_only_when_there_is_one():
    from dp_ops.config import build_config
    from dp_ops.engine.loop import RunResult, RunSummary
    from dp_ops.render import run_summary

    summary = RunSummary("static", 0.85, 0.84, 0.86, 40, 40, 60, 0, 1.0, 2.0, 0, final_ood_acc=0.4321)
    for name, names in (("digits", "the 5,000 MNIST digits"), ("mnist", "the 1,797 scikit-learn digits")):
        cfg = build_config(tiny_tree(data={"name": name, "resolution": 8}))
        first = run_summary(cfg, RunResult(summary, (), ()))[0]
        assert first.endswith(f"(best val 0.8600); OOD acc 0.4321 on {names}"), first
    assert "OOD" not in _summary("static", 0)  # no OOD set (image folders)


@pytest.mark.slow  # (end to end: whole tiny runs or a dpops process, seconds each)
def test_a_fresh_mlflow_store_is_created_without_mlflows_info_lines_on_the_users_screen(tmp_path):
    """MLflow logs its migrations at INFO and resets its logger's level when imported: the CLI keeps them off."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "dp_ops", "scaling", "--experiment", "nope"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and (tmp_path / "mlflow.db").is_file()  # the store was created (and migrated)
    assert (r.stdout + r.stderr).splitlines() == [
        "error: --experiment nope: no such MLflow experiment in sqlite:///mlflow.db"
    ]


def test_an_empty_resume_id_is_refused_not_a_fresh_run(tmp_path):
    """`dpops run --resume "$RUN"` with RUN unset used to start a fresh default run (issue 30)."""
    params = _params(tmp_path)
    for empty in ("", "  "):
        result = runner.invoke(app, ["run", "--params", str(params), "--resume", empty])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "--resume '': no run id given (an empty shell variable?); name the MLflow run" in result.output
    assert not (tmp_path / "gen").exists() and not (tmp_path / "out").exists()  # nothing was started


def test_dpops_debug_prints_the_traceback_behind_the_one_line_error(tmp_path, monkeypatch):
    params = _params(tmp_path)
    command = ["run", "--params", str(params), "--resume", ""]
    for debug in ("", "0", "1", "true"):
        monkeypatch.setenv("DPOPS_DEBUG", debug)
        result = runner.invoke(app, command)
        lines = result.stderr.splitlines()
        assert result.exit_code == 1 and lines[0].startswith("error: --resume '': no run id given"), result.stderr
        if debug in ("1", "true"):  # the traceback follows the line, down to where the error was raised
            assert lines[1] == "Traceback (most recent call last):" and "in run" in result.stderr, result.stderr
            assert lines[-1].startswith("dp_ops.errors.ConfigError: --resume '': no run id given"), result.stderr
        else:
            assert len(lines) == 1 and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("command", ["sweep", "bench"])
def test_a_study_refuses_one_run_name_for_its_many_runs(command):
    result = runner.invoke(app, [command, "-S", "tracking.run_name=job-1"])
    study = "a sweep" if command == "sweep" else "the benchmark"
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(f"error: tracking.run_name='job-1': {study}"), (
        result.output
    )


def test_run_name_and_resume_together_are_one_line():
    result = runner.invoke(app, ["run", "--run-name", "a", "--resume", "0123"])
    assert result.exit_code == 1 and "--resume and --run-name: give one" in result.output


def test_set_completes_every_config_key_in_the_shell():
    from dp_ops.cli._app import complete_set
    from dp_ops.config import SweepConfig, build_config, flatten

    def complete(words):
        env = {"_DPOPS_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        return runner.invoke(app, [], prog_name="dpops", env=env).output.split()

    assert complete("dpops run -S tr")[:3] == ["train.iterations=", "train.eval_every=", "train.batch_size="]
    assert complete("dpops sweep --set sweep.omega.") == ["sweep.omega.low=", "sweep.omega.high=", "sweep.omega.log="]
    # one key left: its default beside it, so that the shell stops after '=' (no space) for the value
    assert complete("dpops bench -S dp.strategy=static -S dp.om") == ["dp.omega=", "dp.omega=0.05"]
    assert complete("dpops run -S generator.chann") == ["generator.channels_last=", "generator.channels="]
    assert complete("dpops config show -S threa") == ["threads=", "threads=0"]
    every = {key for key, _ in complete_set("") if key.endswith("=")}
    sweep_keys = {f"sweep.{k}" for k in flatten(SweepConfig())}  # type: ignore[arg-type]
    assert every == {f"{k}=" for k in [*flatten(build_config({})), *sweep_keys]}


def test_the_training_bar_shows_the_evaluation_just_made_the_last_one_included():
    """The loop reports a chunk's iterations, then evaluates: the bar showed the evaluation before (issue 31)."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from dp_ops.render import RichObserver

    progress = Progress(console=Console(file=io.StringIO()))
    observer = RichObserver(progress)
    for iteration, acc in ((10, 0.5), (20, 0.75)):  # (the loop's order of events)
        observer.on_progress("train", iteration, 20)
        observer.on_eval(iteration, acc)
        assert [t.description for t in progress.tasks] == [f"train (val {acc:.3f})"]


def _on_a_terminal(code, cwd):
    """What ``python -c code`` writes to a pseudo-terminal (stdout and stderr)."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "TERM": "xterm-256color"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # (EIO: the last writer closed the terminal)
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0, out
    return out


@pytest.mark.slow  # (two python processes that import DVC: about 1 s)
def test_a_command_leaves_no_colour_code_on_the_terminal_after_its_last_line(tmp_path):
    """Importing DVC (every run, sweep and benchmark does) runs colorama.init(), whose exit hook wrote ESC[0m
    to the terminal after the command's last line (issue 31)."""
    assert _on_a_terminal("import dvc", tmp_path).endswith(b"\x1b[0m")  # (what the command inherits)
    command = "import dvc; from dp_ops.cli import app; app(['config', 'show', '-S', 'seed=3'], prog_name='dpops')"
    out = _on_a_terminal(command, tmp_path)
    assert b"seed" in out and out.endswith(b"\n"), out[-200:]
