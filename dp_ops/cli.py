"""``dpops``: the command line. Commands are thin: build a config, call the library, print a summary.

Every :class:`~dp_ops.errors.DpOpsError` becomes one ``error: …`` line on stderr and exit code 1. With
``DPOPS_DEBUG=1`` (or ``true``, ``yes``, ``on``) in the environment the full traceback behind that line follows it
on stderr, as ``HF_DEBUG`` does for the Hugging Face CLI: for a bug report, or to see where an error came from.

SIGTERM (what Slurm and Kubernetes send before SIGKILL) is handled as Ctrl-C is: it raises
:class:`KeyboardInterrupt` in the main thread, so a run ends KILLED at its last completed round, a sweep
re-queues its running trial, the benchmark stops its workers; the command says how to go on in one line
and exits 143 (128 + SIGTERM, what the scheduler expects of a terminated job; Ctrl-C exits 130).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from dp_ops.config import Config, SweepConfig, build_config, flatten, load_config, load_tree, sweep_config
from dp_ops.engine.saved import check_saved
from dp_ops.errors import ConfigError, DataError, DpOpsError, RunAborted
from dp_ops.files import unwritable, write_json
from dp_ops.paths import check_paths, generator_exists
from dp_ops.signals import sigterm_as_interrupt, terminated

if TYPE_CHECKING:
    from rich.progress import Progress

    from dp_ops.engine.data import RealData
    from dp_ops.engine.dist import World
    from dp_ops.engine.sampling import Generator
    from dp_ops.records.tracking import Registry
    from dp_ops.studies.bench import Prepared

# add_completion: --install-completion / --show-completion (Typer's, for bash, zsh, fish and PowerShell)
app = typer.Typer(help="Deliberate Practice for synthetic training data.", no_args_is_help=True)
generator_app = typer.Typer(help="Train and inspect the embedded world's diffusion generator.", no_args_is_help=True)
config_app = typer.Typer(help="Show the resolved configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Generated data: restore any run's rounds from the DVC cache.", no_args_is_help=True)
app.add_typer(generator_app, name="generator")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from dp_ops import __version__

        typer.echo(f"dpops {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Deliberate Practice for synthetic training data."""


# Piped or logged output gets 120 columns instead of rich's 80, so the rounds table stays readable.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)

ParamsOpt = Annotated[
    Path | None, typer.Option("--params", "-p", help="params file (default: ./params.yaml if present)")
]


def _config_keys() -> dict[str, Any]:
    """Every key ``-S`` sets, dotted, with its default: the run's config and the ``sweep:`` section."""
    sweep = flatten(SweepConfig())  # type: ignore[arg-type]  # (any section flattens alike)
    return {**flatten(build_config({})), **{f"sweep.{key}": value for key, value in sweep.items()}}


def _complete_set(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion of ``-S``: ``KEY=`` for every config key that starts with what is typed, its default
    as the help (zsh and fish show it). Where one key is left, ``KEY=DEFAULT`` is offered beside it: the
    shell then completes to ``KEY=`` without the space it puts after a single candidate, for the value to
    follow."""
    found = {key: value for key, value in _config_keys().items() if f"{key}=".startswith(incomplete)}
    offered = [(f"{key}=", f"default: {_as_typed(value)}") for key, value in found.items()]
    if len(found) == 1:
        ((key, value),) = found.items()
        if not any(c.isspace() for c in _as_typed(value)):
            offered.append((f"{key}={_as_typed(value)}", "the default"))
    return offered


def _as_typed(value: Any) -> str:
    """A default as one would type it after ``-S KEY=`` (YAML: ``true``, ``[32,64,64]``, ``""``)."""
    if isinstance(value, bool) or value is None or isinstance(value, list) or value == "":
        return json.dumps(value, separators=(",", ":"))
    return str(value)


SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-S",
        help="override one value with its dotted key, e.g. -S dp.omega=0.1 (repeatable)",
        autocompletion=_complete_set,
    ),
]
F = TypeVar("F", bound=Callable[..., Any])


# Options that take one of a fixed set: string enums, so that --help and shell completion list the choices and a
# wrong value is refused naming them. (The same values as the config's and the scaling report's Literal
# types, which cannot be imported here: tests/test_cli.py checks that they agree.)
class Strategy(StrEnum):
    """``dp.strategy``."""

    dp = "dp"
    static = "static"
    oversample = "oversample"


class SweepStrategy(StrEnum):
    """What ``dpops sweep`` searches: DP's knobs, or the static grid."""

    dp = "dp"
    static = "static"


class Metric(StrEnum):
    """The accuracy a scaling law is fitted to."""

    final_test_acc = "final_test_acc"
    final_val_acc = "final_val_acc"


class Axis(StrEnum):
    """What a scaling law counts as n."""

    pool_size = "pool_size"
    generated_samples = "generated_samples"


def _friendly_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except DpOpsError as exc:
            rank = os.environ.get("RANK", "0")  # (under torchrun: every process checks the same config)
            if rank == "0" or not isinstance(exc, ConfigError):
                where = "" if rank == "0" else f"(rank {rank}) "
                err_console.print(f"[bold red]error:[/] {where}{exc}", highlight=False, soft_wrap=True)
                _traceback_if_debugging(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            cause = exc.__context__  # (torchrun's SIGTERM while a rank's one-line error was on its way out)
            ranks = os.environ.get("WORLD_SIZE", "1") != "1"
            _stopped(f"{cause}" if ranks and isinstance(cause, DpOpsError) else "")
        except RunAborted as exc:
            err_console.print(f"[bold red]error:[/] a run failed, so the study stops: {exc}", soft_wrap=True)
            _traceback_if_debugging(exc)
            raise typer.Exit(1) from None
        finally:
            _no_colour_reset_at_exit()

    return wrapper  # type: ignore[return-value]


def _traceback_if_debugging(exc: BaseException) -> None:
    """``DPOPS_DEBUG=1``: the traceback behind the one-line error, on stderr after it."""
    if os.environ.get("DPOPS_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}:
        traceback.print_exception(exc, file=sys.stderr)


def _no_colour_reset_at_exit() -> None:
    """Importing DVC calls ``colorama.init()``, which registers an exit hook writing a colour reset (ESC[0m)
    to stdout when it is a terminal: one stray escape code after the command's last line, every time DVC
    was loaded. What dp_ops prints goes through rich, which closes every style it opens: nothing to reset."""
    initialise = sys.modules.get("colorama.initialise")
    if initialise is not None:
        atexit.unregister(initialise.reset_all)


def _stopped(what: str) -> NoReturn:
    """The one line of a command stopped by Ctrl-C or SIGTERM (``what``: what happened and how to go on),
    and its exit code: 143 for SIGTERM, 130 for Ctrl-C (128 + the signal)."""
    how = "terminated (SIGTERM)" if terminated() else "interrupted"
    rank = os.environ.get("RANK", "0")
    where = "" if rank == "0" else f"(rank {rank}) "
    err_console.print(f"[yellow]{how}[/]{': ' if what else ''}{where}{what}", highlight=False, soft_wrap=True)
    raise typer.Exit(128 + signal.SIGTERM if terminated() else 130)


def _config(params: Path | None, overrides: list[str] | None) -> Config:
    _quiet_libraries()
    return load_config(params, overrides or ())


def _quiet_libraries() -> None:
    """MLflow announces database creation and migrations at INFO, Optuna every trial: the CLI keeps the
    user's screen for what dp_ops has to say (their warnings and errors still show). By logger name, so
    that commands which never touch MLflow do not import it; MLflow resets its logger's level when it is
    imported, to ``MLFLOW_LOGGING_LEVEL`` (which worker processes inherit), so that is set too unless the
    user set it, as is ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` (its tqdm bars when a resume downloads a
    checkpoint)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)


@app.command()
@_friendly_errors
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
    cfg = _config(params, overrides)
    if not resume:  # (a resumed run's own paths, read from MLflow, are checked by preflight)
        check_paths(cfg)  # before the heavy imports: a bad path is refused in a fraction of a second
    from dp_ops import runner
    from dp_ops.engine import dist
    from dp_ops.records.tracking import Registry
    from dp_ops.render import RichObserver, print_tracked, progress_bars, resume_hint

    elastic = dist.elastic_run_id()  # (torchrun --max-restarts: a restarted group resumes the run by its name)
    if elastic is not None and not cfg.tracking.run_name and not resume:
        cfg = load_config(params, [*overrides, f"tracking.run_name=torchrun-{_name_safe(elastic)}"])
    world = dist.join(cfg.device)
    try:
        registry, finished = None, None
        if resume or cfg.tracking.run_name:  # the run's own config, from MLflow (rank 0 reads it)
            if world.main:
                registry = Registry.from_config(cfg)
                if not resume:
                    resume, finished = _named(cfg, registry)
                if resume:  # (-S/--params only choose where to look, and where its files go)
                    cfg = _resumed_config(resume, registry, cfg, overrides)
            cfg, resume, finished = world.broadcast((cfg, resume, finished))
        if finished is not None:  # (a requeued job whose run already finished: no work, exit 0)
            if world.main:
                console.print(finished, highlight=False, soft_wrap=True)
            return
        dist.use_threads(cfg.threads, world)  # (the run's own setting: a resumed run's recorded one)
        runner.preflight(cfg, world)
        real = runner.load_real_data(cfg, world)
        if world.main:  # (the store is opened only now: a refused run leaves none behind)
            registry = registry or Registry.from_config(cfg)
        with progress_bars(console) if world.main else nullcontext() as progress:
            generator = _generator(cfg, real, progress, world)
            observers = [RichObserver(progress)] if progress else []
            run = runner.run_tracked(
                cfg, generator, real, observers, resume, dist.threads_tag(), registry=registry, world=world
            )
    except KeyboardInterrupt as exc:
        _stopped(resume_hint(exc, params, overrides))
    finally:
        dist.leave()
    if world.main:
        print_tracked(console, cfg, run)


def _named(cfg: Config, registry: Registry) -> tuple[str | None, str | None]:
    """``--run-name``: (the run id to resume, or None to start one under the name; the line to print instead
    when that run already finished). A run of the name that ran another config is refused in one line."""
    from dp_ops.resume import differences, named_run, resume_config

    name = cfg.tracking.run_name
    found = named_run(cfg, registry)
    if found is None:
        return None, None
    if found.status == "FINISHED":
        return None, (
            f"run {found.run_id} named {name!r} in experiment '{registry.experiment_name(cfg)}' already FINISHED; "
            "nothing to do"
        )
    differ = differences(cfg, resume_config(found.run_id, registry))
    if differ:
        raise ConfigError(
            f"tracking.run_name={name!r}: run {found.run_id} of that name ran another config ({'; '.join(differ[:3])}"
            f"{f'; and {len(differ) - 3} more' if len(differ) > 3 else ''}); name this one otherwise, or continue "
            f"that run with its own config: dpops run --resume {found.run_id}"
        )
    return found.run_id, None


def _one_name_per_run(cfg: Config, study: str) -> None:
    """A study runs many runs, which one run name cannot name (each would find the first's)."""
    if cfg.tracking.run_name:
        raise ConfigError(
            f"tracking.run_name={cfg.tracking.run_name!r}: {study} starts many runs and names each itself; unset it "
            "(a run name is for one dpops run)"
        )


def _name_safe(text: str) -> str:
    """``text`` with what a run name cannot hold replaced by '-'."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text).lstrip("._-") or "run"


def _resumed_config(run_id: str, registry: Registry, given: Config, overrides: list[str]) -> Config:
    """``--resume``: the run's own config with the ``-S output.*`` given (where its files go on this
    machine), after checking no live process trains it; says which ``-S`` values it leaves unused, which
    output locations moved, and whether it takes over a stale lease."""
    from dp_ops.resume import check_lease, ignored_on_resume, resume_config, resume_outputs

    recorded = resume_config(run_id, registry)
    cfg, moved = resume_outputs(overrides, given, recorded)
    ignored = ignored_on_resume(overrides, given, cfg)
    if ignored:
        err_console.print(
            f"[yellow]warning:[/] --resume continues run {run_id} with its own config; ignored: -S "
            + ", -S ".join(ignored),
            highlight=False,
            soft_wrap=True,
        )
    if moved:
        err_console.print(
            f"[yellow]note:[/] --resume continues run {run_id} writing -S " + ", -S ".join(moved) + "; its finished "
            "rounds' parts are restored there from DVC where missing, its checkpoint is read there",
            highlight=False,
            soft_wrap=True,
        )
    check_lease(recorded, run_id)  # (a live process that still writes where the run started is refused too)
    note = check_lease(cfg, run_id)
    if note:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    return cfg


@data_app.command("restore")
@_friendly_errors
def data_restore(
    run_id: Annotated[str, typer.Argument(help="the MLflow run whose rounds to restore")],
    round_: Annotated[int | None, typer.Option("--round", help="only this round (default: every round)")] = None,
    pool: Annotated[bool, typer.Option(help="with --round K: the whole pool as it stood after round K")] = False,
    to: Annotated[Path | None, typer.Option(help="destination folder (default: restored/<run id>)")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Rebuild a run's data byte-for-byte from the DVC cache (or remote), using only the md5s in MLflow."""
    cfg = _config(params, set_)
    dest = to or Path("restored") / run_id
    why = unwritable(dest, folder=True)
    if why is not None:
        option = "--to" if to else "the default destination (--to)"
        raise DataError(f"{option} {dest}: cannot be written ({why}); choose another folder with --to")
    from dp_ops.records.tracking import tracking_uri
    from dp_ops.render import plural
    from dp_ops.resume import restore_run_data

    paths = restore_run_data(run_id, dest, tracking_uri=tracking_uri(cfg), round_index=round_, pool=pool)
    for path in paths:
        console.print(f"restored {path}")
    console.print(f"{plural(len(paths), 'shard')}, md5 verified, in {dest}")


@generator_app.command("train")
@_friendly_errors
def generator_train(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Train the generator on the generator-train split, measure its quality, save it to generator.path."""
    cfg = _config(params, set_)
    from dp_ops import runner
    from dp_ops.engine.dist import use_threads
    from dp_ops.render import bar, generator_saved, progress_bars

    use_threads(cfg.threads)
    real = runner.load_real_data(cfg)
    with progress_bars(console) as progress:
        _, quality = runner.train_and_save_generator(
            cfg, real, progress=bar(progress, "train generator"), quality_progress=bar(progress, "judge samples")
        )
    console.print(generator_saved(cfg, quality))
    from dp_ops.records.versioning import dvc_root, push_hint

    hint = push_hint(dvc_root(Path(cfg.generator.path)))  # (inside a dvc.yaml stage only)
    if hint:
        console.print(hint, highlight=False, soft_wrap=True)


@generator_app.command("quality")
@_friendly_errors
def generator_quality(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    samples: Annotated[int, typer.Option(help="unguided samples to generate and judge")] = 1000,
) -> None:
    """Measure how many of the saved generator's samples a real-digits judge recognises."""
    cfg = _config(params, set_)
    if cfg.generator.pretrained:
        raise ConfigError(
            f"generator.backend={cfg.generator.backend!r}: quality is measured for the embedded pixel "
            "generator only (the judge trains on the embedded world's generator-train split)"
        )
    check_saved(cfg.generator.path)  # (load_pixel checks it too; here before the heavy imports)
    from dp_ops import runner
    from dp_ops.engine.dist import use_threads
    from dp_ops.engine.quality import measure_quality
    from dp_ops.render import bar, progress_bars

    use_threads(cfg.threads)
    real = runner.load_real_data(cfg)
    generator = runner.load_pixel(cfg)
    with progress_bars(console) as progress:
        q = measure_quality(generator, real, cfg.generator, n_samples=samples, progress=bar(progress, "judge samples"))
    console.print(
        f"recognised {q.recognition:.1%} of {q.n_samples} samples; judge real test accuracy {q.judge_test_acc:.1%}"
    )


@config_app.command("show")
@_friendly_errors
def config_show(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Print every resolved key (the names -S and dvc exp run -S accept)."""
    cfg = _config(params, set_)
    table = Table("key", "value", box=None)
    for key, value in flatten(cfg).items():
        table.add_row(key, repr(value))
    console.print(table)


@app.command()
@_friendly_errors
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
@_friendly_errors
def sweep(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    strategy: Annotated[
        SweepStrategy,
        typer.Option(help="dp: TPE over dp.omega, dp.patience, dp.round_size; static: grid over sweep.static_sizes"),
    ] = SweepStrategy.dp,
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
    _one_name_per_run(cfg, "a sweep")
    check_paths(cfg)  # (the trials change dp.* only: the same paths as preflight's)
    from dp_ops import runner
    from dp_ops.engine import dist
    from dp_ops.records.tracking import Registry, tracking_uri
    from dp_ops.render import RichObserver, print_sweep, print_trial, progress_bars
    from dp_ops.studies.sweep import Sweep, check_separate_stores, tracked_runner

    _quiet_libraries()  # the CLI reports trials itself
    logging.getLogger("optuna.study._optimize").setLevel(logging.ERROR)  # (a failed trial: one line, no traceback)
    name = study_name or (f"{sc.study}-static" if strategy is SweepStrategy.static else sc.study)
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
            runner.follow_runs(_generator(cfg, real, None, world), real, world)
            return
        registry = Registry.from_config(cfg)  # (opened only now: a refused sweep leaves no store behind)
        base = [o for o in (set_ or ()) if not o.startswith("sweep.")]
        worker = Sweep(cfg, sc, strategy=strategy.value, study_name=name, base_overrides=base, registry=registry)
        with progress_bars(console) as progress:
            generator = _generator(cfg, real, progress, world)
            console.print(f"study [bold]{name}[/] at {sc.storage}: budget {worker.budget} trials over all workers")
            try:
                outcome = worker.run(
                    tracked_runner(generator, real, registry, world),
                    timeout=timeout,
                    observers=lambda n: [RichObserver(progress)],
                    on_trial=lambda o: print_trial(console, progress, o),
                )
            except KeyboardInterrupt as exc:
                run_id = getattr(exc, "run_id", None)
                trial = f"the running trial (run {run_id}, ended KILLED) was re-queued at once; " if run_id else ""
                _stopped(f"{trial}run the same dpops sweep command to continue the study")
        runner.end_runs(world)
    finally:
        dist.leave()
    print_sweep(console, outcome, worker.experiment, registry.uri)


@app.command()
@_friendly_errors
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
    _one_name_per_run(cfg, "the benchmark")
    sweep_config(tree)  # (sweep.static_sizes: the benchmark's static arms)
    check_paths(cfg)  # (the arms change dp.*, seed and train.iterations only: the same paths as preflight's)
    _quiet_libraries()
    from dp_ops import runner
    from dp_ops.engine import dist
    from dp_ops.studies import bench as bm

    world = dist.join(cfg.device)
    dist.use_threads(cfg.threads, world)  # (this process's: a worker takes its share, bench.run_jobs)
    try:
        if not world.main:  # (under torchrun) take part in every run rank 0 leads
            cfg = world.broadcast(None)
            real = runner.load_real_data(cfg, world)
            runner.follow_runs(_generator(cfg, real, None, world), real, world)
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
        )
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
            _generator(p.cfg, runner.load_real_data(p.cfg), progress)
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
            _stopped(
                "every running run ended KILLED at its last completed round; run the same command again to resume them"
            )
    wall = time.perf_counter() - t0
    print_bench_report(console, bm.finish(p, out, wall), p, experiment, wall)
    if failed:
        raise DpOpsError(
            f"{len(failed)} run(s) failed (first: {failed[0].arm} seed {failed[0].seed}: {failed[0].error})"
        )


def _generator(cfg: Config, real: RealData, progress: Progress | None, world: World | None = None) -> Generator:
    """The run's generator, trained first if missing (:func:`dp_ops.runner.ensure_generator`), its training
    shown on ``progress`` (rank 0's display, the one process that trains)."""
    from dp_ops import runner
    from dp_ops.engine.dist import SINGLE
    from dp_ops.render import bar

    if progress is not None and not generator_exists(cfg):
        console.print(f"No generator at [bold]{cfg.generator.path}[/]: training one first (cached afterwards).")
    generator, quality = runner.ensure_generator(
        cfg,
        real,
        world or SINGLE,
        progress=None if progress is None else bar(progress, "train generator"),
        quality_progress=None if progress is None else bar(progress, "judge samples"),
    )
    if quality is not None:
        console.print(f"Generator quality: a real-digits judge recognises {quality.recognition:.1%} of samples.")
    return generator


@app.command()
@_friendly_errors
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
    cfg = _config(params, set_)
    from dp_ops.records.tracking import Registry
    from dp_ops.render import print_scaling
    from dp_ops.studies.scaling_report import (
        log_report,
        points_from_files,
        points_from_mlflow,
        scaling_report,
        write_report,
    )

    registry, experiments = Registry.from_config(cfg), experiment or [cfg.tracking.experiment_name]
    if metrics:
        runs = points_from_files(metrics)
    else:
        strategies = [s.value for s in strategy or ()]
        runs = points_from_mlflow(registry, experiments, study=study, strategies=strategies, filter_string=filter_)
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
            registry,
            cfg.tracking.experiment_name,
            {**source, "metric": metric.value, "x": x.value, "runs": str(len(runs))},
        )
        console.print(
            f"MLflow run [bold]{run_id}[/] (dpops.role=scaling) in '{cfg.tracking.experiment_name}' at {registry.uri}",
            soft_wrap=True,
        )


def main() -> None:
    app(prog_name="dpops")
