"""Randomly initialised Stable Diffusion XL pipelines, for tests and benchmarks without any download.

``tiny``: the shape of diffusers' own SDXL test components (tests/pipelines/stable_diffusion_xl): a 2-level UNet
with SDXL's extra conditioning (``addition_embed_type="text_time"``: the pooled text embedding and six time ids,
each embedded in ``addition_time_embed_dim`` channels), two small CLIP text encoders whose hidden states are
concatenated for cross-attention (the second one with a projection: the pooled embedding), a 2-level VAE;
32×32 images, seconds on a CPU. ``sdxl``: exactly SDXL-base-1.0's shapes (UNet 320/640/1280 with 1/2/10
transformer layers and cross-attention dim 768 + 1280 = 2048, the 4-level VAE with scaling factor 0.13025 and
``force_upcast``, CLIP ViT-L and OpenCLIP ViT-bigG text encoders), random weights, constructible on the meta
device for counting FLOPs. Both tokenizers are :func:`~dp_ops.engine.backends.sd_random.small_tokenizer`, which is
all a class-name prompt needs.

:func:`save_pipeline` writes the ``StableDiffusionXLPipeline`` ``save_pretrained`` layout that
``generator.model`` points at.
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from dp_ops.engine.backends.latent import quiet_hub_libraries
from dp_ops.engine.backends.sd_random import CLIP_BIGG, CLIP_L, small_tokenizer

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "unet": dict(
            sample_size=16,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_time_embed_dim=8,
            norm_num_groups=8,
        ),
        "vae": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32),
        "text": dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16
        ),
        "text_2": dict(
            hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, projection_dim=20
        ),
    },
    "sdxl": {
        "unet": dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            addition_time_embed_dim=256,
            norm_num_groups=32,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
        "text": CLIP_L,
        "text_2": CLIP_BIGG,
    },
}

# SDXL's time ids: original size (2), crop top-left (2), target size (2), each embedded separately.
TIME_IDS = 6


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL-base-1.0's scheduler: Euler over the scaled-linear betas 0.00085..0.012, leading spacing, offset 1.
    Its tables are made on the CPU even under ``torch.device("meta")`` (the sampler reads them there)."""
    with torch.device("cpu"):
        return EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
            use_karras_sigmas=False,
            prediction_type="epsilon",
        )


def random_components(size: str = "tiny", seed: int = 0, time_cond_proj_dim: int | None = None) -> dict[str, Any]:
    """UNet, VAE, both text encoders, both tokenizers and the scheduler, with seeded random weights.
    ``time_cond_proj_dim``: a UNet with a guidance-scale embedding input, as LCM-distilled SDXL UNets have."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = small_tokenizer(Path(tmp) / "1")
        tokenizer_2 = small_tokenizer(Path(tmp) / "2")
    common = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77)
    text = CLIPTextConfig(**{"vocab_size": len(tokenizer), **common, **spec["text"]})
    text_2 = CLIPTextConfig(**{"vocab_size": len(tokenizer_2), **common, **spec["text_2"]})
    unet_spec = spec["unet"]
    with torch.random.fork_rng(devices=[]), quiet_hub_libraries():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            cross_attention_dim=text.hidden_size + text_2.hidden_size,
            addition_embed_type="text_time",
            # (as diffusers' test computes it: the pooled embedding, then the six embedded time ids)
            projection_class_embeddings_input_dim=text_2.projection_dim
            + TIME_IDS * unet_spec["addition_time_embed_dim"],
            time_cond_proj_dim=time_cond_proj_dim,
            **unet_spec,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * len(spec["vae"]["block_out_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(spec["vae"]["block_out_channels"]),
            **spec["vae"],
        )
        text_encoder = CLIPTextModel(text)
        text_encoder_2 = CLIPTextModelWithProjection(text_2)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": sdxl_scheduler(),
    }


def save_pipeline(components: dict[str, Any], path: str | Path) -> Path:
    """Write a ``StableDiffusionXLPipeline`` folder (no image encoder, no watermarker) that its ``from_pretrained``
    and :meth:`~dp_ops.engine.backends.sdxl.StableDiffusionXL.load` read back. A ``force_zeros_for_empty_prompt``
    entry of ``components`` goes to model_index.json (SDXL-base's is true)."""
    from diffusers import StableDiffusionXLPipeline

    with quiet_hub_libraries():
        pipe = StableDiffusionXLPipeline(
            **components, image_encoder=None, feature_extractor=None, add_watermarker=False
        )
        pipe.save_pretrained(str(path))
    return Path(path)
