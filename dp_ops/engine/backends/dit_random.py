"""Randomly initialised DiT pipelines, for tests and benchmarks without any download.

``tiny``: a 2-layer DiT (2 heads × 8, patch 2, learned σ: 8 output channels for 4 latent ones) over 16² latents
of a 2-level VAE (32×32 images, seconds on a CPU), the way diffusers' own DiT tests build theirs.
``dit-xl-2-256``: exactly DiT-XL/2's shapes at 256² (28 layers, 16 heads × 72, patch 2, 32² latents, learned σ)
and SD's VAE (128/256/512/512), random weights, for counting FLOPs and memory on the meta device.

Both carry an ``id2label`` in the hub's form (ImageNet-1k index -> comma-separated names, timm's
descriptions): the tiny one a few classes, among them the names two classes share ("crane"), the large one all
1000. :func:`save_pipeline` writes the ``save_pretrained`` layout ``generator.model`` points at, ``id2label`` in
``model_index.json`` where facebook/DiT-XL-2-256 keeps it.
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

from dp_ops.engine.backends.latent import quiet_hub_libraries

# ImageNet-1k indices of the tiny pipeline's id2label: tench, goldfish, great white shark, crane (the bird),
# golden retriever, German shepherd, crane (the machine)
TINY_CLASSES = (0, 1, 2, 134, 207, 235, 517)

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "transformer": dict(sample_size=16, patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=8),
        "vae": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32),
        "classes": TINY_CLASSES,
    },
    "dit-xl-2-256": {
        "transformer": dict(sample_size=32, patch_size=2, num_layers=28, num_attention_heads=16, attention_head_dim=72),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=256),
        "classes": tuple(range(1000)),
    },
}


def dit_scheduler() -> DDIMScheduler:
    """DiT's noise schedule (linear betas 1e-4..0.02 over 1000 steps, ε prediction), sampled with DDIM."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def imagenet_id2label(indices: tuple[int, ...]) -> dict[int, str]:
    """ImageNet-1k index -> its comma-separated names, as the hub's DiT ``id2label`` has them (timm's table)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {i: info.index_to_description(i) for i in indices}


def random_components(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Transformer, VAE, scheduler (seeded random weights) and ``id2label``."""
    spec = SIZES[size]
    id2label = imagenet_id2label(spec["classes"])
    with torch.random.fork_rng(devices=[]), quiet_hub_libraries():
        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(
            in_channels=4,
            out_channels=8,  # learned σ: ε̂ and the variance, channel-stacked
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
            activation_fn="gelu-approximate",
            attention_bias=True,
            **spec["transformer"],
        )
        levels = len(spec["vae"]["block_out_channels"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            scaling_factor=0.18215,
            **spec["vae"],
        )
    return {"transformer": transformer, "vae": vae, "scheduler": dit_scheduler(), "id2label": id2label}


def save_pipeline(components: dict[str, Any], path: str | Path) -> Path:
    """Write a ``DiTPipeline`` folder that ``from_pretrained`` reads back, labels included. (``DiTPipeline``
    takes ``id2label`` but does not record it, so its ``save_pretrained`` alone would drop it: it is registered
    in the pipeline's config, which ``save_pretrained`` writes to ``model_index.json``.)"""
    from diffusers import DiTPipeline

    id2label = components.get("id2label")
    with quiet_hub_libraries():
        pipe = DiTPipeline(components["transformer"], components["vae"], components["scheduler"], id2label=id2label)
        if id2label is not None:
            pipe.register_to_config(id2label={str(k): v for k, v in id2label.items()})
        pipe.save_pretrained(str(path))
    return Path(path)
