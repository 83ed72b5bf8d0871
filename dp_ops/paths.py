"""Where a run writes and the generator it reads, checked from the config alone before any work: every
output location can be written, a pixel generator folder holds a sound trained generator (or is free to
train one into), a pipeline folder has diffusers' layout and is a pipeline its backend can drive
(:func:`check_pipeline`, from its JSON configs alone, before any weight is read).

Standard library only (no torch, diffusers, MLflow, DVC or Optuna): the CLI calls :func:`check_paths` right
after it validates the config, before it imports any of those; :func:`dp_ops.runner.preflight` calls the
same checks, for sweeps and the benchmark too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dp_ops.config import Config
from dp_ops.engine.saved import META_FILE, check_saved
from dp_ops.errors import ConfigError
from dp_ops.files import unwritable
from dp_ops.generators import BACKENDS, DIFFUSERS, SCHEDULERS, family_of, pipelines_supported


def check_paths(cfg: Config) -> None:
    """:func:`check_outputs`, then :func:`check_generator`."""
    check_outputs(cfg)
    check_generator(cfg)


def generator_exists(cfg: Config) -> bool:
    """Is the generator ready to load (a pretrained pipeline always is; ``pixel`` once trained)?"""
    if cfg.generator.pretrained:
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
    """A pipeline folder has the layout and configs its backend drives (:func:`check_pipeline`; a hub id is
    checked when it loads), or the ``pixel`` generator folder holds a sound trained generator
    (:func:`~dp_ops.engine.saved.check_saved`) or nothing yet (it is trained there)."""
    g = cfg.generator
    if g.pretrained:
        _check_pipeline_folder(g.backend, g.model, g.scheduler)
        return
    path = Path(g.path)
    if (path / META_FILE).is_file():
        check_saved(path)  # a damaged generator folder is one line now, not a traceback when it loads
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):  # (an empty folder: trained into)
        raise ConfigError(
            f"generator.path={g.path!r}: exists but holds no trained generator "
            f"({META_FILE} missing); use an empty or new folder to train one there"
        )


# The JSON configs a pipeline's checks read, by key: path inside the pipeline folder (or hub repository).
CONFIG_FILES = {
    "model_index": "model_index.json",
    "unet": "unet/config.json",
    "transformer": "transformer/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
SCHEDULER_CLASSES = {entry.cls for entry in SCHEDULERS.values()}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")  # engine.guidance.X0's (a test keeps them)


def _check_pipeline_folder(backend: str, model: str, scheduler: str) -> None:
    """A local pipeline folder must have its family's layout and configs it can drive; anything else is taken for
    a hub id (:func:`dp_ops.runner.load_generator` checks its configs before it reads any weight)."""
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if not looks_local:
        return
    configs = {key: _read_config(path / file, model) for key, file in CONFIG_FILES.items()}
    family = check_pipeline(model, backend, configs, scheduler)
    missing = [sub for sub in BACKENDS[family].layout if not (path / sub).is_dir()]
    if missing:
        raise ConfigError(
            f"generator.model={model!r}: not a complete {BACKENDS[family].pipelines[0]} folder (no "
            f"{', '.join(m + '/' for m in missing)}; expected the save_pretrained layout: "
            f"{', '.join(m + '/' for m in BACKENDS[family].layout)})"
        )


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


def pipeline_family(model: str, backend: str, index: Mapping[str, Any]) -> str:
    """The backend that drives the pipeline whose ``model_index.json`` is ``index``: ``backend`` itself (refused in
    one line if it does not drive that class), or for ``diffusers`` the family the class names."""
    where = f"generator.model={model!r}"
    pipeline = index.get("_class_name")
    family = family_of(pipeline) if isinstance(pipeline, str) else None
    if backend == DIFFUSERS:
        if family is None:
            what = f"a {pipeline}" if pipeline else "a folder without model_index.json's _class_name"
            raise ConfigError(
                f"{where}: {what}, which no generator backend drives (they drive: {pipelines_supported()})"
            )
        return family
    if pipeline and pipeline not in BACKENDS[backend].pipelines:
        hint = f"use generator.backend={family} or diffusers" if family else f"backends drive: {pipelines_supported()}"
        raise ConfigError(f"{where}: a {pipeline}, which generator.backend={backend} does not drive ({hint})")
    return backend


def check_pipeline(model: str, backend: str, configs: Mapping[str, Mapping[str, Any]], scheduler: str = "") -> str:
    """Refuse, in one line and before any weight is read, a pipeline its backend cannot drive, from its configs
    (keys of :data:`CONFIG_FILES`; an absent one, {}, is not checked); returns the backend that drives it."""
    family = pipeline_family(model, backend, configs.get("model_index", {}))
    where = f"generator.model={model!r}"
    sched = configs.get("scheduler", {})
    if not scheduler and sched.get("_class_name", "DDIMScheduler") not in SCHEDULER_CLASSES:
        raise ConfigError(
            f"{where}: its scheduler is a {sched['_class_name']}, which dp_ops cannot sample with; set "
            f"generator.scheduler to one of {', '.join(SCHEDULERS)}"
        )
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(
            f"{where}: its scheduler's prediction_type={prediction!r} is not one dp_ops can invert for x̂0 "
            f"({', '.join(PREDICTION_TYPES)})"
        )
    for check in FAMILY_CHECKS.get(family, ()):
        check(where, configs)
    return family


def _check_sd_unet(where: str, configs: Mapping[str, Mapping[str, Any]]) -> None:
    """SD-1.x/2.x: one CLIP text encoder whose hidden states are the UNet's only condition."""
    unet, text = configs.get("unet", {}), configs.get("text_encoder", {})
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ConfigError(f"{where}: its unet is a {unet['_class_name']}, which generator.backend=sd does not drive")
    for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type"):
        if unet.get(key) is not None:
            raise ConfigError(
                f"{where}: its UNet takes extra conditioning ({key}={unet[key]!r}, as SDXL's does), which "
                "generator.backend=sd does not drive (SDXL: generator.backend=sdxl or diffusers)"
            )
    width, hidden = unet.get("cross_attention_dim"), text.get("hidden_size")
    if width is not None and hidden is not None and width != hidden:
        raise ConfigError(
            f"{where}: its UNet attends to text embeddings of width {width} but its text encoder gives {hidden} "
            "(a second text encoder?), which generator.backend=sd does not drive"
        )


def _check_dit_transformer(where: str, configs: Mapping[str, Mapping[str, Any]]) -> None:
    """DiT: a class-conditional transformer (adaLN-zero over class ids), its output ε (and learned σ) per channel."""
    t = configs.get("transformer", {})
    if not t:
        return
    if t.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or t.get("num_embeds_ada_norm") is None:
        raise ConfigError(
            f"{where}: its transformer is not class-conditioned (norm_type={t.get('norm_type')!r}, "
            f"num_embeds_ada_norm={t.get('num_embeds_ada_norm')!r}), which generator.backend=dit does not drive"
        )
    channels, out = t.get("in_channels", 4), t.get("out_channels", 8)
    if out not in (channels, 2 * channels):
        raise ConfigError(
            f"{where}: its transformer outputs {out} channels for {channels} in (expected ε, or ε and learned σ: "
            f"{channels} or {2 * channels})"
        )


SDXL_TIME_IDS = 6  # original size, crop top-left, target size: each embedded in addition_time_embed_dim channels


def _check_sdxl_unet(where: str, configs: Mapping[str, Mapping[str, Any]]) -> None:
    """SDXL: two CLIP text encoders whose hidden states, concatenated, the UNet attends to; the pooled projection of
    the second and six size ids as its extra (text_time) conditioning."""
    unet = configs.get("unet", {})
    text, text_2 = configs.get("text_encoder", {}), configs.get("text_encoder_2", {})
    if not unet:
        return
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ConfigError(f"{where}: its unet is a {unet['_class_name']}, which generator.backend=sdxl does not drive")
    if unet.get("addition_embed_type") != "text_time":
        raise ConfigError(
            f"{where}: its UNet's addition_embed_type={unet.get('addition_embed_type')!r}, not SDXL's 'text_time' "
            "(SD-1.x/2.x: generator.backend=sd)"
        )
    for key in ("class_embed_type", "encoder_hid_dim_type"):
        if unet.get(key) is not None:
            raise ConfigError(
                f"{where}: its UNet takes extra conditioning ({key}={unet[key]!r}), which generator.backend=sdxl "
                "does not drive"
            )
    if not text or not text_2:
        return
    width, hidden = unet.get("cross_attention_dim"), text.get("hidden_size", 0) + text_2.get("hidden_size", 0)
    if width is not None and width != hidden:
        raise ConfigError(
            f"{where}: its UNet attends to text embeddings of width {width} but its two text encoders give "
            f"{text.get('hidden_size')} + {text_2.get('hidden_size')} = {hidden}"
        )
    added, time_dim = unet.get("projection_class_embeddings_input_dim"), unet.get("addition_time_embed_dim")
    pooled = text_2.get("projection_dim")
    if isinstance(pooled, int) and isinstance(time_dim, int) and added not in (None, pooled + SDXL_TIME_IDS * time_dim):
        raise ConfigError(
            f"{where}: its UNet's added conditioning is {added} wide, but text_encoder_2's pooled projection "
            f"({pooled}) and {SDXL_TIME_IDS} size ids of {time_dim} make {pooled + SDXL_TIME_IDS * time_dim} "
            "(an SDXL refiner? it is not supported)"
        )


# What a family's pipelines must also satisfy, beyond their class, layout and scheduler (by backend name).
FAMILY_CHECKS: dict[str, tuple[Callable[[str, Mapping[str, Mapping[str, Any]]], None], ...]] = {
    "sd": (_check_sd_unet,),
    "sdxl": (_check_sdxl_unet,),
    "dit": (_check_dit_transformer,),
}
