"""Does DP beat static generation and oversample-then-prune? The benchmark that answers in numbers.

Arms, each run with the same seeds, learner, iteration budget and evaluation (only the acquisition step
differs; every run is an ordinary tracked experiment, so ``dpops scaling`` reads them too):

- ``static`` at every size of ``sweep.static_sizes``: all data generated up front, unguided;
- ``dp`` at the configured ω, and at ω = 0: the same dynamic schedule without guidance, which isolates
  what entropy guidance adds;
- ``oversample`` at ratios r (2, 4, 8): the same N, P and patience as dp, so the kept pool grows by the
  same P per round, but each round generates r·P unguided samples and keeps the P of highest entropy.

Headline ratios, from the means over seeds (and per seed, for their spread):

- **data multiplier** = samples static needs to reach DP's test accuracy (read off static's mean
  accuracies, interpolated linearly in log n, never extrapolated) ÷ samples DP generated;
- **generation-compute multiplier vs oversample** = UNet evaluations (and generation seconds) of the
  cheapest oversample ratio that reaches DP's test accuracy ÷ DP's.

The held-out test split is reported only; nothing here chooses anything by it.

Runs execute in ``workers`` processes with ``threads`` torch threads each, so every run of a benchmark
is timed under the same conditions. A benchmark is identified by its resolved base config (the
``dpops.bench`` tag): re-running it reuses FINISHED runs and resumes interrupted ones from their last
completed round, so Ctrl-C or a crash loses nothing that was finished.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dp_ops.config import Config, flatten, load_config
from dp_ops.errors import ConfigError
from dp_ops.loop import Observer
from dp_ops.scaling import interpolate_samples_for_accuracy

FIELDS = ("generated_samples", "pool_size", "iterations", "gen_seconds", "unet_evals", "final_val_acc",
          "final_test_acc")  # fmt: skip
RATIOS = (2, 4, 8)
# --quick, a smoke check of the whole benchmark in minutes: one seed, the two smallest static sizes, r = 4,
# a third of the iteration budget
QUICK_RATIOS = (4,)


@dataclass(frozen=True)
class Arm:
    """One strategy at one setting, e.g. ``dp ω=0.05``; ``overrides`` are params.yaml keys."""

    strategy: str
    setting: str
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.strategy} {self.setting}"


@dataclass(frozen=True)
class BenchPlan:
    bench_id: str  # the dpops.bench tag: mode + hash of the resolved base config
    base: tuple[str, ...]  # overrides every run shares
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    dp_arm: str
    dp0_arm: str


@dataclass(frozen=True)
class Job:
    arm: Arm
    seed: int
    overrides: tuple[str, ...]  # the whole run's overrides on top of the params file
    resume_run_id: str | None = None


@dataclass(frozen=True)
class JobResult:
    arm: str
    seed: int
    metrics: dict[str, Any] | None  # the run's summary; None if it did not finish
    run_id: str = ""
    resumed: bool = False
    error: str = ""  # why it did not finish ("" and no metrics: interrupted, resumable)


@dataclass(frozen=True)
class ArmStats:
    """One row of the table: an arm's mean and sample standard deviation over seeds of each field."""

    arm: str
    strategy: str
    setting: str
    seeds: int
    mean: dict[str, float]
    sd: dict[str, float]
    per_seed: dict[int, dict[str, float]]


@dataclass(frozen=True)
class Headline:
    dp_arm: str
    dp_test_acc: float
    dp_samples: float
    static_samples_needed: float  # inf: no static size reached DP's accuracy
    data_multiplier: float  # if static never got there: the lower bound largest static size ÷ DP's samples
    static_reached: bool
    data_multiplier_per_seed: dict[int, float]  # each DP seed's accuracy read off static's mean curve
    guidance_effect: float | None  # mean over seeds of test acc (dp ω) − test acc (dp ω=0), paired by seed
    guidance_effect_sd: float | None
    oversample_arm: str | None  # the cheapest ratio at DP's accuracy or better; if none, the most accurate
    oversample_reached: bool
    compute_multiplier: float | None  # UNet evaluations of that arm ÷ DP's
    seconds_multiplier: float | None  # generation seconds of that arm ÷ DP's

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


def plan(
    params: Path | None, overrides: Sequence[str], *, static_sizes: Sequence[int], seeds: Sequence[int],
    experiment: str, quick: bool = False, ratios: Sequence[int] = RATIOS,
) -> tuple[BenchPlan, Config]:  # fmt: skip
    """The arms and seeds of a benchmark, every arm's config validated before any work starts."""
    if not seeds:
        raise ConfigError("--seeds: need at least one seed")
    if not ratios or min(ratios) < 2:
        raise ConfigError(f"--ratio {min(ratios, default=None)}: give oversampling ratios >= 2")
    if len(static_sizes) < 2:
        raise ConfigError(f"sweep.static_sizes={list(static_sizes)}: the benchmark needs >= 2 static sizes")
    base = [*overrides, f"tracking.experiment={experiment}"]
    if quick:
        iterations = load_config(params, base).train.iterations
        base = [f"train.iterations={max(iterations // 3, 1)}", *base]
        static_sizes, ratios, seeds = sorted(static_sizes)[:2], QUICK_RATIOS, seeds[:1]
    cfg = load_config(params, base)
    if cfg.dp.omega == 0:
        raise ConfigError("dp.omega=0: the benchmark compares dp at dp.omega > 0 with dp at ω=0; set dp.omega > 0")
    dp = Arm("dp", f"ω={cfg.dp.omega:g}", ("dp.strategy=dp",))
    dp0 = Arm("dp", "ω=0", ("dp.strategy=dp", "dp.omega=0"))
    arms = [Arm("static", f"N={n}", ("dp.strategy=static", f"dp.initial_size={n}")) for n in sorted(static_sizes)]
    arms += [dp, dp0, *(Arm("oversample", f"r={r}", ("dp.strategy=oversample", f"dp.oversample_ratio={r}"))
                        for r in sorted(ratios))]  # fmt: skip
    for arm in arms:
        load_config(params, [*base, *arm.overrides])
    digest = hashlib.md5(repr(sorted(flatten(cfg).items())).encode()).hexdigest()[:8]
    bench_id = ("quick-" if quick else "full-") + digest
    return BenchPlan(bench_id, tuple(base), tuple(arms), tuple(seeds), dp.name, dp0.name), cfg


def jobs(bp: BenchPlan, done: dict[tuple[str, int], Any], resumable: dict[tuple[str, int], str], out: Path) -> list[Job]:
    """The runs still to make (interrupted ones resume), the most generation first so workers end together."""
    todo = []
    for arm in bp.arms:
        for seed in bp.seeds:
            if (arm.name, seed) in done:
                continue
            run_dir = out / "runs" / f"{arm.strategy}-{arm.setting.replace('=', '')}-seed{seed}"
            overrides = (*bp.base, *arm.overrides, f"seed={seed}", f"output.metrics={run_dir / 'metrics.json'}",
                         f"output.rounds={run_dir / 'rounds.json'}")  # fmt: skip
            todo.append(Job(arm, seed, overrides, resumable.get((arm.name, seed))))
    position = {arm.name: i for i, arm in enumerate(bp.arms)}
    rank = {"oversample": 0, "static": 1, "dp": 2}
    return sorted(todo, key=lambda j: (rank[j.arm.strategy], -position[j.arm.name], j.seed))


def registry_state(client: Any, experiment_id: str, bench_id: str) -> tuple[dict, dict]:
    """From MLflow: FINISHED runs' metrics, and interrupted runs that have a checkpoint, by (arm, seed)."""
    from dp_ops.checkpoint import checkpoint_path

    runs = client.search_runs([experiment_id], f"tags.`dpops.bench` = '{bench_id}'", max_results=10_000,
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    done: dict[tuple[str, int], dict[str, float]] = {}
    resumable: dict[tuple[str, int], str] = {}
    for r in runs:
        key = (r.data.tags["dpops.arm"], int(r.data.params["seed"]))
        if r.info.status == "FINISHED":
            done.setdefault(key, r.data.metrics)
        elif checkpoint_path(r.data.params["output.checkpoints"], r.info.run_id).is_file():
            resumable.setdefault(key, r.info.run_id)
    return done, {k: v for k, v in resumable.items() if k not in done}


# ---- running in worker processes ---------------------------------------------------------------------
class _Stop(Observer):
    """Turns the parent's stop request (Ctrl-C) into KeyboardInterrupt at the run's next loop event, so it
    ends KILLED with its last completed round checkpointed, as Ctrl-C on ``dpops run`` would."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def on_progress(self, task: str, completed: int, total: int) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt


_WORKER: dict[str, Any] = {}


def _init_worker(threads: int, params: Path | None, bench_id: str, stop: Any) -> None:
    import logging
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    torch.set_num_threads(threads)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    _WORKER.update(params=params, bench_id=bench_id, stop=stop)


def _run_job(job: Job) -> JobResult:
    """One benchmark run in a worker (which loads the generator and the real data once)."""
    from dp_ops import experiment

    w = _WORKER
    if w["stop"].is_set():
        return JobResult(job.arm.name, job.seed, None)
    try:
        cfg = load_config(w["params"], job.overrides)
        if "generator" not in w:
            w["real"] = experiment.load_real_data(cfg)
            w["generator"] = experiment.load_generator(cfg, w["real"])
        tags = {"dpops.bench": w["bench_id"], "dpops.arm": job.arm.name}
        result, tracker, _ = experiment.run_tracked(cfg, w["generator"], w["real"], [_Stop(w["stop"])],
                                                    resume_run_id=job.resume_run_id, tags=tags)  # fmt: skip
    except KeyboardInterrupt:
        return JobResult(job.arm.name, job.seed, None)
    except Exception as exc:  # noqa: BLE001 - one failed run is reported, the benchmark goes on
        return JobResult(job.arm.name, job.seed, None, error=f"{type(exc).__name__}: {exc}")
    return JobResult(job.arm.name, job.seed, result.summary.to_dict(), tracker.run_id, job.resume_run_id is not None)


def run_jobs(
    todo: Sequence[Job], bench_id: str, params: Path | None, *, workers: int, threads: int,
    on_result: Callable[[JobResult], None] = lambda r: None,
) -> list[JobResult]:  # fmt: skip
    """Run ``todo`` in ``workers`` spawned processes. Ctrl-C stops every run at its next loop event (it
    ends KILLED and resumable), starts nothing new, and re-raises KeyboardInterrupt once all have stopped.
    Create the MLflow store and experiment before calling (two processes creating one SQLite file clash)."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    results: list[JobResult] = []
    interrupted = False
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, params, bench_id, stop)) as pool:  # fmt: skip
        pending: set[Future] = {pool.submit(_run_job, job) for job in todo}
        while pending:
            try:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                stop.set()
                interrupted = True
                continue
            for future in finished:
                results.append(future.result())
                on_result(results[-1])
    if interrupted:
        raise KeyboardInterrupt
    return results


# ---- the numbers -----------------------------------------------------------------------------------
def summarise(runs: dict[tuple[str, int], dict[str, float]], bp: BenchPlan) -> list[ArmStats]:
    """One row per arm that has finished runs, in plan order."""
    rows = []
    for arm in bp.arms:
        per_seed = {seed: runs[(arm.name, seed)] for seed in bp.seeds if (arm.name, seed) in runs}
        if not per_seed:
            continue
        values = {f: [float(m[f]) for m in per_seed.values()] for f in FIELDS}
        rows.append(ArmStats(
            arm.name, arm.strategy, arm.setting, len(per_seed),
            mean={f: statistics.fmean(v) for f, v in values.items()},
            sd={f: statistics.stdev(v) if len(v) > 1 else 0.0 for f, v in values.items()},
            per_seed={s: {f: float(m[f]) for f in FIELDS} for s, m in per_seed.items()},
        ))  # fmt: skip
    return rows


def headline(rows: Sequence[ArmStats], dp_arm: str, dp0_arm: str) -> Headline | None:
    """The two headline ratios (and the guidance effect); None without a DP row and >= 2 static sizes."""
    by = {r.arm: r for r in rows}
    static = sorted((r for r in rows if r.strategy == "static"), key=lambda r: r.mean["generated_samples"])
    dp = by.get(dp_arm)
    if dp is None or len(static) < 2:
        return None
    n_static = [r.mean["generated_samples"] for r in static]
    acc_static = [r.mean["final_test_acc"] for r in static]

    def multiplier(acc: float, samples: float) -> float:
        return interpolate_samples_for_accuracy(n_static, acc_static, acc) / samples

    acc, samples = dp.mean["final_test_acc"], dp.mean["generated_samples"]
    need = interpolate_samples_for_accuracy(n_static, acc_static, acc)
    reached = math.isfinite(need)
    effect, effect_sd = _paired_difference(dp, by.get(dp0_arm))
    over_arm, over_reached, compute, seconds = _versus_oversample(dp, [r for r in rows if r.strategy == "oversample"])
    return Headline(
        dp_arm=dp.arm, dp_test_acc=acc, dp_samples=samples, static_samples_needed=need,
        data_multiplier=(need if reached else max(n_static)) / samples, static_reached=reached,
        data_multiplier_per_seed={s: multiplier(m["final_test_acc"], m["generated_samples"]) for s, m in dp.per_seed.items()},
        guidance_effect=effect, guidance_effect_sd=effect_sd, oversample_arm=over_arm,
        oversample_reached=over_reached, compute_multiplier=compute, seconds_multiplier=seconds,
    )  # fmt: skip


def _paired_difference(dp: ArmStats, dp0: ArmStats | None) -> tuple[float | None, float | None]:
    if dp0 is None:
        return None, None
    diffs = [dp.per_seed[s]["final_test_acc"] - dp0.per_seed[s]["final_test_acc"] for s in dp.per_seed if s in dp0.per_seed]
    if not diffs:
        return None, None
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)


def _versus_oversample(dp: ArmStats, over: Sequence[ArmStats]) -> tuple[str | None, bool, float | None, float | None]:
    if not over:
        return None, False, None, None
    reaching = [r for r in over if r.mean["final_test_acc"] >= dp.mean["final_test_acc"]]
    pick = min(reaching, key=lambda r: r.mean["unet_evals"]) if reaching else max(over, key=lambda r: r.mean["final_test_acc"])
    return (pick.arm, bool(reaching), pick.mean["unet_evals"] / dp.mean["unet_evals"],
            pick.mean["gen_seconds"] / dp.mean["gen_seconds"])  # fmt: skip


def headline_lines(h: Headline) -> list[str]:
    """The headline in words, one sentence per ratio."""
    seeds = ", ".join(_times(v) for _, v in sorted(h.data_multiplier_per_seed.items()))
    if h.static_reached:
        data = (f"data multiplier: static needs {_times(h.data_multiplier)} the samples {h.dp_arm} generated to reach "
                f"its test accuracy {h.dp_test_acc:.4f} ({h.static_samples_needed:,.0f} vs {h.dp_samples:,.0f}; "
                f"static's mean accuracies interpolated in log n; per DP seed: {seeds})")  # fmt: skip
    else:
        data = (f"data multiplier: more than {h.data_multiplier:.2f}× — no static size reached {h.dp_arm}'s test "
                f"accuracy {h.dp_test_acc:.4f} with {h.dp_samples:,.0f} samples (per DP seed: {seeds})")  # fmt: skip
    lines = [data]
    if h.guidance_effect is not None:
        lines.append(f"guidance effect: {h.dp_arm} − dp ω=0 = {h.guidance_effect:+.4f} test accuracy "
                     f"(sd {h.guidance_effect_sd:.4f} over paired seeds)")  # fmt: skip
    if h.oversample_arm is not None:
        if h.oversample_reached:
            lines.append(f"generation compute vs oversample: {h.oversample_arm}, the cheapest ratio at DP's test "
                         f"accuracy or better, uses {_times(h.compute_multiplier)} DP's UNet evaluations and "
                         f"{_times(h.seconds_multiplier)} its generation seconds")  # fmt: skip
        else:
            lines.append(f"generation compute vs oversample: no ratio reached DP's test accuracy; the most accurate, "
                         f"{h.oversample_arm}, used {_times(h.compute_multiplier)} DP's UNet evaluations and "
                         f"{_times(h.seconds_multiplier)} its generation seconds")  # fmt: skip
    return lines


def plot(rows: Sequence[ArmStats], path: Path) -> None:
    """Held-out test accuracy vs generated samples (log x), mean ± sd over seeds, one colour per strategy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = {"dp": "D", "oversample": "s"}
    for i, strategy in enumerate(("static", "dp", "oversample")):
        rs = sorted((r for r in rows if r.strategy == strategy), key=lambda r: r.mean["generated_samples"])
        for j, r in enumerate(rs):
            ax.scatter([m["generated_samples"] for m in r.per_seed.values()],
                       [m["final_test_acc"] for m in r.per_seed.values()], s=9, color=f"C{i}", alpha=0.3, lw=0)
            unguided_dp = strategy == "dp" and r.setting == "ω=0"  # hollow: the schedule without guidance
            ax.errorbar(r.mean["generated_samples"], r.mean["final_test_acc"], yerr=r.sd["final_test_acc"],
                        fmt=markers.get(strategy, "o"), color=f"C{i}", capsize=3, ms=5,
                        mfc="white" if unguided_dp else f"C{i}", label=strategy if j == 0 else None)  # fmt: skip
            if strategy != "static":
                ax.annotate(r.setting, (r.mean["generated_samples"], r.mean["final_test_acc"]), fontsize=7,
                            xytext=(5, -10 if r.setting.endswith("=0") else 5), textcoords="offset points")
        if strategy == "static" and rs:
            ax.plot([r.mean["generated_samples"] for r in rs], [r.mean["final_test_acc"] for r in rs], "-",
                    color=f"C{i}", lw=1)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("generated samples")
    ax.set_ylabel("held-out test accuracy")
    ax.set_title("mean ± sd over seeds (faint: single seeds)", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _times(v: float | None) -> str:
    return "—" if v is None else ("∞×" if math.isinf(v) else f"{v:.2f}×")


def _json_safe(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _json_safe(v) for k, v in node.items()}
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def write_report(bp: BenchPlan, rows: Sequence[ArmStats], h: Headline | None, out: Path, *, uri: str,
                 experiment: str, wall_seconds: float) -> tuple[Path, Path, str]:  # fmt: skip
    """``bench.json`` and ``bench.png`` in ``out``, both logged to an MLflow run tagged ``dpops.role=benchmark``
    (the headline ratios are its metrics). Returns the two paths and that run's id."""
    from dp_ops.experiment import write_json
    from dp_ops.tracking import log_report_run

    out.mkdir(parents=True, exist_ok=True)
    report = {"bench": bp.bench_id, "seeds": list(bp.seeds), "base_overrides": list(bp.base),
              "rows": [_json_safe(asdict(r)) for r in rows], "headline": h.to_dict() if h else None,
              "wall_seconds_this_invocation": wall_seconds}  # fmt: skip
    write_json(out / "bench.json", report)
    plot(rows, out / "bench.png")
    metrics: dict[str, float] = {}
    if h is not None:
        metrics = {k: v for k, v in asdict(h).items() if isinstance(v, float)}
    run_id = log_report_run(uri, experiment, role="benchmark", run_name=f"bench-{bp.bench_id}", metrics=metrics,
                            params={"dpops.bench": bp.bench_id, "seeds": ",".join(map(str, bp.seeds)),
                                    "overrides": " ".join(bp.base)},
                            files=(out / "bench.json", out / "bench.png"))  # fmt: skip
    return out / "bench.json", out / "bench.png", run_id
