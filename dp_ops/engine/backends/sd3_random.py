"""Randomly initialised Stable Diffusion 3 pipelines, for tests and benchmarks without any download.

``tiny``: a 2-layer SD3 transformer (patch 2, SD3.5's dual attention and RMS q/k norm in its first layer), a
2-level VAE with SD3's scaling and shift factors and no quant convs, two small CLIP text encoders with projection
(32×32 images, seconds on a CPU), the way diffusers' own tests (``tests/pipelines/stable_diffusion_3``) exercise
the pipeline, but without T5: the pipeline puts zeros of ``joint_attention_dim`` in its place. ``t5=True`` adds a
tiny T5 encoder and a T5 tokenizer made in code (a Unigram vocabulary), for the path that loads them.

``sd3-medium``: exactly SD3-medium's transformer (24 layers, 24 heads of 64, joint attention over 4096-wide text
tokens, pooled projections of 2048), its 16-channel VAE and its two CLIP encoders (CLIP-L 768 wide, 12 layers;
CLIP-bigG 1280 wide, 32 layers), random weights, for counting FLOPs on the meta device. T5-XXL (4.7 B parameters)
is left out there: it encodes each class prompt once, at load, and never runs in a denoising step.

Each tokenizer is a real ``CLIPTokenizer`` over a small generated vocabulary
(:func:`~dp_ops.engine.backends.sd_random.small_tokenizer`), which is all a class-name prompt needs.
:func:`save_pipeline` writes the ``StableDiffusion3Pipeline`` ``save_pretrained`` layout that ``generator.model``
points at.
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from dp_ops.engine.backends.latent import quiet_hub_libraries
from dp_ops.engine.backends.sd_random import CLIP_BIGG, CLIP_L, small_tokenizer

if TYPE_CHECKING:  # (transformers is imported where a tokenizer is made)
    from transformers import PreTrainedTokenizerBase

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "transformer": dict(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=48,  # > 16 + 24, the two CLIP widths: padded with zeros, as SD3's 2048 to 4096
            caption_projection_dim=16,  # (= heads × head dim: the text tokens join the image tokens' width)
            pooled_projection_dim=40,  # the two CLIP projections, concatenated
            pos_embed_max_size=32,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        "vae": dict(
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=32,
            scaling_factor=1.5035,
            shift_factor=0.0609,
        ),
        "text": dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16
        ),
        "text_2": dict(
            hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, projection_dim=24
        ),
        "t5": dict(d_model=48, d_ff=64, d_kv=8, num_heads=2, num_layers=1),
    },
    "sd3-medium": {
        "transformer": dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=192,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            latent_channels=16,
            sample_size=1024,
            scaling_factor=1.5305,
            shift_factor=0.0609,
        ),
        "text": CLIP_L,
        "text_2": CLIP_BIGG,
    },
}


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3's (and SD3.5's) flow-matching schedule: 1000 training timesteps, σ shifted by 3."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def small_t5_tokenizer() -> PreTrainedTokenizerBase:
    """A T5 tokenizer made in code: a Unigram vocabulary of the special tokens, ▁a-z and a-z, 0-9 (transformers
    5 builds it from the list; no sentencepiece model file)."""
    # transformers 5 resolves the *TokenizerFast names on first access (T5TokenizerFast is T5Tokenizer), so its
    # declared exports, which mypy reads, do not list them; 4.x defines the class.
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]

    pieces = [("▁" + ch, -1.0) for ch in string.ascii_lowercase] + [(ch, -2.0) for ch in string.ascii_lowercase]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, *((d, -2.0) for d in string.digits)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def random_components(size: str = "tiny", seed: int = 0, t5: bool = False) -> dict[str, Any]:
    """Transformer, VAE, two CLIP text encoders with projection and their tokenizers, the flow scheduler, with
    seeded random weights; ``text_encoder_3``/``tokenizer_3`` (T5, tiny only) None unless ``t5``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    spec = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = small_tokenizer(Path(tmp) / "1")
        tokenizer_2 = small_tokenizer(Path(tmp) / "2")
    tokenizer_3 = small_t5_tokenizer() if t5 else None

    def clip(text: dict[str, Any]) -> Any:
        text = {"vocab_size": len(tokenizer), **text}
        config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77, **text)
        return CLIPTextModelWithProjection(config)

    vae_spec = spec["vae"]
    levels = len(vae_spec["block_out_channels"])
    with torch.random.fork_rng(devices=[]), quiet_hub_libraries():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**spec["transformer"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **vae_spec,
        )
        text_encoder, text_encoder_2 = clip(spec["text"]), clip(spec["text_2"])
        text_encoder_3 = None
        if tokenizer_3 is not None:
            config = T5Config(vocab_size=len(tokenizer_3), pad_token_id=0, eos_token_id=1, **spec["t5"])
            text_encoder_3 = T5EncoderModel(config)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizer_3,
        "scheduler": sd3_scheduler(),
    }


def save_pipeline(components: dict[str, Any], path: str | Path) -> Path:
    """Write a ``StableDiffusion3Pipeline`` folder that ``from_pretrained`` reads back (without T5 unless the
    components hold one: model_index.json then lists text_encoder_3 and tokenizer_3 as [null, null])."""
    from diffusers import StableDiffusion3Pipeline

    parts = {"text_encoder_3": None, "tokenizer_3": None, **components}
    with quiet_hub_libraries():
        StableDiffusion3Pipeline(**parts).save_pretrained(str(path))
    return Path(path)
