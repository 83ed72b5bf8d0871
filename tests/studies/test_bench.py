"""`dpops bench`: the plan, the headline arithmetic, and real runs in worker processes on a temporary MLflow
store, interrupted with Ctrl-C and resumed."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient

from dp_ops.config import load_config
from dp_ops.errors import ConfigError
from dp_ops.records.checkpoint import checkpoint_path
from dp_ops.render import bench_headline_lines, times
from dp_ops.studies import bench
from dp_ops.studies.bench import _take_gpu, gpu_slots, iteration_arms, jobs, plan, prepare
from dp_ops.studies.bench_stats import FIELDS, Arm, headline, summarise
from dp_ops.studies.intervals import t_interval

from conftest import tiny_tree


def _row(strategy, setting, per_seed, iterations=100, series="scaling", ood=None):
    """An ArmStats from {seed: (generated, test acc, model evals, gen seconds)}; val acc = test acc, and OOD
    acc = ``ood`` (+ 0.01 per seed) if given."""
    seeds = {
        s: {
            "generated_samples": g,
            "pool_size": g,
            "iterations": iterations,
            "gen_seconds": sec,
            "model_evals": u,
            "final_val_acc": a,
            "final_test_acc": a,
            **({} if ood is None else {"final_ood_acc": ood + 0.01 * s}),
        }
        for s, (g, a, u, sec) in per_seed.items()
    }
    runs = {(f"{strategy} {setting}", s): m for s, m in seeds.items()}
    return summarise(runs, [Arm(strategy, setting, (), series)], list(per_seed))[0]


STATIC = [
    _row("static", f"N={n}", {0: (n, a, 10 * n, n / 10), 1: (n, a, 10 * n, n / 10)})
    for n, a in ((250, 0.90), (500, 0.94), (1000, 0.97), (2000, 0.98))
]


def test_headline_reads_static_curve_pairs_seeds_and_picks_the_cheapest_oversample_at_dp_accuracy():
    dp = _row("dp", "ω=0.05", {0: (500, 0.965, 10_000, 100.0), 1: (500, 0.975, 10_000, 100.0)})
    dp0 = _row("dp", "ω=0", {0: (500, 0.95, 5_000, 50.0), 1: (500, 0.96, 5_000, 50.0)})
    over = [
        _row("oversample", "r=2", {0: (1000, 0.96, 20_000, 80.0), 1: (1000, 0.96, 20_000, 80.0)}),
        _row("oversample", "r=4", {0: (2000, 0.97, 40_000, 160.0), 1: (2000, 0.97, 40_000, 160.0)}),
        _row("oversample", "r=8", {0: (4000, 0.98, 80_000, 320.0), 1: (4000, 0.98, 80_000, 320.0)}),
    ]
    h = headline([*STATIC, dp, dp0, *over], "dp ω=0.05", "dp ω=0")
    assert h.dp_test_acc == pytest.approx(0.97) and h.dp_samples == 500
    assert h.static_reached and h.static_samples_needed == pytest.approx(1000)  # static N=1000 has exactly 0.97
    assert h.data_multiplier == pytest.approx(2.0)
    # seed 0 (0.965) lies 5/6 of the way from 0.94 @ 500 to 0.97 @ 1000: log-interpolated n = 500·2^(5/6)
    assert h.data_multiplier_per_seed[0] == pytest.approx(2 ** (5 / 6) * 500 / 500)
    assert h.data_multiplier_per_seed[1] == pytest.approx(1000 * 2**0.5 / 500)
    assert h.guidance_effect == pytest.approx(0.015) and h.guidance_effect_sd == pytest.approx(0.0)
    assert h.oversample_arm == "oversample r=4" and h.oversample_reached  # r=2 falls short, r=8 costs more
    assert h.compute_multiplier == pytest.approx(4.0) and h.seconds_multiplier == pytest.approx(1.6)
    text = "\n".join(bench_headline_lines(h))
    assert "2.00×" in text and "oversample r=4" in text and "+0.0150" in text


def test_headline_when_static_and_oversample_never_reach_dp_is_a_lower_bound():
    dp = _row("dp", "ω=0.05", {0: (800, 0.99, 10_000, 100.0)})
    over = [
        _row("oversample", "r=2", {0: (1600, 0.95, 20_000, 80.0)}),
        _row("oversample", "r=4", {0: (3200, 0.96, 40_000, 160.0)}),
    ]
    h = headline([*STATIC, dp, *over], "dp ω=0.05", "dp ω=0")
    assert not h.static_reached and math.isinf(h.static_samples_needed)
    assert h.data_multiplier == pytest.approx(2000 / 800)  # the largest static size: a lower bound
    assert h.guidance_effect is None
    assert h.oversample_arm == "oversample r=4" and not h.oversample_reached
    assert "data multiplier (bound): more than 2.50×" in bench_headline_lines(h)[0]
    # one seed: no interval can say anything, so none is resolved
    assert h.intervals["data multiplier"].low == 0 and math.isinf(h.intervals["data multiplier"].high)
    assert "95% interval (0×, ∞×) (bootstrap over seeds, 1)" in bench_headline_lines(h)[0]  # open at both ends
    assert json.loads(json.dumps(h.to_dict(), allow_nan=False))["static_samples_needed"] is None  # inf: null
    assert headline([*STATIC[:1], dp], "dp ω=0.05", "dp ω=0") is None  # one static size: no curve to read
    assert h.iteration_multiplier is None and h.ood_gain is None  # no iteration series, no OOD set
    assert not any("iteration multiplier" in line or "OOD" in line for line in bench_headline_lines(h))


def test_every_multiplier_is_formatted_by_one_function():
    assert times(2.5) == "2.50×" and times(math.inf) == "∞×" and times(None) == "—"
    assert times(math.inf, never="∞× (never reached)") == "∞× (never reached)"  # (the scaling report's words)


def test_iteration_multiplier_reads_static_best_size_at_more_iterations_and_ood_gain_pairs_seeds():
    static = [
        _row("static", f"N={n}", {0: (n, a, 10 * n, 1.0), 1: (n, a, 10 * n, 1.0)}, ood=o)
        for n, a, o in ((500, 0.94, 0.30), (1000, 0.98, 0.20), (2000, 0.97, 0.25))
    ]
    dp = _row("dp", "ω=0.05", {0: (800, 0.985, 1, 1.0), 1: (800, 0.995, 1, 1.0)}, ood=0.40)
    more = [  # static at N=1000 (its best by validation) with 2× and 4× the 100 iterations
        _row("static", f"N=1000 {k}× iters", {0: (1000, a, 1, 1.0), 1: (1000, a, 1, 1.0)}, 100 * k, "iterations")
        for k, a in ((2, 0.985), (4, 0.995))
    ]
    # runs at more iterations of a size that was best at fewer seeds are not read with N=1000's
    other = _row("static", "N=2000 2× iters", {0: (2000, 0.999, 1, 1.0), 1: (2000, 0.999, 1, 1.0)}, 200, "iterations")
    h = headline([*static, dp, *more, other], "dp ω=0.05", "dp ω=0")
    assert h.static_best == "static N=1000" and not h.static_reached  # the iteration rows are no static sizes
    # DP's 0.99 lies halfway from 0.985 @ 200 to 0.995 @ 400 iterations: 200·√2 in log iterations
    assert h.iterations_reached and h.static_iterations_needed == pytest.approx(200 * 2**0.5)
    assert h.iteration_multiplier == pytest.approx(2 * 2**0.5) and h.dp_iterations == 100
    assert h.iteration_multiplier_per_seed == {0: pytest.approx(2.0), 1: pytest.approx(4.0)}
    assert h.ood_gain == pytest.approx(0.20) and h.ood_gain_sd == pytest.approx(0.0)  # vs N=1000, not N=2000
    text = "\n".join(bench_headline_lines(h))
    assert (
        "iteration multiplier (resolved): static N=1000 needs 2.83×" in text
        and "95% interval [2.00×, 4.00×] (bootstrap over seeds, 2)" in text
        and "OOD gain (resolved): dp ω=0.05 − static N=1000 = +0.2000" in text
    )
    h = headline([*static, _row("dp", "ω=0.05", {0: (800, 0.999, 1, 1.0)}), *more], "dp ω=0.05", "dp ω=0")
    assert not h.iterations_reached and h.iteration_multiplier == pytest.approx(4.0)  # a bound: 400 ÷ 100
    assert "iteration multiplier (bound): more than 4.00×" in "\n".join(bench_headline_lines(h))


def _planted(effect: float, multiplier: float, seeds: int = 8, noise: float = 0.004, rng_seed: int = 1):
    """Rows with planted effects: static's accuracy 0.80 + 0.03·log2(n / 250) at 250…4000 samples, DP at 500
    samples with static's accuracy at ``multiplier`` × 500 (a data multiplier of ``multiplier``), dp ω=0 at
    DP's accuracy − ``effect`` (a guidance effect of ``effect``), each run with its own N(0, noise) noise and a
    per-seed offset shared by every arm of that seed (what pairing by seed removes)."""
    rng = random.Random(rng_seed)
    acc = lambda n: 0.80 + 0.03 * math.log2(n / 250)
    shift = {s: rng.gauss(0, 0.01) for s in range(seeds)}
    arms = {f"N={n}": ("static", n, acc(n)) for n in (250, 500, 1000, 2000, 4000)}
    arms |= {"ω=0.05": ("dp", 500, acc(500 * multiplier)), "ω=0": ("dp", 500, acc(500 * multiplier) - effect)}
    rows = []
    for setting, (strategy, n, a) in arms.items():
        per_seed = {s: (n, a + shift[s] + rng.gauss(0, noise), 10 * n, 1.0) for s in range(seeds)}
        rows.append(_row(strategy, setting, per_seed))
    return headline(rows, "dp ω=0.05", "dp ω=0")


def test_a_planted_effect_is_covered_and_resolved_and_no_effect_is_not_resolved():
    h = _planted(effect=0.02, multiplier=3.0)
    effect, data = h.intervals["guidance effect"], h.intervals["data multiplier"]
    assert effect.method == "t" and effect.seeds == 8 and effect.low < 0.02 < effect.high
    assert data.method == "bootstrap" and data.low < 3.0 < data.high
    assert h.verdicts["guidance effect"] == h.verdicts["data multiplier"] == "resolved"
    assert effect.low > 0 and data.low > 1  # (what "resolved" means: the interval excludes no effect)
    text = "\n".join(bench_headline_lines(h))
    assert "guidance effect (resolved): dp ω=0.05 − dp ω=0 = +0.0" in text and "(t over paired seeds, 8)" in text
    assert (
        "data multiplier (resolved): static needs 2.9" in text or "data multiplier (resolved): static needs 3." in text
    )
    h = _planted(effect=0.0, multiplier=1.0)
    assert h.verdicts["guidance effect"] == h.verdicts["data multiplier"] == "not resolved"
    assert h.intervals["guidance effect"].low < 0 < h.intervals["guidance effect"].high
    assert h.intervals["data multiplier"].low <= 1 <= h.intervals["data multiplier"].high
    # over many planted benchmarks the t interval covers the planted effect about 95% of the time
    rng = random.Random(2)
    draws = [t_interval([0.01 + rng.gauss(0, 0.006) for _ in range(8)]) for _ in range(400)]
    assert 0.92 <= sum(ci.low < 0.01 < ci.high for ci in draws) / len(draws) <= 0.98


def test_plot_labels_at_one_point_are_stacked_not_drawn_over_each_other():
    """Two budgets of one static size (or two ω at one pool size) land on nearly the same point: their labels
    are moved apart by at least a label's height; a label with room stays beside its point."""
    from matplotlib.figure import Figure

    from dp_ops.studies.bench_stats import LABEL_PT, _annotate

    ax = Figure(dpi=120).add_subplot()
    ax.set_xscale("log")
    ax.plot([500, 4000], [0.90, 0.95])
    _annotate(ax, [("N=4000 2× iters", 4000, 0.9450), ("N=4000 4× iters", 4000, 0.9452), ("N=500", 500, 0.90)])
    offsets = {a.get_text(): a.xyann for a in ax.texts}
    assert offsets["N=500"] == (5, 4.0) and offsets["N=4000 2× iters"] == (5, 4.0)
    assert offsets["N=4000 4× iters"][1] - offsets["N=4000 2× iters"][1] >= LABEL_PT - 0.5


def test_a_multiplier_whose_draws_never_reach_is_an_open_interval_not_nan():
    h = _planted(effect=0.0, multiplier=30.0)  # DP above everything static reached: the figure is a bound
    data = h.intervals["data multiplier"]
    assert h.verdicts["data multiplier"] == "bound" and math.isinf(data.high) and data.low == pytest.approx(8.0)
    assert "data multiplier (bound): more than 8.00×, 95% interval [8.00×, ∞×)" in bench_headline_lines(h)[0]
    report = json.loads(json.dumps(h.to_dict(), allow_nan=False))
    assert report["intervals"]["data multiplier"] == {"low": 8.0, "high": None, "method": "bootstrap", "seeds": 8}
    assert report["verdicts"]["data multiplier"] == "bound"


@pytest.fixture
def params_file(tmp_path, tiny_generator, mlflow_uri):
    tree = tiny_tree(train={"iterations": 200, "eval_every": 10})
    tree["generator"]["path"] = str(tmp_path / "gen")
    tree["tracking"] = {"uri": mlflow_uri}
    tree["output"] = {"shards": str(tmp_path / "runs"), "checkpoints": str(tmp_path / "checkpoints")}
    tree["sweep"] = {"static_sizes": [30, 60]}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    tiny_generator.save(tmp_path / "gen")
    return path


def test_plan_has_every_arm_validated_and_refuses_bad_input_in_one_line(params_file, tmp_path):
    bp, cfg = plan(params_file, [], static_sizes=(60, 30, 90), seeds=range(3), experiment="e")  # sizes are sorted
    names = [
        "static N=30",
        "static N=60",
        "static N=90",
        "dp ω=0.1",  # DP at its own N=40, P=20, then its size series
        "dp N=20 P=10",
        "dp N=80 P=40",
        "dp 1 round",
        "dp ω=0",  # the ω series at DP's N and P
        "dp ω=0.02",
        "dp ω=0.05",
        "dp ω=0.2",
        "oversample r=2",
        "oversample r=4",
        "oversample r=8",
    ]
    assert [a.name for a in bp.arms] == names
    assert [a.series for a in bp.arms] == ["scaling"] * 7 + ["omega"] * 4 + ["oversample"] * 3
    assert bp.arms[5].overrides == ("dp.strategy=dp", "dp.initial_size=80", "dp.round_size=40")
    assert (bp.dp_arm, bp.dp0_arm, bp.seeds) == ("dp ω=0.1", "dp ω=0", (0, 1, 2))
    assert (bp.iterations, bp.iteration_factors) == (200, (2, 4))
    assert cfg.tracking.experiment == "e" and bp.bench_id.startswith("full-")
    todo = jobs(bp, {("static N=30", 0): {}}, {("dp ω=0", 2): "abc"}, tmp_path / "out")
    assert len(todo) == 14 * 3 - 1  # (the iteration series waits for static)
    assert todo[0].arm.name == "oversample r=8" and todo[-1].arm.strategy == "dp"  # the most generation first
    assert next(j for j in todo if j.arm.name == "dp ω=0" and j.seed == 2).resume_run_id == "abc"
    assert "dp.omega=0" in next(j for j in todo if j.arm.name == "dp ω=0").overrides
    assert all(f"output.curve={tmp_path / 'out' / 'runs'}" in " ".join(j.overrides) for j in todo)  # beside metrics
    assert "output.curve=" + str(tmp_path / "out" / "runs" / "dp-N20-P10-seed0") in " ".join(
        next(j for j in todo if j.arm.name == "dp N=20 P=10" and j.seed == 0).overrides
    )
    # the same config is the same benchmark; another config is another one
    assert plan(params_file, [], static_sizes=(30, 60), seeds=[0], experiment="e")[0].bench_id == bp.bench_id
    assert (
        plan(params_file, ["seed=0", "dp.round_size=30"], static_sizes=(30, 60), seeds=[0], experiment="e")[0].bench_id
        != bp.bench_id
    )
    quick, _ = plan(params_file, [], static_sizes=(90, 30, 60), seeds=range(3), experiment="e", quick=True)
    assert [a.name for a in quick.arms] == [
        "static N=30",
        "static N=60",
        "dp ω=0.1",
        "dp N=20 P=10",
        "dp ω=0",
        "oversample r=4",
    ]
    assert quick.seeds == (0,) and "train.iterations=66" in quick.base and quick.iteration_factors == (2,)
    for overrides, kw, message in (
        (["dp.omega=0"], {}, "dp.omega=0: the benchmark compares"),
        (["dp.omegaa=1"], {}, "dp.omegaa: unknown key"),
        ([], {"ratios": (1, 4)}, "--ratio 1"),
        ([], {"static_sizes": (30,)}, "needs >= 2 static sizes"),
        ([], {"seeds": []}, "--seeds"),
    ):
        args = {"static_sizes": (30, 60), "seeds": [0], "experiment": "e", **kw}
        with pytest.raises(ConfigError, match=message):
            plan(params_file, overrides, **args)


def test_static_runs_at_more_iterations_at_its_best_size_by_validation_once_every_static_run_finished(
    params_file, tmp_path
):
    bp, _ = plan(params_file, [], static_sizes=(30, 60, 90), seeds=range(2), experiment="e")
    static = [a.name for a in bp.arms if a.strategy == "static"]  # N=30, 60, 90
    val = {"static N=30": 0.90, "static N=60": 0.95, "static N=90": 0.95}  # a tie: the smaller size
    done = {(arm, s): {"final_val_acc": val[arm], "final_test_acc": 0.0} for arm in static for s in (0, 1)}
    arms = iteration_arms(bp, done)
    assert [a.name for a in arms] == ["static N=60 2× iters", "static N=60 4× iters"]
    assert arms[1].overrides == ("dp.strategy=static", "dp.initial_size=60", "train.iterations=800")
    assert {a.series for a in arms} == {"iterations"}
    assert [j.arm.name for j in jobs(bp, done, {}, tmp_path)].count("static N=60 4× iters") == 2
    # seeds beyond this invocation's (an earlier --seeds 8) count too, as in the report: there N=90 is best
    done.update(
        {
            (arm, s): {"final_val_acc": val[arm] + (arm == "static N=90"), "final_test_acc": 0.0}
            for arm in static
            for s in (2, 3)
        }
    )
    assert [a.name for a in iteration_arms(bp, done)] == ["static N=90 2× iters", "static N=90 4× iters"]
    del done[("static N=90", 1)]  # one static run still to come: nothing chosen yet
    assert iteration_arms(bp, done) == ()


def test_a_second_invocation_of_a_live_benchmark_is_one_line_and_a_dead_ones_hold_is_taken_over(
    params_file, tmp_path, mlflow_uri
):
    """Two `dpops bench` of one benchmark in one workspace would make the same runs twice: while one lives
    (here another process holds its lease) the second is refused before any run; once it is gone (SIGKILL)
    its hold is taken over with a note."""
    from typer.testing import CliRunner

    from dp_ops.cli import app
    from dp_ops.records.lease import RunLease, lease_path

    bp, _ = plan(params_file, [], static_sizes=(30, 60), seeds=range(1), experiment="dp-ops-bench")
    path = lease_path(tmp_path / "checkpoints", f"bench-{bp.bench_id}")
    hold = (
        "import sys, time\nfrom pathlib import Path\nfrom dp_ops.records.lease import RunLease\n"
        f"RunLease(Path({str(path)!r}), 'b').acquire()\nprint('held', flush=True)\ntime.sleep(300)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["bench", "-p", str(params_file), "--seeds", "1", "--out", str(tmp_path / "out")]
        result = CliRunner().invoke(app, args)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1, result.output
    assert re.fullmatch(
        rf"error: benchmark {bp.bench_id}: already being run by pid {holder.pid} on \S+ \(user \S+\), last "
        rf"heartbeat \d+ s ago \({re.escape(str(path))}\); stop that process first \(or wait for it to end\)",
        result.output.strip(),
    ), result.output
    client = MlflowClient(mlflow_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])  # no run made
    note = RunLease(path, bp.bench_id, f"benchmark {bp.bench_id}").acquire()  # (as `dpops bench` takes it)
    assert note is not None and note.startswith(f"taking over benchmark {bp.bench_id} from pid {holder.pid} ")
    assert note.endswith(f"pid {holder.pid} is no longer running")


def test_series_headline_runs_only_the_arms_the_headline_reads_and_a_bad_series_is_one_line(params_file, tmp_path):
    bp, _ = plan(params_file, [], static_sizes=(30, 60), seeds=range(8), experiment="e")
    names = lambda arms: [a.name for a in arms]
    headline_arms = ["static N=30", "static N=60", "dp ω=0.1", "dp ω=0"]
    over = ["oversample r=2", "oversample r=4", "oversample r=8"]
    assert names(bench.selected_arms(bp, {}, ("headline",))) == [*headline_arms, *over]  # no pick known yet
    run = lambda acc, evals: {"final_test_acc": acc, "model_evals": evals, "final_val_acc": acc}
    done = {(a, s): run(0.9, 1.0) for a in ("dp ω=0.1", "oversample r=2") for s in range(3)}
    done |= {(a, s): run(0.95, 4.0) for a in ("oversample r=4", "oversample r=8") for s in range(3)}
    done = {k: {f: 1.0 for f in FIELDS} | v for k, v in done.items()}
    # r=2 is the cheapest ratio at DP's accuracy: only it gets more seeds
    assert names(bench.selected_arms(bp, done, ("headline",))) == [*headline_arms, "oversample r=2"]
    assert names(bench.selected_arms(bp, done, ("omega",))) == ["dp ω=0", "dp ω=0.02", "dp ω=0.05", "dp ω=0.2"]
    todo = jobs(bp, done, {}, tmp_path, bench.selected_arms(bp, done, ("headline",)))
    assert len(todo) == 5 * 8 - 6  # dp ω=0.1 and oversample r=2 have seeds 0-2 already
    with pytest.raises(ConfigError, match="--series scalin: choose from scaling, omega, oversample, iterations"):
        prepare(params_file, [], seeds=8, ratios=(2,), quick=False, experiment="e", out=tmp_path, series=("scalin",))


def test_on_cuda_there_is_one_worker_per_visible_gpu_and_worker_i_runs_on_cuda_i(params_file, tmp_path, monkeypatch):
    import multiprocessing as mp

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # four GPUs, the one thing faked
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(bench, "available_cpus", lambda: 8)  # (and the CPUs this process may use)
    args = {"seeds": 1, "ratios": (2,), "quick": False, "experiment": "e", "out": tmp_path / "out"}
    p = prepare(params_file, [], **args)  # device=auto: 11 runs (1 seed) on 4 GPUs
    assert len(p.todo) == 11 and p.workers == 4 and p.threads == 2
    gpus = gpu_slots(p.cfg)
    assert gpus == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    started = mp.get_context("spawn").Value("i", 0)  # what run_jobs hands its workers
    taken = [_take_gpu(gpus, started) for _ in range(5)]  # the first workers in start order (a fifth wraps round)
    assert taken == [("device=cuda:0",), ("device=cuda:1",), ("device=cuda:2",), ("device=cuda:3",), ("device=cuda:0",)]
    job = p.todo[0]
    assert load_config(params_file, [*job.overrides, *taken[3]]).device == "cuda:3"  # the run worker 3 makes

    assert prepare(params_file, [], workers=2, **args).workers == 2  # --workers still decides
    pinned = prepare(params_file, ["device=cuda:2"], **args)  # one GPU chosen: every run there, one worker
    assert gpu_slots(pinned.cfg) == () and pinned.workers == 1
    cpu = prepare(params_file, ["device=cpu"], **args)
    assert gpu_slots(cpu.cfg) == () and (cpu.workers, cpu.threads) == (8, 1)  # one per CPU, one thread each
    cpu = prepare(params_file, ["device=cpu", "threads=2"], **args)
    assert (cpu.workers, cpu.threads) == (4, 2)  # the `threads` key: that many each, as many fewer workers
    assert _take_gpu((), started) == ()  # no GPU: the run's own device


def _bench(params_file, *args, **kw):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable,
        "-m",
        "dp_ops",
        "bench",
        "--params",
        str(params_file),
        "--seeds",
        "2",
        "--ratio",
        "2",
        "--workers",
        "2",
        "--out",
        str(params_file.parent / "out"),
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=params_file.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # as a program started in a terminal: a shell's background job (`make test &`) inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


@pytest.mark.slow
def test_bench_ctrl_c_kills_runs_resumably_and_the_rerun_resumes_them_then_reports(params_file, tmp_path):
    # --quick: 6 arms at a third of the budget, then static at twice that at its best size; 1 seed
    first = _bench(params_file, "--quick")
    deadline = time.time() + 300
    while not list((tmp_path / "checkpoints").glob("*/state.pt")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "finished before it could be interrupted: " + first.stdout.read()
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group gets SIGINT
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 130, out
    assert "interrupted" in out and "run the same command again" in out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dp-ops-bench")
    runs = client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'experiment'")
    killed = {r.info.run_id for r in runs if r.info.status == "KILLED"}
    assert killed and all(r.info.status in ("KILLED", "FINISHED") for r in runs)  # nothing left RUNNING
    # a run killed after its first completed round has a checkpoint; one killed before it has nothing to resume
    resumable = {rid for rid in killed if checkpoint_path(tmp_path / "checkpoints", rid).is_file()}
    assert resumable

    second = _bench(params_file, "--quick")
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out
    assert "(resumed)" in out and "to resume" in out
    runs = client.search_runs(
        [exp.experiment_id], "tags.`dpops.role` = 'experiment' and attributes.status = 'FINISHED'"
    )
    keys = [(r.data.tags["dpops.arm"], r.data.params["seed"]) for r in runs]
    assert len(keys) == len(set(keys)) == 7  # 3 static, 3 dp, 1 oversample run (1 seed); each run once
    finished = {r.info.run_id for r in runs}
    assert resumable <= finished  # the checkpointed runs themselves finished: resumed, not redone
    assert not (killed - resumable) & finished  # the others were made again as new runs
    assert all(r.data.tags["dpops.bench"].startswith("quick-") for r in runs)
    threads = str(max(1, bench.available_cpus() // 2))  # (--workers 2: each its share of the CPUs)
    assert {r.data.tags["dpops.torch_threads"] for r in runs} == {threads}  # what each worker's runs ran with
    by_arm = {r.data.tags["dpops.arm"]: r for r in runs}
    # static's best size by validation, at twice the budget, made once static had finished
    (more,) = [arm for arm in by_arm if arm.endswith("2× iters")]
    assert (
        by_arm[more].data.tags["dpops.series"] == "iterations" and by_arm[more].data.params["train.iterations"] == "132"
    )
    assert by_arm["dp N=20 P=10"].data.tags["dpops.series"] == "scaling"

    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    arms = ["static N=30", "static N=60", "dp ω=0.1", "dp N=20 P=10", "dp ω=0", "oversample r=4", more]
    assert [r["arm"] for r in report["rows"]] == arms
    h = report["headline"]
    assert h["dp_arm"] == "dp ω=0.1" and h["static_best"] == more.removesuffix(" 2× iters")
    assert h["iteration_multiplier"] > 0 and set(h["iteration_multiplier_per_seed"]) == {"0"}
    assert (tmp_path / "out" / "bench.png").stat().st_size > 10_000
    assert "data multiplier" in out and "iteration multiplier" in out and "OOD gain" in out
    assert "mean ± sd over 1 seed(s)" in out
    assert "95% interval" in out and "(not resolved)" in out  # one seed resolves nothing
    assert h["verdicts"]["data multiplier"] in ("not resolved", "bound") and "data multiplier" in h["intervals"]
    (logged,) = client.search_runs([exp.experiment_id], "tags.`dpops.role` = 'benchmark'")
    assert logged.data.params["guidance_effect_verdict"] == "not resolved"  # (one seed)
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {"bench.json", "bench.png"}

    third = _bench(params_file, "--quick")  # nothing left to do: every run is reused
    out = third.communicate(timeout=300)[0]
    assert third.returncode == 0, out
    assert "7 run(s) finished earlier, 0 to resume, 0 to run" in out


def test_ood_accuracy_is_averaged_where_runs_have_it_and_shown_as_a_column():
    from rich.console import Console

    from dp_ops.render import bench_table

    base = {f: 1.0 for f in ("generated_samples", "pool_size", "iterations", "gen_seconds", "model_evals")}
    runs = {
        ("dp ω=0.05", 0): {**base, "final_val_acc": 0.9, "final_test_acc": 0.9, "final_ood_acc": 0.4},
        ("dp ω=0.05", 1): {**base, "final_val_acc": 0.9, "final_test_acc": 0.9, "final_ood_acc": 0.6},
        ("dp ω=0.05", 2): {**base, "final_val_acc": 0.9, "final_test_acc": 0.9},  # a run made before it existed
        ("static N=500", 0): {**base, "final_val_acc": 0.8, "final_test_acc": 0.8},  # e.g. image folders
    }
    arms = [Arm("dp", "ω=0.05", ()), Arm("static", "N=500", ())]
    dp, static = summarise(runs, arms, [0, 1, 2])
    assert dp.mean["final_ood_acc"] == pytest.approx(0.5) and dp.sd["final_ood_acc"] == pytest.approx(0.1414, abs=1e-4)
    assert dp.mean["final_test_acc"] == pytest.approx(0.9) and "final_ood_acc" not in dp.per_seed[2]
    assert math.isnan(static.mean["final_ood_acc"])
    console = Console(width=250, record=True)
    console.print(bench_table([dp, static]))
    lines = console.export_text().splitlines()
    header, dp_row, static_row = lines[2], lines[4], lines[5]
    assert header.rstrip(" ┃").endswith("test acc      ┃ OOD acc")
    assert dp_row.rstrip(" │").endswith("0.5000±0.1414") and static_row.rstrip(" │").endswith("—")
