"""Loading a generator by its backend's entry in :data:`dp_ops.generators.BACKENDS`: the trained pixel generator
from ``generator.path`` (:func:`load_pixel`; trained there first by :func:`train_and_save_generator`), or a
pretrained pipeline through the adapter its entry names by import path (:func:`load_family`), with the sampling
settings of the config (:func:`pipeline_settings`).

The table is standard library only (the foundation layer), so it names its adapters; the import happens here, in
the engine, where torch and diffusers may be loaded. Which family drives a pipeline is checked from its configs by
the caller before any weight is read (:func:`dp_ops.runner.load_pipeline`, through
:func:`dp_ops.paths.check_pipeline`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from dp_ops.config import Config
from dp_ops.engine.backends.pixel import PixelDiffusion, train_generator
from dp_ops.engine.data import RealData
from dp_ops.engine.devices import resolve_dtype
from dp_ops.engine.dist import SINGLE, World
from dp_ops.engine.quality import Quality, measure_quality
from dp_ops.engine.sampling import Generator, Progress
from dp_ops.engine.saved import GeneratorMeta
from dp_ops.errors import ConfigError
from dp_ops.generators import BACKENDS

if TYPE_CHECKING:  # (diffusers is imported by the latent backends only when a pipeline is loaded)
    from dp_ops.engine.backends.latent import PipelineSettings


def train_and_save_generator(
    cfg: Config, real: RealData, *, progress: Progress | None = None, quality_progress: Progress | None = None
) -> tuple[PixelDiffusion, Quality]:
    """Train on the generator-train split, measure quality with a real-data judge, save to generator.path."""
    if cfg.generator.pretrained:
        raise ConfigError(
            f"generator.backend={cfg.generator.backend!r}: a pretrained pipeline (generator.model) is not "
            "trained here; only the pixel generator is"
        )
    meta = GeneratorMeta.of(cfg, real.num_classes)
    generator = train_generator(cfg.generator, real.gen_train, meta=meta, seed=cfg.data.split_seed, progress=progress)
    quality = measure_quality(generator, real, cfg.generator, seed=cfg.data.split_seed, progress=quality_progress)
    generator = PixelDiffusion(generator.unet, generator.scheduler, replace(meta, quality=quality.to_dict()))
    generator.save(cfg.generator.path)
    return generator, quality


def load_pixel(cfg: Config, world: World = SINGLE) -> PixelDiffusion:
    """The trained pixel generator at ``generator.path``, checked against the configured data, on
    ``device`` (where the learner runs)."""
    generator = PixelDiffusion.load(cfg.generator.path, scheduler=cfg.generator.scheduler)
    generator.check_matches(cfg.data)
    return generator.to(world.device(cfg.device), channels_last=cfg.generator.channels_last)


def pipeline_settings(cfg: Config, device: torch.device) -> PipelineSettings:
    """How the pipeline of ``cfg`` samples on ``device``: conditioning, sizes (generated, stored, learner's),
    its weights' dtype (``generator.dtype=auto`` resolved for ``device``) and memory options."""
    from dp_ops.engine.backends.latent import PipelineSettings

    g, d = cfg.generator, cfg.data
    return PipelineSettings(
        prompt=g.prompt,
        resolution=g.resolution,
        output_resolution=d.stored_resolution,
        learner_resolution=d.resolution,
        device=str(device),
        dtype=resolve_dtype(g.dtype, device),
        vae_slicing=g.vae_slicing,
        attention_slicing=g.attention_slicing,
        gradient_checkpointing=g.gradient_checkpointing,
        scheduler=g.scheduler,
        guidance_decoder=g.guidance_decoder,
        class_ids=d.class_ids,
    )


def load_family(cfg: Config, family: str, class_names: Sequence[str], world: World = SINGLE) -> Generator:
    """The pipeline at ``generator.model`` on this process's device, conditioned on ``class_names``, by the
    adapter of backend ``family`` (the one that drives it, already checked), its weights read in ``generator.dtype``."""
    settings = pipeline_settings(cfg, world.device(cfg.device))
    module, name = BACKENDS[family].adapter.split(":")
    return getattr(importlib.import_module(module), name).load(cfg.generator.model, class_names, settings)
