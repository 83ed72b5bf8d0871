"""Where a run writes and the generator it reads, checked from the config alone before any work: every
output location can be written, a pixel generator folder holds a sound trained generator (or is free to
train one into), an ``sd`` pipeline folder has diffusers' layout and is a pipeline the backend can drive
(:func:`check_sd_configs`, from its JSON configs alone, before any weight is read).

Standard library only (no torch, diffusers, MLflow, DVC or Optuna): the CLI calls :func:`check_paths` right
after it validates the config, before it imports any of those; :func:`dp_ops.runner.preflight` calls the
same checks, for sweeps and the benchmark too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    _check_shards_stay(cfg.output.shards)


def _check_shards_stay(shards: str) -> None:
    """DVC versions the shards where they really are: a symlink on the way that leads out of the DVC
    workspace the path names would leave every round unversioned, without a word."""
    named, real = _dvc_workspace(Path(os.path.abspath(shards))), _dvc_workspace(Path(shards).resolve())
    if named is not None and real != named.resolve():  # (the workspace itself may be reached by a link)
        raise ConfigError(
            f"output.shards={shards!r}: leads through a symlink to {Path(shards).resolve()}, outside the DVC "
            f"workspace {named}, where its rounds cannot be versioned; use a folder inside the workspace"
        )


def _dvc_workspace(path: Path) -> Path | None:
    """The nearest folder at or above ``path`` (which need not exist) that holds ``.dvc/``, as named."""
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def check_generator(cfg: Config) -> None:
    """The ``sd`` pipeline folder has diffusers' layout and configs the backend can drive
    (:func:`check_sd_configs`; a hub id is checked when it loads), or the ``pixel`` generator folder holds a sound
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


# What generator.backend=sd drives: one CLIP text encoder whose hidden states are the UNet's only condition
# (SD-1.x, SD-2.x). SDXL (a second text encoder, added_cond_kwargs), SD3, Flux, DiT and the like are not yet.
SD_PIPELINES = ("StableDiffusionPipeline",)
SD_UNETS = ("UNet2DConditionModel",)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # engine.guidance.X0's keys (a test keeps them so)
SD_LAYOUT = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_CONFIG_FILES = {
    "model_index": "model_index.json",
    "unet": "unet/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}


def _check_sd_model(model: str) -> None:
    """A local pipeline folder must have diffusers' layout and configs the backend can drive; anything else is
    taken for a hub id (:func:`dp_ops.runner.load_sd` checks its configs before it reads any weight)."""
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if not looks_local:
        return
    configs = {key: _read_config(path / file, model) for key, file in SD_CONFIG_FILES.items()}
    _check_pipeline_class(model, configs["model_index"])  # (first: an SD3 or Flux folder has no unet/ at all)
    missing = [sub for sub in SD_LAYOUT if not (path / sub).is_dir()]
    if missing:
        raise ConfigError(
            f"generator.model={model!r}: not a Stable Diffusion pipeline folder (no {', '.join(missing)}/; "
            "expected the save_pretrained layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    check_sd_configs(model, configs)


def _read_config(file: Path, model: str) -> dict[str, Any]:
    """A component's JSON config, or {} when the file is absent (then the load names what is missing)."""
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"generator.model={model!r}: cannot read {file.name} ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"generator.model={model!r}: {file.name} is not a JSON object")
    return config


def check_sd_configs(model: str, configs: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse, in one line and before any weight is read, a pipeline the ``sd`` backend cannot drive, from its
    configs (keys of :data:`SD_CONFIG_FILES`; an absent one, {}, is not checked)."""
    _check_pipeline_class(model, configs.get("model_index", {}))
    unet, text = configs.get("unet", {}), configs.get("text_encoder", {})
    where = f"generator.model={model!r}"
    if unet.get("_class_name", SD_UNETS[0]) not in SD_UNETS:
        raise ConfigError(f"{where}: its unet is a {unet['_class_name']}, not supported yet by generator.backend=sd")
    for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type"):
        if unet.get(key) is not None:
            raise ConfigError(
                f"{where}: its UNet takes extra conditioning ({key}={unet[key]!r}, as SDXL's does), "
                "not supported yet by generator.backend=sd"
            )
    width, hidden = unet.get("cross_attention_dim"), text.get("hidden_size")
    if width is not None and hidden is not None and width != hidden:
        raise ConfigError(
            f"{where}: its UNet attends to text embeddings of width {width} but its text encoder gives {hidden} "
            "(a second text encoder?); not supported yet by generator.backend=sd"
        )
    prediction = configs.get("scheduler", {}).get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(
            f"{where}: its scheduler's prediction_type={prediction!r} is not supported by generator.backend=sd "
            f"({', '.join(PREDICTION_TYPES)})"
        )


def _check_pipeline_class(model: str, index: Mapping[str, Any]) -> None:
    pipeline = index.get("_class_name", SD_PIPELINES[0])
    if pipeline not in SD_PIPELINES:
        raise ConfigError(
            f"generator.model={model!r}: a {pipeline} is not supported yet by generator.backend=sd "
            f"(it drives {', '.join(SD_PIPELINES)} folders: SD-1.x and SD-2.x)"
        )
