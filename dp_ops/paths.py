"""Where a run writes and the generator it reads, checked from the config alone before any work: every
output location can be written, a pixel generator folder holds a sound trained generator (or is free to
train one into), an ``sd`` pipeline folder has diffusers' layout.

Standard library only (no torch, diffusers, MLflow, DVC or Optuna): the CLI calls :func:`check_paths` right
after it validates the config, before it imports any of those; :func:`dp_ops.runner.preflight` calls the
same checks, for sweeps and the benchmark too.
"""

from __future__ import annotations

from pathlib import Path

from dp_ops.config import Config
from dp_ops.engine.saved import META_FILE, check_saved
from dp_ops.errors import ConfigError
from dp_ops.files import unwritable


def check_paths(cfg: Config) -> None:
    """:func:`check_outputs`, then :func:`check_generator`."""
    check_outputs(cfg)
    check_generator(cfg)


def generator_exists(cfg: Config) -> bool:
    """Is the generator ready to load (a pretrained ``sd`` pipeline always is; ``pixel`` once trained)?"""
    if cfg.generator.backend != "pixel":
        return True
    return (Path(cfg.generator.path) / META_FILE).is_file()


def output_locations(cfg: Config) -> dict[str, tuple[str, bool]]:
    """Every place a run writes: config key -> (path, is a folder). ``generator.path`` only when the pixel
    generator is still to be trained there."""
    o = cfg.output
    where = {
        "output.metrics": (o.metrics, False),
        "output.rounds": (o.rounds, False),
        "output.curve": (o.curve, False),
        "output.shards": (o.shards, True),
        "output.checkpoints": (o.checkpoints, True),
    }
    if not generator_exists(cfg):
        where["generator.path"] = (cfg.generator.path, True)
    return where


def check_outputs(cfg: Config) -> None:
    """Each output location can be written (a read-only workspace, a path under a regular file): found out
    now, not after round 0 was generated."""
    for key, (path, folder) in output_locations(cfg).items():
        why = unwritable(path, folder=folder)
        if why is not None:
            raise ConfigError(f"{key}={path!r}: cannot be written ({why})")


def check_generator(cfg: Config) -> None:
    """The ``sd`` pipeline folder has diffusers' layout, or the ``pixel`` generator folder holds a sound
    trained generator (:func:`~dp_ops.engine.saved.check_saved`) or nothing yet (it is trained there)."""
    if cfg.generator.backend == "sd":
        _check_sd_model(cfg.generator.model)
        return
    path = Path(cfg.generator.path)
    if (path / META_FILE).is_file():
        check_saved(path)  # a damaged generator folder is one line now, not a traceback when it loads
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):  # (an empty folder: trained into)
        raise ConfigError(
            f"generator.path={cfg.generator.path!r}: exists but holds no trained generator "
            f"({META_FILE} missing); use an empty or new folder to train one there"
        )


def _check_sd_model(model: str) -> None:
    """A local pipeline folder must have diffusers' layout; anything else is taken for a hub id."""
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if not looks_local:
        return
    missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise ConfigError(
            f"generator.model={model!r}: not a Stable Diffusion pipeline folder (no {', '.join(missing)}/; "
            "expected the save_pretrained layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
