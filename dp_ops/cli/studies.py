"""The study commands, each many runs or none: ``dpops theory`` (the paper's ridge theory, by Monte Carlo),
``dpops sweep`` (an Optuna study), ``dpops bench`` (DP against its baselines, in series) and ``dpops
scaling`` (scaling laws fitted to finished runs). Each builds its config, calls :mod:`dp_ops.studies` and
prints what :mod:`dp_ops.render` makes of the result."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from dp_ops.cli._app import (
    Axis,
    Metric,
    ParamsOpt,
    SetOpt,
    Strategy,
    SweepStrategy,
    app,
    command_config,
    console,
    friendly_errors,
    one_name_per_run,
    quiet_libraries,
    run_generator,
    stopped,
)
from dp_ops.config import build_config, load_tree, sweep_config
from dp_ops.errors import ConfigError, DpOpsError
from dp_ops.files import write_json
from dp_ops.paths import check_paths, generator_exists

if TYPE_CHECKING:
    from dp_ops.engine.dist import World
    from dp_ops.studies.bench import Prepared


@app.command()
@friendly_errors
def theory(
    d: Annotated[int, typer.Option(help="dimension")] = 512,
    rho: Annotated[float, typer.Option(help="selector alignment with the true direction")] = 0.9,
    lam: Annotated[
        float | None, typer.Option(help="ridge penalty λ, normalised by the kept size n (default 0.01)")
    ] = None,
    lam_paper: Annotated[
        float | None,
        typer.Option(
            help="instead of --lam: the paper's λ, normalised by the pool size (kept size/p); a point uses λ_paper/p"
        ),
    ] = None,
    p: Annotated[float, typer.Option(help="kept fraction for the kept-size curve")] = 0.25,
    n: Annotated[int, typer.Option(help="kept size for the oversampling curve")] = 2048,
    mc_reps: Annotated[int, typer.Option(help="Monte-Carlo repetitions per point (0: theory only)")] = 4,
    out: Annotated[Path, typer.Option(help="folder for theory.json and theory.png")] = Path("results/theory"),
    seed: Annotated[int, typer.Option(help="seed of the Monte-Carlo draws")] = 0,
) -> None:
    """The paper's Gaussian/ridge theory of keep-hard selection (Sec. 4), checked by Monte Carlo."""
    from dp_ops.studies.theory import kept_size_curve, oversampling_curve, plot_theory

    if lam is not None and lam_paper is not None:
        raise ConfigError(
            f"--lam {lam:g} and --lam-paper {lam_paper:g}: give one (--lam normalises the ridge by the kept size, "
            "--lam-paper by the pool size, as the paper does)"
        )
    if lam is None and lam_paper is None:
        lam = 0.01
    # theory.py converts λ_paper per point (λ = λ_paper/p: the kept fraction differs between points)
    lams = {"lam": lam, "lam_paper": lam_paper}
    sizes, ratio_grid = [d // 2, d, 2 * d, 4 * d, 8 * d], [1, 2, 4, 8, 16, 32]
    kept = kept_size_curve(d=d, kept_sizes=sizes, p=p, rho=rho, **lams, mc_reps=mc_reps, seed=seed)
    ratios = oversampling_curve(d=d, n=n, ratios=ratio_grid, rho=rho, **lams, mc_reps=mc_reps, seed=seed)
    table = Table("curve", "keep", "n (kept)", "pool", "λ", "theory acc", "Monte Carlo acc", box=None)
    for q in (*kept, *ratios):  # (here, not in dp_ops.render, which imports torch: theory runs without it)
        mc = "—" if q.mc is None else f"{1 - q.mc.mean:.4f} ± {q.mc.sd:.4f}"
        table.add_row(q.curve, q.keep, str(q.n), str(q.pool_size), f"{q.lam:g}", f"{q.theory_accuracy:.4f}", mc)
    console.print(table)
    write_json(
        out / "theory.json", {"kept_size": [q.to_dict() for q in kept], "oversampling": [q.to_dict() for q in ratios]}
    )
    plot_theory(kept, ratios, out / "theory.png")
    lam_line = f"λ={lam:g}" if lam_paper is None else f"λ_paper={lam_paper:g} (λ = λ_paper/p per point)"
    console.print(f"d={d}, ρ={rho:g}, {lam_line}: wrote {out / 'theory.json'} and {out / 'theory.png'}")


@app.command()
@friendly_errors
def sweep(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    strategy: Annotated[
        SweepStrategy,
        typer.Option(help="dp: TPE over dp.omega, dp.patience, dp.round_size; static: grid over sweep.static_sizes"),
    ] = SweepStrategy["dp"],
    study_name: Annotated[
        str | None, typer.Option(help="Optuna study (default: sweep.study, '-static' for the grid)")
    ] = None,
    storage: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL or journal file shared by workers (default: sweep.storage)")
    ] = None,
    n_trials: Annotated[
        int | None, typer.Option(help="the study's trial budget over all workers (sweep.n_trials)")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds after which this worker starts no new trial")] = None,
) -> None:
    """Optuna sweep: every trial a tracked experiment; re-run to continue, start more to work in parallel.
    Under torchrun, every trial one run on all the worker's processes."""
    cli = [f"sweep.{k}={v}" for k, v in (("storage", storage), ("n_trials", n_trials)) if v is not None]
    tree = load_tree(params, [*(set_ or ()), *cli])
    sc, cfg = sweep_config(tree), build_config(tree)
    one_name_per_run(cfg, "a sweep")
    check_paths(cfg)  # (the trials change dp.* only: the same paths as preflight's)
    from dp_ops import runner
    from dp_ops.engine import dist
    from dp_ops.records.tracking import TrackingStore, tracking_uri
    from dp_ops.render import RichObserver, print_sweep, print_trial, progress_bars
    from dp_ops.studies.sweep import Sweep, check_separate_stores, tracked_runner

    quiet_libraries()  # the CLI reports trials itself
    logging.getLogger("optuna.study._optimize").setLevel(logging.ERROR)  # (a failed trial: one line, no traceback)
    name = study_name or (f"{sc.study}-static" if strategy == "static" else sc.study)
    check_separate_stores(sc.storage, tracking_uri(cfg))
    world = dist.join(cfg.device)
    dist.use_threads(cfg.threads, world)
    try:
        if world.distributed and sc.prune:
            raise ConfigError(
                "sweep.prune=true: a trial on several processes is not pruned (only rank 0 hears from Optuna); "
                "use one process per worker, or sweep.prune=false"
            )
        runner.preflight(cfg, world)
        real = runner.load_real_data(cfg, world)
        if not world.main:
            runner.follow_runs(run_generator(cfg, real, None, world), real, world)
            return
        store = TrackingStore.from_config(cfg)  # (opened only now: a refused sweep leaves no store behind)
        base = [o for o in (set_ or ()) if not o.startswith("sweep.")]
        worker = Sweep(cfg, sc, strategy=strategy.value, study_name=name, base_overrides=base, store=store)
        with progress_bars(console) as progress:
            generator = run_generator(cfg, real, progress, world)
            console.print(f"study [bold]{name}[/] at {sc.storage}: budget {worker.budget} trials over all workers")
            try:
                outcome = worker.run(
                    tracked_runner(generator, real, store, world),
                    timeout=timeout,
                    observers=lambda n: [RichObserver(progress)],
                    on_trial=lambda o: print_trial(console, progress, o),
                )
            except KeyboardInterrupt as exc:
                run_id = getattr(exc, "run_id", None)
                trial = f"the running trial (run {run_id}, ended KILLED) was re-queued at once; " if run_id else ""
                stopped(f"{trial}run the same dpops sweep command to continue the study")
        runner.end_runs(world)
    finally:
        dist.leave()
    print_sweep(console, outcome, worker.experiment, store.uri)


@app.command()
@friendly_errors
def bench(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    quick: Annotated[
        bool,
        typer.Option(
            help="smoke check: a third of the budget, 1 seed, the 2 smallest static sizes, DP at its N, P and at "
            "half them, DP at ω=0, r=4, static at twice the budget"
        ),
    ] = False,
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1 for every arm")] = 3,
    ratio: Annotated[list[int] | None, typer.Option(help="oversampling ratios (default 2, 4, 8); repeatable")] = None,
    workers: Annotated[
        int,
        typer.Option(
            help="parallel runs (default: one per CPU this process may use, with 1 torch thread each or the "
            "`threads` key's count, one per GPU on CUDA)"
        ),
    ] = 0,
    series: Annotated[
        str,
        typer.Option(
            help="only these series' runs: comma-separated, from scaling, omega, oversample, iterations, headline "
            "(the arms the headline reads); the other series' finished runs are still reported"
        ),
    ] = "",
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the benchmark runs")] = "dp-ops-bench",
    out: Annotated[Path, typer.Option(help="folder for bench.json, bench.png and the runs' metrics")] = Path(
        "results/bench"
    ),
) -> None:
    """DP vs static vs oversample-then-prune, in series, same seeds and budget: one table, the headline ratios, a plot.
    Re-run the same command to reuse finished runs and resume interrupted ones. Under torchrun, every run
    on all the processes."""
    tree = load_tree(params, set_ or ())
    cfg = build_config(tree)
    one_name_per_run(cfg, "the benchmark")
    sweep_config(tree)  # (sweep.static_sizes: the benchmark's static arms)
    check_paths(cfg)  # (the arms change dp.*, seed and train.iterations only: the same paths as preflight's)
    from dp_ops.studies.bench_stats import check_series

    chosen = check_series(tuple(s.strip() for s in series.split(",") if s.strip()))  # (on every process)
    quiet_libraries()
    from dp_ops import runner
    from dp_ops.engine import dist
    from dp_ops.studies import bench as bm

    world = dist.join(cfg.device)
    dist.use_threads(cfg.threads, world)  # (this process's: a worker takes its share, bench.run_jobs)
    try:
        if not world.main:  # (under torchrun) take part in every run rank 0 leads
            cfg = world.broadcast(None)
            real = runner.load_real_data(cfg, world)
            runner.follow_runs(run_generator(cfg, real, None, world), real, world)
            return
        p = bm.prepare(
            params,
            set_ or (),
            seeds=seeds,
            ratios=ratio or bm.RATIOS,
            quick=quick,
            experiment=experiment,
            out=out,
            workers=workers,
            series=chosen,
        )
        with bm.held(p) as note:  # (a second invocation of this benchmark is refused while this one lives)
            if note:
                console.print(note)
            world.broadcast(p.cfg)
            _bench(p, params, experiment, out, world)
    finally:
        dist.leave()


def _bench(p: Prepared, params: Path | None, experiment: str, out: Path, world: World) -> None:
    import time

    from dp_ops import runner
    from dp_ops.render import bench_intro, print_bench_report, print_bench_result, progress_bars
    from dp_ops.studies import bench as bm

    console.print(bench_intro(p, world), soft_wrap=True)
    failed: list[bm.JobResult] = []
    t0 = time.perf_counter()
    with progress_bars(console) as progress:
        if p.todo and not generator_exists(p.cfg):  # trained once here, before the workers load it
            run_generator(p.cfg, runner.load_real_data(p.cfg), progress)
        world.barrier()  # (the other processes load it now)
        task = progress.add_task("benchmark runs", total=len(p.todo))

        def on_result(r: bm.JobResult) -> None:
            progress.advance(task)
            if r.error:
                failed.append(r)
            print_bench_result(console, r)

        try:
            bm.run_all(p, params, out, world, on_result=on_result, on_planned=lambda n: progress.update(task, total=n))
        except KeyboardInterrupt:
            stopped(
                "every running run ended KILLED at its last completed round; run the same command again to resume them"
            )
    wall = time.perf_counter() - t0
    print_bench_report(console, bm.finish(p, out, wall), p, experiment, wall)
    if failed:
        raise DpOpsError(
            f"{len(failed)} run(s) failed (first: {failed[0].arm} seed {failed[0].seed}: {failed[0].error})"
        )


@app.command()
@friendly_errors
def scaling(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    experiment: Annotated[
        list[str] | None,
        typer.Option(help="MLflow experiment(s) to read (default: the config's, see tracking.experiment); repeatable"),
    ] = None,
    study: Annotated[str | None, typer.Option(help="only runs of this sweep study (tag dpops.study)")] = None,
    strategy: Annotated[list[Strategy] | None, typer.Option(help="only these strategies; repeatable")] = None,
    filter_: Annotated[str, typer.Option("--filter", help="extra MLflow filter, e.g. \"params.seed = '0'\"")] = "",
    metrics: Annotated[
        list[Path] | None, typer.Option(help="read these metrics.json files instead of MLflow (DVC stages)")
    ] = None,
    metric: Annotated[
        Metric, typer.Option(help="the accuracy fitted: held-out test or validation")
    ] = Metric.final_test_acc,
    x: Annotated[Axis, typer.Option(help="n: the kept pool, or every sample generated")] = Axis.pool_size,
    target: Annotated[
        list[float] | None, typer.Option(help="accuracy to report samples needed for; repeatable")
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for scaling.json and scaling.png")] = Path("results/scaling"),
    log: Annotated[bool, typer.Option(help="log the report as an MLflow run tagged dpops.role=scaling")] = True,
) -> None:
    """Fit error(n) = a·n^(−α) + c per strategy from finished runs; report the data multiplier of DP."""
    cfg = command_config(params, set_)
    from dp_ops.records.tracking import TrackingStore
    from dp_ops.render import print_scaling
    from dp_ops.studies.scaling_report import (
        log_report,
        points_from_files,
        points_from_mlflow,
        scaling_report,
        write_report,
    )

    store, experiments = TrackingStore.from_config(cfg), experiment or [cfg.tracking.experiment_name]
    if metrics:
        runs = points_from_files(metrics)
    else:
        strategies = [s.value for s in strategy or ()]
        runs = points_from_mlflow(store, experiments, study=study, strategies=strategies, filter_string=filter_)
    targets = target or [0.97, 0.98, 0.99]
    report = scaling_report(runs, metric=metric.value, x=x.value, targets=targets)
    files = write_report(report, out)
    print_scaling(console, report, files)
    if log:
        source = (
            {"metrics_files": ",".join(map(str, metrics))}
            if metrics
            else {"experiments": ",".join(experiments), "study": study or "", "filter": filter_}
        )
        run_id = log_report(
            report,
            files,
            store,
            cfg.tracking.experiment_name,
            {**source, "metric": metric.value, "x": x.value, "runs": str(len(runs))},
        )
        console.print(
            f"MLflow run [bold]{run_id}[/] (dpops.role=scaling) in '{cfg.tracking.experiment_name}' at {store.uri}",
            soft_wrap=True,
        )
