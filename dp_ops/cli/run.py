"""``dpops run``: one experiment, started, resumed (``--resume``) or found by its name (``--run-name``).
Which run that is, is decided by :func:`dp_ops.resume.choose_run`; the command says what was decided and
hands the run to :func:`dp_ops.runner.run_tracked`."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Annotated

import typer

from dp_ops.cli._app import (
    ParamsOpt,
    SetOpt,
    app,
    command_config,
    console,
    err_console,
    friendly_errors,
    run_generator,
    stopped,
)
from dp_ops.config import load_config
from dp_ops.errors import ConfigError
from dp_ops.paths import check_paths

if TYPE_CHECKING:
    from dp_ops.resume import RunChoice


@app.command()
@friendly_errors
def run(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        str | None, typer.Option(help="continue this interrupted MLflow run from its last completed round")
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option(
            help="name the run (= -S tracking.run_name): the same command resumes its unfinished run, or does "
            "nothing once it finished (a requeued batch job)"
        ),
    ] = None,
) -> None:
    """Run one experiment (dp, static or oversample), tracked and versioned: an embedded world (digits, MNIST), or
    the text-to-image world with a pretrained pipeline (generator.backend=diffusers). Under torchrun, one run on
    all its processes."""
    if resume is not None and not resume.strip():  # (`--resume "$RUN"` with RUN unset would start a fresh run)
        raise ConfigError("--resume '': no run id given (an empty shell variable?); name the MLflow run to continue")
    overrides = [*(set_ or []), *([f"tracking.run_name={run_name}"] if run_name is not None else [])]
    if resume and run_name is not None:
        raise ConfigError("--resume and --run-name: give one (the run name finds the run to resume by itself)")
    cfg = command_config(params, overrides)
    if not resume:  # (a resumed run's own paths, read from MLflow, are checked by preflight)
        check_paths(cfg)  # before the heavy imports: a bad path is refused in a fraction of a second
    from dp_ops import runner
    from dp_ops.engine import dist
    from dp_ops.records.tracking import TrackingStore
    from dp_ops.render import RichObserver, print_tracked, progress_bars, resume_hint
    from dp_ops.resume import RunChoice, choose_run, elastic_run_name

    elastic = dist.elastic_run_id()  # (torchrun --max-restarts: a restarted group resumes the run by its name)
    if elastic is not None and not cfg.tracking.run_name and not resume:
        cfg = load_config(params, [*overrides, f"tracking.run_name={elastic_run_name(elastic)}"])
    world = dist.join(cfg.device)
    try:
        store, choice = None, RunChoice(cfg, resume)
        if resume or cfg.tracking.run_name:  # the run's own config, from MLflow (rank 0 reads it)
            if world.main:
                store = TrackingStore.from_config(cfg)
                choice = choose_run(cfg, store, resume, overrides)
                _say(choice)
            choice = world.broadcast(choice)
        cfg, resume = choice.cfg, choice.resume  # (-S/--params only chose where to look, and where its files go)
        if choice.finished is not None:  # (a requeued job whose run already finished: no work, exit 0)
            if world.main:
                console.print(choice.finished, highlight=False, soft_wrap=True)
            return
        dist.use_threads(cfg.threads, world)  # (the run's own setting: a resumed run's recorded one)
        runner.preflight(cfg, world)
        real = runner.load_real_data(cfg, world)
        if world.main:  # (the store is opened only now: a refused run leaves none behind)
            store = store or TrackingStore.from_config(cfg)
        with progress_bars(console) if world.main else nullcontext() as progress:
            generator = run_generator(cfg, real, progress, world)
            observers = [RichObserver(progress)] if progress else []
            run = runner.run_tracked(
                cfg, generator, real, observers, resume, dist.threads_tag(), store=store, world=world
            )
    except KeyboardInterrupt as exc:
        stopped(resume_hint(exc, params, overrides))
    finally:
        dist.leave()
    if world.main:
        print_tracked(console, cfg, run)


def _say(choice: RunChoice) -> None:
    """What a resume leaves unused or moves, and a stale lease it takes over: on stderr, before the run."""
    for line in choice.warnings:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    for line in choice.notes:
        err_console.print(f"[yellow]note:[/] {line}", highlight=False, soft_wrap=True)
