"""Randomly initialised Stable Diffusion pipelines, for tests and benchmarks without any download.

``tiny``: a 2-level UNet and VAE and a 2-layer text encoder (32×32 images, seconds on a CPU), the way
diffusers' own tests exercise pipelines. ``sd15``: exactly SD-1.5's shapes (UNet 320/640/1280/1280 with
cross-attention dim 768, the 4-level VAE, a 12-layer 768-wide CLIP text encoder), random weights, for
measuring speed and memory on a GPU. The tokenizer is a real ``CLIPTokenizer`` over a small generated
vocabulary (letters and digits), which is all a class-name prompt needs.

:func:`save_pipeline` writes the ``save_pretrained`` layout that ``generator.model`` points at.
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import json
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from dp_ops.engine.backends.latent import quiet_hub_libraries

if TYPE_CHECKING:  # (transformers is imported where a tokenizer is made)
    from transformers import CLIPTokenizer

# The real text encoders' shapes (SD-1.5, SDXL and SD3 share CLIP ViT-L/14; SDXL and SD3 add OpenCLIP ViT-bigG/14).
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    vocab_size=49408,
    hidden_act="quick_gelu",
)
CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    vocab_size=49408,
    hidden_act="gelu",
)

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "unet": dict(
            sample_size=16,
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=4,
        ),
        "vae": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32),
        "text": dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16
        ),
    },
    "sd15": {
        "unet": dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
        "text": CLIP_L,
    },
}


def sd15_scheduler() -> DDIMScheduler:
    """SD-1.5's noise schedule (scaled-linear betas 0.00085..0.012, offset 1)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def small_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary is the special tokens, a-z, 0-9 (alone and word-final)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )


def random_components(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """UNet, VAE, text encoder, tokenizer and scheduler with seeded random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = small_tokenizer(Path(tmp))
    text = {"vocab_size": len(tokenizer), **spec["text"]}
    with torch.random.fork_rng(devices=[]), quiet_hub_libraries():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * len(spec["vae"]["block_out_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(spec["vae"]["block_out_channels"]),
            **spec["vae"],
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77, **text)
        )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": sd15_scheduler(),
    }


def save_pipeline(components: dict[str, Any], path: str | Path) -> Path:
    """Write a ``StableDiffusionPipeline`` folder (no safety checker) that ``from_pretrained`` reads back."""
    from diffusers import StableDiffusionPipeline

    with quiet_hub_libraries():
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        pipe.save_pretrained(str(path))
    return Path(path)
