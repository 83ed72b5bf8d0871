"""The commands around runs rather than of one: ``dpops data restore`` (a run's rounds rebuilt from DVC),
``dpops generator train|quality`` (the embedded world's generator) and ``dpops config show`` (every resolved
key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dp_ops.cli._app import (
    ParamsOpt,
    SetOpt,
    command_config,
    config_app,
    console,
    data_app,
    friendly_errors,
    generator_app,
)
from dp_ops.config import flatten
from dp_ops.engine.saved import check_saved
from dp_ops.errors import ConfigError, DataError
from dp_ops.files import unwritable


@data_app.command("restore")
@friendly_errors
def data_restore(
    run_id: Annotated[str, typer.Argument(help="the MLflow run whose rounds to restore")],
    round_: Annotated[int | None, typer.Option("--round", help="only this round (default: every round)")] = None,
    pool: Annotated[bool, typer.Option(help="with --round K: the whole pool as it stood after round K")] = False,
    to: Annotated[Path | None, typer.Option(help="destination folder (default: restored/<run id>)")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Rebuild a run's data byte-for-byte from the DVC cache (or remote), using only the md5s in MLflow."""
    cfg = command_config(params, set_)
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
@friendly_errors
def generator_train(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Train the generator on the generator-train split, measure its quality, save it to generator.path."""
    cfg = command_config(params, set_)
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
@friendly_errors
def generator_quality(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    samples: Annotated[int, typer.Option(help="unguided samples to generate and judge")] = 1000,
) -> None:
    """Measure how many of the saved generator's samples a real-digits judge recognises."""
    cfg = command_config(params, set_)
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
@friendly_errors
def config_show(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Print every resolved key (the names -S and dvc exp run -S accept)."""
    cfg = command_config(params, set_)
    table = Table("key", "value", box=None)
    for key, value in flatten(cfg).items():
        table.add_row(key, repr(value))
    console.print(table)
