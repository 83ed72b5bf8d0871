"""`dpops scaling`: points from a real MLflow SQLite store (or metrics files), fits, report, logged run."""

import json
import math
import time
import warnings

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from typer.testing import CliRunner

from dp_ops.cli import app
from dp_ops.errors import FitError
from dp_ops.records.tracking import TrackingStore
from dp_ops.studies.scaling import PowerLawFit, samples_for_accuracy
from dp_ops.studies.scaling_report import (
    ScalingHeadline,
    _laws_multiplier,
    log_report,
    points_from_files,
    points_from_mlflow,
    scaling_report,
    write_report,
)

runner = CliRunner()


def law(n, multiplier=1.0):
    """accuracy of a pool of n samples worth ``multiplier`` times as much as static's."""
    return 1 - (2.0 * (multiplier * n) ** -0.5 + 0.01)


def _log_run(client, exp_id, strategy, n, acc, reach_at, role="experiment", status="FINISHED", iterations=1000, seed=0):
    """A finished experiment run as dp_ops logs it; val accuracy reaches ``acc`` at iteration ``reach_at``. With
    ``iterations`` other than 1000 it has the config params of its settings (seed and output vary per run)."""
    run = client.create_run(exp_id, tags={"dpops.role": role, "dpops.strategy": strategy})
    now = int(time.time() * 1000)
    summary = {"final_val_acc": acc, "final_test_acc": acc, "pool_size": n, "generated_samples": n}
    summary["iterations"] = iterations
    curve = [Metric("val_acc", acc - 0.05 if i < reach_at else acc, now, i) for i in range(100, iterations + 1, 100)]
    config = {"seed": seed, "dp.strategy": strategy, "dp.initial_size": n, "output.metrics": f"r/{n}-{seed}/m.json"}
    config.update({"train.iterations": iterations, "dp.omega": 0.05, "generator_meta.trained_at": f"{seed}"})
    params = [Param(k, str(v)) for k, v in config.items()] if iterations != 1000 else []
    client.log_batch(
        run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()] + curve, params=params
    )
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def store(tmp_path, mlflow_uri, tiny_params):
    uri = mlflow_uri
    client = MlflowClient(uri)
    exp_id = client.create_experiment("bench", artifact_location=(tmp_path / "artifacts").as_uri())
    for n in (200, 400, 800, 1600, 3200, 6400):
        _log_run(client, exp_id, "static", n, law(n), reach_at=900)
    best = None
    for n in (300, 500, 700, 900):
        best = _log_run(client, exp_id, "dp", n, law(n, multiplier=3.0), reach_at=300)
    _log_run(client, exp_id, "static", 100, 0.99, 100, role="round")  # not an experiment: ignored
    _log_run(client, exp_id, "static", 100, 0.99, 100, status="KILLED")  # unfinished: ignored
    tiny_params(tmp_path, tracking={"uri": uri, "experiment": "bench"})
    return tmp_path, uri, best


@pytest.mark.slow  # (end to end: whole tiny runs or a dpops process, seconds each)
def test_scaling_command_fits_reports_the_multipliers_and_logs_a_scaling_run(store):
    tmp, uri, best = store
    out = tmp / "report"
    result = runner.invoke(
        app, ["scaling", "--params", str(tmp / "params.yaml"), "--out", str(out), "--target", "0.95"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "scaling.json").read_text())
    static = report["fits"]["static"]
    assert static["n_points"] == 6 and static["alpha"] == pytest.approx(0.5, abs=0.02)
    assert static["alpha_ci"][0] - 1e-6 <= 0.5 <= static["alpha_ci"][1] + 1e-6  # exact points: a tight interval
    h = report["headline"]
    assert h["dp_run"] == best and h["dp_samples"] == 900
    assert h["data_multiplier_fit"] == pytest.approx(3.0, rel=0.05)  # DP's pool is worth 3x the samples
    assert 2.5 < h["data_multiplier_points"] < 3.5
    # both strategies have a law: static's need ÷ DP's at DP's accuracy, 2700 ÷ 900, with a bootstrap interval
    assert h["static_samples_needed_law"] == pytest.approx(2700, rel=0.05)
    assert h["dp_samples_needed_law"] == pytest.approx(900, rel=0.05)
    assert h["data_multiplier_laws"] == pytest.approx(3.0, rel=0.05)
    lo, hi = h["data_multiplier_laws_ci"]
    assert lo <= h["data_multiplier_laws"] <= hi and hi < 4
    assert "from the two fitted laws (resolved): static needs 3.0" in result.output
    assert h["data_multiplier_laws_verdict"] == "resolved"  # its interval excludes 1×
    assert h["iteration_multiplier"] == pytest.approx(3.0)  # static reached DP's accuracy at 900, DP at 300
    need = report["samples_for_target"]["static"]["0.95"]
    assert need == pytest.approx(2500, rel=0.05)  # 2/sqrt(n) + 0.01 = 0.05 at n = 2500
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data multiplier: static needs" in result.output and "iteration multiplier" in result.output

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench")
    (logged,) = client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'scaling'")
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {"scaling.json", "scaling.png"}
    assert logged.data.metrics["data_multiplier_fit"] == pytest.approx(h["data_multiplier_fit"])
    assert logged.data.metrics["data_multiplier_laws_ci_low"] == pytest.approx(lo)
    assert logged.data.params["data_multiplier_laws_verdict"] == "resolved"
    # the logged report is not read back as a point
    assert len(points_from_mlflow(TrackingStore(uri), ["bench"], with_curves=False)) == 10


def test_runs_of_other_budgets_are_a_law_of_their_own_and_not_compared(tmp_path, mlflow_uri):
    """A 2,000-iteration static run is a law of its own: it is not fitted with the 300-iteration runs, nor taken
    as the static run that reached DP's accuracy first (which read "static needs 0.20× the iterations")."""
    client = MlflowClient(mlflow_uri)
    exp_id = client.create_experiment("budgets", artifact_location=(tmp_path / "artifacts").as_uri())
    for seed, n in enumerate((200, 400, 800, 1600)):  # (seed, outputs and the generator's meta differ: one law)
        _log_run(client, exp_id, "static", n, law(n), reach_at=300, iterations=300, seed=seed)
    _log_run(client, exp_id, "static", 400, law(4000), reach_at=100, iterations=2000)  # DP's accuracy at 100
    for n in (300, 500, 700, 900):
        _log_run(client, exp_id, "dp", n, law(n, multiplier=3.0), reach_at=200, iterations=300)
    runs = points_from_mlflow(TrackingStore(mlflow_uri), ["budgets"])

    report = scaling_report(runs, n_boot=10)

    assert list(report.points) == ["dp", "static (train.iterations=2000)", "static (train.iterations=300)"]
    assert set(report.fits) == {"dp", "static (train.iterations=300)"}
    assert len(report.points["static (train.iterations=300)"]) == 4 and "got 1 points" in " ".join(
        report.unfitted.values()
    )
    assert report.groups["static (train.iterations=2000)"] == {
        "strategy": "static",
        "settings": {"train.iterations": "2000"},
    }
    h = report.headline
    assert h is not None
    assert h.static_group == "static (train.iterations=300)" and h.dp_group == "dp"
    assert h.static_iterations_to_val == math.inf  # (no 300-iteration static run gets there; was 100: 0.5×)
    assert h.data_multiplier_fit == pytest.approx(3.0, rel=0.15)

    only_long = [r for r in runs if r.strategy == "dp" or r.iterations == 2000]
    lone = scaling_report(only_long, n_boot=10)
    best = max((r for r in runs if r.strategy == "dp"), key=lambda r: r.final_val_acc)
    assert lone.headline is None and lone.no_headline == (
        f"no static runs share the settings of DP's best run {best.source} (train.iterations: dp 300, static 2000)"
    )


def test_a_report_made_again_from_the_same_inputs_replaces_its_run(store):
    tmp, uri, _ = store
    reg = TrackingStore(uri)
    report = scaling_report(points_from_mlflow(reg, ["bench"], with_curves=False), n_boot=10)
    files = write_report(report, tmp / "report")
    params = {"experiments": "bench", "metric": "final_test_acc", "runs": "10"}
    first = log_report(report, files, reg, "bench", params)
    again = log_report(report, files, reg, "bench", {**params, "runs": "11"})  # (one more run finished since)
    other = log_report(report, files, reg, "bench", {**params, "metric": "final_val_acc"})
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench")
    kept = client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'scaling'")
    assert {r.info.run_id for r in kept} == {again, other}
    assert client.get_run(first).info.lifecycle_stage == "deleted"
    assert client.get_run(again).data.params["runs"] == "11" and "static.alpha" in client.get_run(again).data.metrics


def test_filters_and_too_few_points_refuse_in_one_line(store):
    tmp, uri, _ = store
    assert {p.strategy for p in points_from_mlflow(TrackingStore(uri), ["bench"], strategies=["dp"])} == {"dp"}
    result = runner.invoke(
        app,
        [
            "scaling",
            "--params",
            str(tmp / "params.yaml"),
            "--out",
            str(tmp / "r"),
            "--filter",
            "metrics.pool_size < 500",
        ],
    )
    assert result.exit_code == 1
    assert "too few points to fit a scaling law" in result.output and "have dp: 1, static: 2)" in result.output
    missing = runner.invoke(app, ["scaling", "--params", str(tmp / "params.yaml"), "--experiment", "nope"])
    assert missing.exit_code == 1 and "--experiment nope: no such MLflow experiment" in missing.output
    bad = runner.invoke(app, ["scaling", "--params", str(tmp / "params.yaml"), "--metric", "final_test_loss"])
    said = " ".join(bad.output.replace("│", " ").split())  # (a choice: Typer's error box, wrapped by rich)
    assert bad.exit_code == 2 and "'final_test_loss' is not one of 'final_test_acc', 'final_val_acc'" in said, said


def test_points_from_metrics_files_feed_the_same_report(tmp_path):
    paths = []
    for strategy, n, mult in [("static", n, 1.0) for n in (200, 400, 800, 1600)] + [("dp", 600, 3.0)]:
        folder = tmp_path / f"{strategy}{n}"
        folder.mkdir()
        acc = law(n, mult)
        summary = {
            "final_val_acc": acc,
            "final_test_acc": acc,
            "pool_size": n,
            "generated_samples": n,
            "iterations": 500,
        }
        (folder / "metrics.json").write_text(json.dumps(summary))
        (folder / "rounds.json").write_text(json.dumps({"strategy": strategy, "rounds": []}))
        (folder / "curve.json").write_text(json.dumps([{"iteration": 100, "val_acc": acc}]))
        paths.append(folder / "metrics.json")
    runs = points_from_files(paths)
    assert next(r.curve for r in runs) == ((100, law(200)),)
    report = scaling_report(runs, n_boot=50, targets=[0.9999])
    assert set(report.fits) == {"static"} and "dp" in report.unfitted  # one dp point: no fit, still a multiplier
    assert report.targets["static"]["0.9999"] == float("inf")  # beyond 1 - c: unreachable
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["samples_for_target"]["static"]["0.9999"] is None
    assert report.headline is not None and report.headline.data_multiplier_fit == pytest.approx(3.0, rel=0.1)
    with pytest.raises(FitError, match="too few points"):
        scaling_report(runs[:2])


def test_the_laws_multiplier_interval_reaches_infinity_when_static_draws_never_get_there():
    def fit(a, alpha, c, boot):
        return PowerLawFit(a, alpha, c, (a, a), (alpha, alpha), (c, c), 5, 0.0, tuple(boot))

    # static plateaus at 0.98 in half its draws (error floor c = 0.02 > 1 − 0.985); DP reaches 0.985 at n = 2500
    static = fit(2.0, 0.5, 0.0, [(2.0, 0.5, 0.0)] * 50 + [(2.0, 0.5, 0.02)] * 50)
    dp = fit(0.5, 0.5, 0.005, [(0.5, 0.5, 0.005)] * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (an interpolated percentile of ∞ and ∞ warns and gives NaN)
        got = _laws_multiplier(static, dp, 0.985)
    assert got["static_samples_needed_law"] == pytest.approx(2.0**2 / 0.015**2)
    assert got["dp_samples_needed_law"] == pytest.approx(2500)
    assert got["data_multiplier_laws"] == pytest.approx((2.0 / 0.015) ** 2 / 2500)  # 7.1×
    assert got["data_multiplier_laws_ci"] == [pytest.approx((2.0 / 0.015) ** 2 / 2500), math.inf]


def test_a_dp_draw_that_needs_no_samples_counts_as_infinity_not_a_zero_division():
    """A bootstrap draw of DP's law with α near 0 below the error it must reach needs no samples at all (0):
    the ratio is ∞ for that draw; a law with a = 0 (flat at c, below the error) needs 0, not a domain error."""

    def fit(a, alpha, c, boot):
        return PowerLawFit(a, alpha, c, (a, a), (alpha, alpha), (c, c), 5, 0.0, tuple(boot))

    assert samples_for_accuracy(0.0, 0.5, 0.01, 0.985) == 0.0
    assert samples_for_accuracy(0.001, 1e-6, 0.005, 0.985) == 0.0  # (exp underflows: any n)
    static = fit(2.0, 0.5, 0.0, [(2.0, 0.5, 0.0)] * 100)
    dp = fit(0.5, 0.5, 0.005, [(0.5, 0.5, 0.005)] * 90 + [(0.001, 1e-6, 0.005)] * 5 + [(0.0, 0.5, 0.005)] * 5)
    got = _laws_multiplier(static, dp, 0.985)
    assert got["data_multiplier_laws"] == pytest.approx((2.0 / 0.015) ** 2 / 2500)
    assert got["data_multiplier_laws_ci"] == [pytest.approx((2.0 / 0.015) ** 2 / 2500), math.inf]
    assert got["data_multiplier_laws_verdict"] == "resolved"


def test_an_empty_metrics_folder_is_named(tmp_path):
    """An empty --metrics folder is named as such (not "too few points ... have no finished experiment runs")."""
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
    result = runner.invoke(app, ["scaling", "--params", str(params), "--metrics", str(empty), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert f"--metrics {empty}: no metrics.json files found in this folder or below it" in line, result.output


def test_the_headline_dict_has_the_keys_that_apply_in_the_order_scaling_json_always_had():
    common = {"dp_run": "r", "dp_accuracy": 0.9, "dp_samples": 100.0, "data_multiplier_points": math.inf}
    iters = {"dp_val_acc": 0.9, "dp_iterations_to_val": 100.0, "static_iterations_to_val": 300.0}
    h = ScalingHeadline(**common, **iters, iteration_multiplier=3.0)
    assert list(h.to_dict()) == [*common, *iters, "iteration_multiplier"]  # no fit, no groups: their keys absent
    laws = {"static_samples_needed_law": 300.0, "dp_samples_needed_law": 100.0, "data_multiplier_laws": 3.0}
    fit = {"static_samples_needed_fit": 300.0, "data_multiplier_fit": 3.0, "fit_extrapolated": False}
    full = ScalingHeadline(
        **common,
        dp_group="dp",
        static_group="static (x=1)",
        **fit,
        **laws,
        data_multiplier_laws_ci=[2.0, 4.0],
        **iters,
        iteration_multiplier=3.0,
    )
    assert list(full.to_dict()) == [
        "dp_run",
        "dp_accuracy",
        "dp_samples",
        "dp_group",
        "static_group",
        "data_multiplier_points",
        *fit,
        *laws,
        "data_multiplier_laws_ci",
        *iters,
        "iteration_multiplier",
    ]
    assert full.to_dict()["fit_extrapolated"] is False and full.to_dict()["data_multiplier_laws_ci"] == [2.0, 4.0]
