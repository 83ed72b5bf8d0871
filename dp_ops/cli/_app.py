"""The ``dpops`` Typer apps and what every command shares: the ``--params``/``-S`` options and their shell
completion, the options with a fixed set of choices, the consoles, the config a command starts from, and the
turning of errors and signals into one line and an exit code.

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
import signal
import sys
import traceback
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar, get_args

import typer
from rich.console import Console

from dp_ops.config import Config, DPConfig, SweepConfig, build_config, flatten, load_config
from dp_ops.errors import ConfigError, DpOpsError, RunAborted
from dp_ops.paths import generator_exists
from dp_ops.signals import sigterm_as_interrupt, terminated

if TYPE_CHECKING:
    from rich.progress import Progress

    from dp_ops.engine.data import RealData
    from dp_ops.engine.dist import World
    from dp_ops.engine.sampling import Generator

# add_completion: --install-completion / --show-completion (Typer's, for bash, zsh, fish and PowerShell)
app = typer.Typer(help="Deliberate Practice for synthetic training data.", no_args_is_help=True)
generator_app = typer.Typer(help="Train and inspect the embedded world's diffusion generator.", no_args_is_help=True)
config_app = typer.Typer(help="Show the resolved configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Generated data: restore any run's rounds from the DVC cache.", no_args_is_help=True)
app.add_typer(generator_app, name="generator")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")


def main() -> None:
    app(prog_name="dpops")


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


def config_keys() -> dict[str, Any]:
    """Every key ``-S`` sets, dotted, with its default: the run's config and the ``sweep:`` section."""
    sweep = flatten(SweepConfig())  # type: ignore[arg-type]  # (any section flattens alike)
    return {**flatten(build_config({})), **{f"sweep.{key}": value for key, value in sweep.items()}}


def complete_set(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion of ``-S``: ``KEY=`` for every config key that starts with what is typed, its default
    as the help (zsh and fish show it). Where one key is left, ``KEY=DEFAULT`` is offered beside it: the
    shell then completes to ``KEY=`` without the space it puts after a single candidate, for the value to
    follow."""
    found = {key: value for key, value in config_keys().items() if f"{key}=".startswith(incomplete)}
    offered = [(f"{key}=", f"default: {as_typed(value)}") for key, value in found.items()]
    if len(found) == 1:
        ((key, value),) = found.items()
        if not any(c.isspace() for c in as_typed(value)):
            offered.append((f"{key}={as_typed(value)}", "the default"))
    return offered


def as_typed(value: Any) -> str:
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
        autocompletion=complete_set,
    ),
]
F = TypeVar("F", bound=Callable[..., Any])


# Options that take one of a fixed set: string enums, so that --help and shell completion list the choices and a
# wrong value is refused naming them. Strategy's and SweepStrategy's members are known at run time only (mypy sees
# none): a command names one as SweepStrategy["dp"] and compares one with its value.

# dp.strategy's values, read from the config's Literal: a strategy added there is offered here as it is.
Strategy = StrEnum(  # type: ignore[misc]
    "Strategy", [(s, s) for s in get_args(DPConfig.model_fields["strategy"].annotation)]
)
# What `dpops sweep` searches: DP's knobs (TPE over dp.omega, dp.patience, dp.round_size) or the static grid over
# sweep.static_sizes. Oversample has no search of its own (the benchmark runs it at its ratios), and a strategy
# new to the config is swept only once the sweep knows what to search for it (dp_ops.studies.sweep.Sweep).
SWEPT = ("dp", "static")
SweepStrategy = StrEnum("SweepStrategy", [(s.value, s.value) for s in Strategy if s in SWEPT])  # type: ignore[misc]


# The same values as the scaling report's Literal types, which cannot be imported here (dp_ops.studies loads
# SciPy): tests/test_cli.py checks that they agree.
class Metric(StrEnum):
    """The accuracy a scaling law is fitted to."""

    final_test_acc = "final_test_acc"
    final_val_acc = "final_val_acc"


class Axis(StrEnum):
    """What a scaling law counts as n."""

    pool_size = "pool_size"
    generated_samples = "generated_samples"


def friendly_errors(fn: F) -> F:
    """A command's errors as one line and its exit code: a :class:`~dp_ops.errors.DpOpsError` (exit 1; under
    torchrun a config error is said by rank 0 alone, every process having checked the same config), Ctrl-C or
    SIGTERM (:func:`stopped`), a study stopped by a failed run (exit 1)."""

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
            stopped(f"{cause}" if ranks and isinstance(cause, DpOpsError) else "")
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


def stopped(what: str) -> NoReturn:
    """The one line of a command stopped by Ctrl-C or SIGTERM (``what``: what happened and how to go on),
    and its exit code: 143 for SIGTERM, 130 for Ctrl-C (128 + the signal)."""
    how = "terminated (SIGTERM)" if terminated() else "interrupted"
    rank = os.environ.get("RANK", "0")
    where = "" if rank == "0" else f"(rank {rank}) "
    err_console.print(f"[yellow]{how}[/]{': ' if what else ''}{where}{what}", highlight=False, soft_wrap=True)
    raise typer.Exit(128 + signal.SIGTERM if terminated() else 130)


def command_config(params: Path | None, overrides: list[str] | None) -> Config:
    """The config of a command that runs no study: ``--params`` with its ``-S``, the libraries quietened."""
    quiet_libraries()
    return load_config(params, overrides or ())


def quiet_libraries() -> None:
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


def one_name_per_run(cfg: Config, study: str) -> None:
    """A study runs many runs, which one run name cannot name (each would find the first's)."""
    if cfg.tracking.run_name:
        raise ConfigError(
            f"tracking.run_name={cfg.tracking.run_name!r}: {study} starts many runs and names each itself; unset it "
            "(a run name is for one dpops run)"
        )


def run_generator(cfg: Config, real: RealData, progress: Progress | None, world: World | None = None) -> Generator:
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
