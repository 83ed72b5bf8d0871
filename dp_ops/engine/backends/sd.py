"""The text-to-image world's generator: a diffusers Stable Diffusion pipeline prompted with class names.

Notation (as in :mod:`dp_ops.engine.sampling`):
    z_t     the latent being denoised, (n, 4, H/f, W/f) for a VAE with downsampling factor f
    ε̂       ε_θ(z_t, t, c) with classifier-free guidance, ε_u + s·(ε_c − ε_u), s in diffusers' convention
    x̂0      the DDIM estimate of the clean *latent* from z_t and ε̂
    D(·)    the VAE decoder, applied to x̂0 / scaling_factor; gives an image in [-1, 1]

Sampling and entropy guidance are the shared DDIM sampler (:mod:`dp_ops.engine.sampling`), the same code
the pixel backend runs; this backend supplies ε̂ from the text embeddings, seeded latent noise, and
``to_learner`` = D with gradient, resized to the learner's input.

Memory of a guided step: the backward pass through ε̂ (``guidance_gradient=full``) and D keeps their
activations; ``gradient_checkpointing`` keeps only each block's input and recomputes the rest in the backward
pass (PyTorch's non-reentrant checkpoint, which ``autograd.grad`` with respect to x_t needs, frozen weights and
all). Attention slicing saves memory only where nothing back-propagates through the UNet: its sliced
attention keeps every probability matrix for a backward pass, where SDPA recomputes them (the config refuses
it with guidance_gradient=full in a guided round).

The pipeline is loaded component by component with ``from_pretrained`` from a local folder in diffusers'
``save_pretrained`` layout (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a hub
id; the safety checker is never loaded. Weights are read in the pipeline's dtype (``torch_dtype``: never
float32 then cast), bfloat16 on CUDA by default (:func:`~dp_ops.engine.devices.resolve_dtype`); a float16
pipeline keeps a VAE that sets ``force_upcast`` in float32 (:func:`upcast_vae`). The saved scheduler's
schedule (betas, offsets) is kept, its sampler replaced by DDIM. What the backend can drive (SD-1.x and
SD-2.x pipelines) is checked from the configs before any weight is read: :func:`dp_ops.paths.check_sd_configs`
over :func:`pipeline_configs`.
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils import is_accelerate_available

from dp_ops.engine.data import resize
from dp_ops.engine.sampling import Generator, seeded_noise
from dp_ops.errors import GeneratorError

Tensor = torch.Tensor


@dataclass(frozen=True)
class SDSettings:
    """How a loaded pipeline samples: prompt template, image sizes, device and precision."""

    prompt: str = "{name}"  # {name}: the class name
    resolution: int = 0  # side of generated images; 0 = the UNet's sample_size × the VAE factor
    output_resolution: int = 0  # side of returned (stored) images; 0 = resolution
    learner_resolution: int = 0  # side of the learner's input; 0 = output_resolution
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    vae_slicing: bool = False
    attention_slicing: bool = False
    gradient_checkpointing: bool = False


def upcast_vae(dtype: torch.dtype, vae_config: Mapping[str, Any]) -> bool:
    """Keep the VAE in float32 in a float16 pipeline when its config asks to (``force_upcast``: SDXL's VAE
    overflows float16's range); AutoencoderKL's default, for configs that do not say (SD-1.5's), is True."""
    return dtype == torch.float16 and bool(vae_config.get("force_upcast", True))


@contextmanager
def quiet_hub_libraries() -> Iterator[None]:
    """Silence diffusers'/transformers' loading logs and progress bars (library code prints nothing)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _, _ in saved:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, verbosity, bar in saved:
            m.set_verbosity(verbosity)
            (m.enable_progress_bar if bar else m.disable_progress_bar)()


class StableDiffusion(Generator):
    """UNet, VAE, text encoder and tokenizer of an SD pipeline; samples class-conditionally by prompt,
    optionally entropy-guided. Same ``sample`` contract as :class:`dp_ops.engine.backends.pixel.PixelDiffusion`."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config, class_names, settings: SDSettings):
        s = settings
        self.device, self.dtype = torch.device(s.device), s.dtype
        vae_dtype = torch.float32 if upcast_vae(s.dtype, vae.config) else s.dtype
        # diffusers warns about casting with .to() (SD-1.5 has nothing to keep) and about the saved sampler's
        # own options when DDIM takes its schedule (SD-1.5's PNDM skip_prk_steps: DDIM has no use for them).
        # Loaded components are in their dtype already (a no-op cast); components built in code are cast here.
        with quiet_hub_libraries():
            self.unet, self.vae, self.text_encoder = (
                m.to(self.device, dtype).eval().requires_grad_(False)
                for m, dtype in ((unet, s.dtype), (vae, vae_dtype), (text_encoder, s.dtype))
            )
            self.scheduler = DDIMScheduler.from_config(scheduler_config)  # the saved schedule, sampled with DDIM
        self.tokenizer = tokenizer
        self.class_names = tuple(class_names)
        if s.vae_slicing:
            self.vae.enable_slicing()
        if s.attention_slicing:
            self.unet.set_attention_slice("auto")
        if s.gradient_checkpointing:  # (diffusers' default checkpoint function is the non-reentrant one)
            for model in (self.unet, self.vae):
                model.enable_gradient_checkpointing()
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = s.resolution or self.unet.config.sample_size * self.vae_factor
        self._check_resolution()
        self.output_resolution = s.output_resolution or self.resolution
        self.learner_resolution = s.learner_resolution or self.output_resolution
        self.prompts = tuple(s.prompt.format(name=n) for n in self.class_names)
        self.cond = self._encode(list(self.prompts))  # (K, L, D): one text embedding per class
        self.uncond = self._encode([""])  # (1, L, D): the empty prompt, for classifier-free guidance

    @classmethod
    def from_components(cls, parts: Mapping[str, Any], class_names, settings: SDSettings) -> StableDiffusion:
        """From components built in code (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``:
        what :func:`~dp_ops.engine.backends.sd_random.random_components` returns), cast to ``settings``."""
        unet, vae, text_encoder, tokenizer = (parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
        return cls(unet, vae, text_encoder, tokenizer, parts["scheduler"].config, class_names, settings)

    @classmethod
    def load(cls, model: str, class_names, settings: SDSettings) -> StableDiffusion:
        """The pipeline at ``model`` (a folder or hub id), its weights read in ``settings.dtype``."""
        from transformers import CLIPTextModel, CLIPTokenizer

        dtype = settings.dtype
        low_memory = is_accelerate_available()  # (diffusers reads weights without a random init first with it)
        try:
            with quiet_hub_libraries():
                vae_config = AutoencoderKL.load_config(model, subfolder="vae")
                vae_dtype = torch.float32 if upcast_vae(dtype, vae_config) else dtype
                tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
                # (transformers 5 calls it dtype; torch_dtype is the name every supported version knows)
                text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype)
                vae = AutoencoderKL.from_pretrained(
                    model, subfolder="vae", torch_dtype=vae_dtype, low_cpu_mem_usage=low_memory
                )
                unet = UNet2DConditionModel.from_pretrained(
                    model, subfolder="unet", torch_dtype=dtype, low_cpu_mem_usage=low_memory
                )
                scheduler_config = DDIMScheduler.load_config(model, subfolder="scheduler")
        except (OSError, ValueError, KeyError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            message = f"generator.model={model!r}: cannot load a Stable Diffusion pipeline: {reason}"
            raise GeneratorError(message) from None
        return cls(unet, vae, text_encoder, tokenizer, scheduler_config, class_names, settings)

    def _check_resolution(self) -> None:
        multiple = self.vae_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        if self.resolution % multiple:
            raise GeneratorError(
                f"generator.resolution={self.resolution}: must be a multiple of {multiple} for this model"
            )

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Tensor:
        length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        ids = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return self.text_encoder(ids.input_ids.to(self.device))[0]

    # ---- the pieces of a denoising step (what the shared sampler, dp_ops.engine.sampling, calls) ----
    def eps(self, z_t: Tensor, t: Tensor, labels: Tensor, cfg_scale: float) -> Tensor:
        """ε̂ with classifier-free guidance (one batched UNet call for both halves), in float32."""
        n, cond = z_t.shape[0], self.cond[labels]
        if cfg_scale == 1.0:
            return self.unet(z_t.to(self.dtype), t, encoder_hidden_states=cond).sample.float()
        text = torch.cat([cond, self.uncond.expand(n, -1, -1)])
        out = self.unet(torch.cat([z_t, z_t]).to(self.dtype), t, encoder_hidden_states=text).sample.float()
        eps_c, eps_u = out.chunk(2)
        return eps_u + cfg_scale * (eps_c - eps_u)

    def decode(self, z0: Tensor) -> Tensor:
        """D(x̂0 / scaling_factor): latents to images in (about) [-1, 1], float32; differentiable."""
        cfg = self.vae.config
        z = z0 / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    def to_learner(self, z0: Tensor) -> Tensor:
        """How x̂0 becomes the learner's input: decode with gradient, resize to the learner's side."""
        return resize(self.decode(z0), self.learner_resolution)

    def to_images(self, z0: Tensor) -> Tensor:
        """The final latents as stored images: decoded, clamped (the VAE overshoots [-1, 1] a little), resized."""
        return resize(self.decode(z0).clamp(-1, 1), self.output_resolution)

    def noise(self, seeds: np.ndarray) -> Tensor:
        side = self.resolution // self.vae_factor
        return seeded_noise(seeds, (self.unet.config.in_channels, side, side), self.device)


def pipeline_configs(model: str) -> dict[str, dict[str, Any]]:
    """The JSON configs of the pipeline at ``model`` (a folder or hub id) that
    :func:`dp_ops.paths.check_sd_configs` reads, without any weight; {} for a config that cannot be read
    (the load then says why)."""
    from diffusers import DiffusionPipeline
    from transformers import PretrainedConfig

    readers = {
        "model_index": lambda: DiffusionPipeline.load_config(model),
        "unet": lambda: UNet2DConditionModel.load_config(model, subfolder="unet"),
        "text_encoder": lambda: PretrainedConfig.get_config_dict(model, subfolder="text_encoder")[0],
        "scheduler": lambda: DDIMScheduler.load_config(model, subfolder="scheduler"),
    }
    configs: dict[str, dict[str, Any]] = {}
    with quiet_hub_libraries():
        for key, read in readers.items():
            try:
                configs[key] = dict(read())
            except (OSError, ValueError):
                configs[key] = {}
    return configs
