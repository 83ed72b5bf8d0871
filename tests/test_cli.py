import json

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
    mlflow_store(tmp_path)  # the store _params names, already migrated
    params = _params(tmp_path)
    result = runner.invoke(app, ["run", "--params", str(params), "-S", "dp.omega=0.2"])
    assert result.exit_code == 0, result.output
    assert "training one first" in result.output and "final val acc" in result.output
    assert "MLflow run" in result.output and "mlflow ui --backend-store-uri sqlite:///" in result.output
    assert (tmp_path / "gen" / "dpops_generator.json").is_file()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rounds = json.loads((tmp_path / "out" / "rounds.json").read_text())
    assert rounds["strategy"] == "dp" and metrics["iterations"] == 60
    assert all(isinstance(v, int | float) for v in metrics.values())  # numbers only: `dvc exp show` columns
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
