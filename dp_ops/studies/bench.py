"""Does DP beat static generation and oversample-then-prune? The benchmark that answers in numbers.

Arms, each run with the same seeds, learner, iteration budget and evaluation (only the acquisition step
differs; every run is an ordinary tracked experiment, so ``dpops scaling`` reads them too), in series
(the ``dpops.series`` tag):

- ``scaling``: ``static`` at every size of ``sweep.static_sizes`` (all data generated up front, unguided),
  and ``dp`` at its N and P, at N and P scaled by 0.5 and 2, and with one round: one scaling law per
  strategy;
- ``omega``: ``dp`` at its N and P with ω = 0 (the same dynamic schedule without guidance: what entropy
  guidance adds), 0.02, 0.05, 0.1, 0.2;
- ``oversample`` at ratios r (2, 4, 8): the same N, P and patience as dp, so the kept pool grows by the
  same P per round, but each round generates r·P unguided samples and keeps the P of highest entropy;
- ``iterations``: once every static run has finished, static at its best size (by validation) with 2× and
  4× the budget (:func:`iteration_arms`), for the iteration multiplier.

``--series`` runs only some series (:func:`selected_arms`), and ``headline`` only the arms the headline reads:
static at its sizes, DP at its ω and at ω = 0, the iteration series, and oversample at the ratio the headline
compares with (every ratio until one has finished runs). So ``--series headline --seeds 8`` gives the figures 8
seeds without re-running the rest; the report still reads every finished run of the benchmark, at any seed.

The table, the headline ratios (data and iteration multipliers, generation-compute multiplier vs
oversample, OOD gain, guidance effect) and the plot are :mod:`dp_ops.studies.bench_stats`. The held-out test
and OOD splits are reported only; nothing here chooses anything by them.

Runs execute in ``workers`` processes with ``threads`` torch threads each, so every run of a benchmark
is timed under the same conditions. On the CPU the default is one worker per CPU this process may use
with one thread each (the ``threads`` key, when set, gives each worker that many); every run records its
count (the ``dpops.torch_threads`` tag).
On CUDA (``device=auto`` or ``cuda`` on a machine with GPUs) it is one worker per visible GPU, and worker
i (in start order) runs every run it takes on ``cuda:i`` (``device=cuda:i`` on top of the run's
overrides, so the run's params say where it ran); ``device=cuda:N`` keeps every run on that one GPU.
Started by torchrun (``torchrun … -m dp_ops bench``), each run instead spans all the processes (GPUs),
and the runs go one after another (:func:`run_jobs_across`).
A benchmark is identified by its resolved base config (the ``dpops.bench`` tag): re-running it reuses
FINISHED runs and resumes interrupted ones from their last completed round, so Ctrl-C or a crash loses
nothing that was finished.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import statistics
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dp_ops import runner
from dp_ops.config import Config, flatten, load_config, load_tree, run_files, sweep_config
from dp_ops.engine.devices import resolve_device
from dp_ops.engine.dist import World, available_cpus, make_current, threads_tag
from dp_ops.engine.loop import Observer
from dp_ops.engine.strategies import STRATEGIES
from dp_ops.errors import ConfigError
from dp_ops.files import write_json
from dp_ops.records.checkpoint import checkpoint_path
from dp_ops.records.lease import BEAT_EVERY, RunLease, lease_path
from dp_ops.records.tracking import TrackingStore, quiet_logs
from dp_ops.studies.bench_stats import (
    FIGURES,
    HEADLINE,
    Arm,
    ArmStats,
    Headline,
    check_series,
    headline,
    oversample_pick,
    plot,
    run_metrics,
    summarise,
)

RATIOS = (2, 4, 8)
# DP's size series (the paper's Table 4 varies N, P and the rounds): N and P scaled by these, and one round
# at the configured N and P; with DP at its own N and P that is 4 final pool sizes for DP's scaling law
DP_SCALES: tuple[float, ...] = (0.5, 2)
OMEGAS = (0, 0.02, 0.05, 0.1, 0.2)  # DP at its N and P with these ω (0: the schedule without guidance)
ITERATION_FACTORS: tuple[int, ...] = (2, 4)  # static at its best size (by validation) at these × the budget
# --quick, a smoke check of the whole benchmark in minutes: one seed, the two smallest static sizes, r = 4,
# DP at half its N and P, static at twice the budget, a third of the iteration budget
QUICK_RATIOS, QUICK_SCALES, QUICK_FACTORS = (4,), (0.5,), (2,)


@dataclass(frozen=True)
class BenchPlan:
    bench_id: str  # the dpops.bench tag: mode + hash of the resolved base config
    base: tuple[str, ...]  # overrides every run shares
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    dp_arm: str
    dp0_arm: str
    iterations: int  # the budget every arm but the iteration series has
    iteration_factors: tuple[int, ...]


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


def plan(
    params: Path | None,
    overrides: Sequence[str],
    *,
    static_sizes: Sequence[int],
    seeds: Sequence[int],
    experiment: str,
    quick: bool = False,
    ratios: Sequence[int] = RATIOS,
) -> tuple[BenchPlan, Config]:
    """The arms and seeds of a benchmark, every arm's config validated before any work starts."""
    if not seeds:
        raise ConfigError("--seeds: need at least one seed")
    if not ratios or min(ratios) < 2:
        raise ConfigError(f"--ratio {min(ratios, default=None)}: give oversampling ratios >= 2")
    if len(static_sizes) < 2:
        raise ConfigError(f"sweep.static_sizes={list(static_sizes)}: the benchmark needs >= 2 static sizes")
    base = [*overrides, f"tracking.experiment={experiment}"]
    scales, factors = DP_SCALES, ITERATION_FACTORS
    if quick:
        iterations = load_config(params, base).train.iterations
        base = [f"train.iterations={max(iterations // 3, 1)}", *base]
        static_sizes, ratios, seeds = sorted(static_sizes)[:2], QUICK_RATIOS, seeds[:1]
        scales, factors = QUICK_SCALES, QUICK_FACTORS
    cfg = load_config(params, base)
    if cfg.dp.omega == 0:
        raise ConfigError("dp.omega=0: the benchmark compares dp at dp.omega > 0 with dp at ω=0; set dp.omega > 0")
    n, p = cfg.dp.initial_size, cfg.dp.round_size
    dp = Arm("dp", f"ω={cfg.dp.omega:g}", ("dp.strategy=dp",), "scaling")
    omegas = (0,) if quick else OMEGAS
    arms = [
        Arm("static", f"N={size}", ("dp.strategy=static", f"dp.initial_size={size}"), "scaling")
        for size in sorted(set(static_sizes))
    ]
    arms += [dp, *(_dp_size(max(1, round(n * k)), max(1, round(p * k))) for k in scales)]
    if not quick:
        arms.append(Arm("dp", "1 round", ("dp.strategy=dp", "dp.max_rounds=1"), "scaling"))
    arms += [Arm("dp", f"ω={w:g}", ("dp.strategy=dp", f"dp.omega={w}"), "omega") for w in omegas if w != cfg.dp.omega]
    arms += [
        Arm("oversample", f"r={r}", ("dp.strategy=oversample", f"dp.oversample_ratio={r}"), "oversample")
        for r in sorted(ratios)
    ]
    for arm in arms:
        load_config(params, [*base, *arm.overrides])
    for k in factors:  # (the size is chosen once static has finished: any of them can be it)
        load_config(params, [*base, "dp.strategy=static", f"train.iterations={k * cfg.train.iterations}"])
    measured = {k: v for k, v in flatten(cfg).items() if k != "threads"}  # (how it ran: not what it measures)
    digest = hashlib.md5(repr(sorted(measured.items())).encode()).hexdigest()[:8]
    bench_id = ("quick-" if quick else "full-") + digest
    bp = BenchPlan(bench_id, tuple(base), tuple(arms), tuple(seeds), dp.name, "dp ω=0", cfg.train.iterations, factors)
    return bp, cfg


def _dp_size(n: int, p: int) -> Arm:
    return Arm("dp", f"N={n} P={p}", ("dp.strategy=dp", f"dp.initial_size={n}", f"dp.round_size={p}"), "scaling")


def iteration_arms(bp: BenchPlan, done: dict[tuple[str, int], Any]) -> tuple[Arm, ...]:
    """Static at ``bp.iteration_factors`` × the budget, at the static size of best mean validation accuracy
    over every finished seed, as the headline reads it (ties: the smaller); none until every static run of
    the scaling series has finished (this invocation's seeds)."""
    static = [a for a in bp.arms if a.strategy == "static" and a.series == "scaling"]
    if not static or any((a.name, s) not in done for a in static for s in bp.seeds):
        return ()
    seeds = finished_seeds(done)  # (a --seeds 3 after a --seeds 8 picks the size the 8-seed report reads)

    def val_acc(arm: Arm) -> float:
        return statistics.fmean(done[(arm.name, s)]["final_val_acc"] for s in seeds if (arm.name, s) in done)

    best = max(static, key=lambda a: (val_acc(a), -_size(a)))
    return tuple(
        Arm(
            "static",
            f"{best.setting} {k}× iters",
            (*best.overrides, f"train.iterations={k * bp.iterations}"),
            "iterations",
        )
        for k in bp.iteration_factors
    )


def _size(arm: Arm) -> int:
    return int(arm.setting.split("=")[1])


def selected_arms(bp: BenchPlan, done: dict[tuple[str, int], Any], series: Sequence[str] = ()) -> tuple[Arm, ...]:
    """The arms to run: the plan's and the iteration series once static has finished (:func:`iteration_arms`),
    only those of ``series`` when given (``headline``: the arms the headline reads, module docstring)."""
    arms = (*bp.arms, *iteration_arms(bp, done))
    if not series:
        return arms
    over = [a for a in arms if a.strategy == "oversample"]
    pick = _oversample_pick(bp, done, over)

    def reads(arm: Arm) -> bool:  # (the headline)
        if arm.strategy == "oversample":
            return pick is None or arm.name == pick
        return arm.name in (bp.dp_arm, bp.dp0_arm) or arm.series == "iterations" or arm.strategy == "static"

    return tuple(a for a in arms if a.series in series or (HEADLINE in series and reads(a)))


def _oversample_pick(bp: BenchPlan, done: dict[tuple[str, int], Any], over: Sequence[Arm]) -> str | None:
    """The oversample arm the headline compares DP with, from the runs finished so far (None: not known yet)."""
    dp = [a for a in bp.arms if a.name == bp.dp_arm]
    return oversample_pick(summarise(done, [*dp, *over], finished_seeds(done)), bp.dp_arm)


def finished_seeds(done: dict[tuple[str, int], Any]) -> list[int]:
    """Every seed with a finished run: a report reads them all, whatever ``--seeds`` this invocation has."""
    return sorted({seed for _, seed in done})


def jobs(
    bp: BenchPlan,
    done: dict[tuple[str, int], Any],
    resumable: dict[tuple[str, int], str],
    out: Path,
    arms: Sequence[Arm] | None = None,
) -> list[Job]:
    """The runs of ``arms`` (default: :func:`selected_arms` of every series) still to make (interrupted ones
    resume), the most generation first so workers end together."""
    arms = selected_arms(bp, done) if arms is None else arms
    todo = []
    for arm in arms:
        for seed in bp.seeds:
            if (arm.name, seed) in done:
                continue
            setting = arm.setting.replace("=", "").replace("×", "x").replace(" ", "-")
            run_dir = out / "runs" / f"{arm.strategy}-{setting}-seed{seed}"
            overrides = (
                *bp.base,
                *arm.overrides,
                f"seed={seed}",
                *run_files(run_dir),
            )
            todo.append(Job(arm, seed, overrides, resumable.get((arm.name, seed))))
    position = {arm.name: i for i, arm in enumerate(arms)}
    return sorted(todo, key=lambda j: (STRATEGIES[j.arm.strategy].bench_order, -position[j.arm.name], j.seed))


def store_state(store: TrackingStore, experiment_id: str, bench_id: str) -> tuple[dict, dict]:
    """From MLflow: FINISHED runs' metrics, and interrupted runs that have a checkpoint, by (arm, seed)."""
    runs = store.search([experiment_id], f"tags.`dpops.bench` = '{bench_id}'", order_by=["attributes.start_time DESC"])
    done: dict[tuple[str, int], dict[str, float]] = {}
    resumable: dict[tuple[str, int], str] = {}
    for r in runs:
        key = (r.tags["dpops.arm"], int(r.params["seed"]))
        if r.status == "FINISHED":
            if key not in done:  # (the latest: an older duplicate is never read)
                done[key] = run_metrics(r.run_id, r.tags, r.params, r.metrics)
        elif checkpoint_path(r.params["output.checkpoints"], r.run_id).is_file():
            resumable.setdefault(key, r.run_id)
    return done, {k: v for k, v in resumable.items() if k not in done}


@dataclass(frozen=True)
class Prepared:
    """A benchmark ready to run: its plan, where its runs live, and what is left to do."""

    plan: BenchPlan
    cfg: Config
    store: TrackingStore  # the MLflow store of the runs and the report
    experiment_id: str
    finished: int  # runs of this benchmark that FINISHED earlier
    todo: tuple[Job, ...]
    workers: int
    threads: int
    series: tuple[str, ...] = ()  # only these series' runs (--series); () every series

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def resuming(self) -> int:
        return sum(j.resume_run_id is not None for j in self.todo)


def prepare(
    params: Path | None,
    overrides: Sequence[str],
    *,
    seeds: int,
    ratios: Sequence[int],
    quick: bool,
    experiment: str,
    out: Path,
    workers: int = 0,
    series: Sequence[str] = (),
) -> Prepared:
    """Plan and check everything before work starts; create the MLflow store and experiment (before any
    worker could race to create them); find what earlier invocations finished or left interrupted.
    ``workers`` 0: one per CPU this process may use (:func:`~dp_ops.engine.dist.available_cpus`) with one
    torch thread each (``threads`` each, and as many times fewer workers, when the key is set), or one
    per GPU (:func:`gpu_slots`); fewer workers (``--workers``) each take their share of the CPUs.
    ``series``: only these series' runs (:func:`selected_arms`)."""
    series = check_series(series)
    sizes = sweep_config(load_tree(params, overrides)).static_sizes
    bp, cfg = plan(
        params, overrides, static_sizes=sizes, seeds=range(seeds), experiment=experiment, quick=quick, ratios=ratios
    )
    runner.preflight(cfg)
    store = TrackingStore.from_config(cfg)
    exp_id = store.experiment_id(experiment)
    done, resumable = store_state(store, exp_id, bp.bench_id)
    todo = jobs(bp, done, resumable, out, selected_arms(bp, done, series))
    cores, gpus = available_cpus(), gpu_slots(cfg)
    per_run = cfg.threads or 1  # (the `threads` key, when set: each worker's torch threads)
    n = workers or len(gpus) or (1 if resolve_device(cfg.device).type == "cuda" else max(1, cores // per_run))
    n = max(1, min(n, len(todo) or 1))
    threads = cfg.threads or max(1, cores // n)
    return Prepared(bp, cfg, store, exp_id, len(done), tuple(todo), n, threads, series)


@contextmanager
def held(p: Prepared) -> Iterator[str | None]:
    """This invocation's hold on its benchmark (a lease, :mod:`dp_ops.records.lease`, at
    ``<output.checkpoints>/bench-<bench id>/``, its heartbeat from a thread): a second ``dpops bench`` of
    the same benchmark in the same workspace, which would make the same runs again, is refused in one line
    while this one lives; one killed outright is taken over. Yields the take-over note, if any."""
    lease = RunLease(
        lease_path(p.cfg.output.checkpoints, f"bench-{p.plan.bench_id}"),
        p.plan.bench_id,
        f"benchmark {p.plan.bench_id}",
    )
    note = lease.acquire()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_EVERY):
            lease.beat(force=True)

    beating = threading.Thread(target=beat, name="dpops-bench-lease", daemon=True)
    beating.start()
    try:
        yield note
    finally:
        stop.set()
        beating.join()
        lease.release()


def gpu_slots(cfg: Config) -> tuple[str, ...]:
    """The devices benchmark workers take in turn: every visible GPU when the runs go to CUDA without a
    fixed index (``device=auto`` or ``cuda``); none on the CPU or with ``device=cuda:N`` (that one GPU)."""
    if resolve_device(cfg.device).type != "cuda" or ":" in cfg.device:
        return ()
    import torch

    return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))


@dataclass(frozen=True)
class BenchReport:
    rows: tuple[ArmStats, ...]
    headline: Headline | None
    json_path: Path
    png_path: Path
    run_id: str  # the MLflow run (dpops.role=benchmark) holding both files


def follow_up(p: Prepared, out: Path, tried: Sequence[Job]) -> list[Job]:
    """What became possible once static finished: the iteration series' runs still to make, less those
    ``tried`` in this invocation (a failed one is not retried until the next)."""
    done, resumable = store_state(p.store, p.experiment_id, p.plan.bench_id)
    seen = {(j.arm.name, j.seed) for j in tried}
    arms = [a for a in selected_arms(p.plan, done, p.series) if a.series == "iterations"]
    todo = jobs(p.plan, done, resumable, out, arms)
    return [j for j in todo if (j.arm.name, j.seed) not in seen]


def run_all(
    p: Prepared,
    params: Path | None,
    out: Path,
    world: World,
    *,
    on_result: Callable[[JobResult], None],
    on_planned: Callable[[int], None] = lambda n: None,
) -> None:
    """Every run this invocation has to make: ``p.todo``, then, once static has finished and its best size is
    known, the iteration series (:func:`follow_up`), until nothing is left. In ``p.workers`` processes, or
    under torchrun (``world``) each run on all the processes, which are told at the end that no run follows.
    ``on_result`` hears each run as it ends; ``on_planned`` the count of runs planned so far, after each batch."""
    todo, tried = list(p.todo), list(p.todo)
    while todo:
        if world.distributed:
            run_jobs_across(todo, p.plan.bench_id, params, world, on_result=on_result)
        else:
            run_jobs(todo, p.plan.bench_id, params, workers=p.workers, threads=p.threads, on_result=on_result)
        todo = follow_up(p, out, tried)
        tried += todo
        on_planned(len(tried))
    if world.distributed:
        runner.end_runs(world)


def finish(p: Prepared, out: Path, wall_seconds: float) -> BenchReport:
    """Summarise every finished run of the benchmark (this invocation's and earlier ones'), write and log it."""
    done, _ = store_state(p.store, p.experiment_id, p.plan.bench_id)
    rows = summarise(done, (*p.plan.arms, *iteration_arms(p.plan, done)), finished_seeds(done))
    h = headline(rows, p.plan.dp_arm, p.plan.dp0_arm)
    json_path, png, run_id = write_report(
        p.plan, rows, h, out, store=p.store, experiment=p.cfg.tracking.experiment_name, wall_seconds=wall_seconds
    )
    return BenchReport(tuple(rows), h, json_path, png, run_id)


def scaling_command(p: Prepared) -> str:
    """``dpops scaling`` over this benchmark's scaling series: static at its sizes and DP at its sizes, both at
    the budget (DP at other ω, oversample and static at more iterations are not points of those laws)."""
    return (
        f"dpops scaling --experiment {p.cfg.tracking.experiment_name} --x generated_samples --filter "
        f"\"tags.`dpops.bench` = '{p.plan.bench_id}' and tags.`dpops.series` = 'scaling'\""
    )


# ---- running in worker processes ---------------------------------------------------------------------
class _Stop(Observer):
    """Turns the parent's stop request (Ctrl-C or SIGTERM) into KeyboardInterrupt at the run's next loop event, so it
    ends KILLED with its last completed round checkpointed, as Ctrl-C on ``dpops run`` would."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def on_progress(self, task: str, completed: int, total: int) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt


_WORKER: dict[str, Any] = {}


def _init_worker(
    threads: int, params: Path | None, bench_id: str, stop: Any, gpus: Sequence[str], started: Any
) -> None:
    import signal

    import torch

    # Ctrl-C reaches the whole process group, Slurm's SIGTERM every process of the job: the parent decides,
    # and stops every run at its next loop event through the ``stop`` event.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    quiet_logs()
    device = _take_gpu(gpus, started)
    _WORKER.update(params=params, bench_id=bench_id, stop=stop, device=device)
    for override in device:  # (its GPU made current: a CUDA context created lazily opens there, not on GPU 0)
        make_current(torch.device(override.removeprefix("device=")))


def _take_gpu(gpus: Sequence[str], started: Any) -> tuple[str, ...]:
    """Worker i (``started`` counts the workers, across processes) gets ``gpus[i % len(gpus)]``, as the
    override ``device=…`` it adds to each of its runs; no GPUs: no override."""
    with started.get_lock():
        i = started.value
        started.value += 1
    return (f"device={gpus[i % len(gpus)]}",) if gpus else ()


def run_jobs_across(
    todo: Sequence[Job],
    bench_id: str,
    params: Path | None,
    world: World,
    on_result: Callable[[JobResult], None] = lambda r: None,
) -> list[JobResult]:
    """Under torchrun: the runs one after another, each on every process (rank 0 calls this, the others
    are in :func:`dp_ops.runner.follow_runs`). A failed run stops the benchmark (:class:`RunAborted`); the
    same command resumes it."""
    results: list[JobResult] = []
    if not todo:
        return results
    first = load_config(params, todo[0].overrides)
    real = runner.load_real_data(first, world)
    generator = runner.load_generator(first, real, world)  # (the arms share both)
    for job in todo:
        cfg = load_config(params, job.overrides)
        tags = {**_tags(bench_id, job.arm), **threads_tag()}
        run = runner.lead_run(runner.RunRequest(cfg, job.resume_run_id, tags), generator, real, world)
        results.append(_result(job, run))
        on_result(results[-1])
    return results


def _tags(bench_id: str, arm: Arm) -> dict[str, str]:
    return {"dpops.bench": bench_id, "dpops.arm": arm.name, "dpops.series": arm.series}


def _result(job: Job, run: runner.TrackedRun) -> JobResult:
    return JobResult(job.arm.name, job.seed, run.result.summary.to_dict(), run.run_id, job.resume_run_id is not None)


def _run_job(job: Job) -> JobResult:
    """One benchmark run in a worker (which loads the generator and the real data once)."""
    w = _WORKER
    if w["stop"].is_set():
        return JobResult(job.arm.name, job.seed, None)
    try:
        cfg = load_config(w["params"], [*job.overrides, *w["device"]])
        if "generator" not in w:
            w["real"] = runner.load_real_data(cfg)
            w["generator"] = runner.load_generator(cfg, w["real"])
        tags = {**_tags(w["bench_id"], job.arm), **threads_tag()}
        run = runner.run_tracked(
            cfg, w["generator"], w["real"], [_Stop(w["stop"])], resume_run_id=job.resume_run_id, tags=tags
        )
    except KeyboardInterrupt:
        return JobResult(job.arm.name, job.seed, None)
    except Exception as exc:  # one failed run is reported, the benchmark goes on
        return JobResult(job.arm.name, job.seed, None, error=f"{type(exc).__name__}: {exc}")
    return _result(job, run)


def run_jobs(
    todo: Sequence[Job],
    bench_id: str,
    params: Path | None,
    *,
    workers: int,
    threads: int,
    on_result: Callable[[JobResult], None] = lambda r: None,
) -> list[JobResult]:
    """Run ``todo`` in ``workers`` spawned processes, worker i on the i-th of the jobs' :func:`gpu_slots`
    (round robin). Ctrl-C or SIGTERM stops every run at its next loop event (it ends KILLED and resumable), starts
    nothing new, and re-raises KeyboardInterrupt once all have stopped.
    Create the MLflow store and experiment before calling (two processes creating one SQLite file clash)."""
    gpus = gpu_slots(load_config(params, todo[0].overrides)) if todo else ()  # (the jobs share their device)
    ctx = mp.get_context("spawn")
    stop, started = ctx.Event(), ctx.Value("i", 0)
    results: list[JobResult] = []
    interrupted = False
    initargs = (threads, params, bench_id, stop, gpus, started)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=initargs) as pool:
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


def write_report(
    bp: BenchPlan,
    rows: Sequence[ArmStats],
    h: Headline | None,
    out: Path,
    *,
    store: TrackingStore,
    experiment: str,
    wall_seconds: float,
) -> tuple[Path, Path, str]:
    """``bench.json`` and ``bench.png`` in ``out``, both logged to an MLflow run tagged ``dpops.role=benchmark``
    (the headline ratios are its metrics). Returns the two paths and that run's id."""
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": bp.bench_id,
        "seeds": list(bp.seeds),
        "base_overrides": list(bp.base),
        "rows": [asdict(r) for r in rows],
        "headline": h.to_dict() if h else None,
        "wall_seconds_this_invocation": wall_seconds,
    }
    write_json(out / "bench.json", report)
    plot(rows, out / "bench.png")
    metrics: dict[str, float] = {}
    words: dict[str, str] = {}
    if h is not None:
        metrics = {k: v for k, v in asdict(h).items() if isinstance(v, float)}
        for name, field, _ in FIGURES:
            if name in h.intervals:
                metrics |= {f"{field}_ci_low": h.intervals[name].low, f"{field}_ci_high": h.intervals[name].high}
                words[f"{field}_verdict"] = h.verdicts[name]
    run_id = store.log_report_run(
        experiment,
        role="benchmark",
        run_name=f"bench-{bp.bench_id}",
        metrics=metrics,
        params={
            "dpops.bench": bp.bench_id,
            "seeds": ",".join(map(str, bp.seeds)),
            "overrides": " ".join(bp.base),
            **words,
        },
        files=(out / "bench.json", out / "bench.png"),
    )
    return out / "bench.json", out / "bench.png", run_id
