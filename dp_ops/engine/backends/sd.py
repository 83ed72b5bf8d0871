"""SD-1.x and SD-2.x (ε or v prediction): a diffusers ``StableDiffusionPipeline`` prompted with class names.

Notation (as in :mod:`dp_ops.engine.backends.latent`): ε̂ = ε_u + s·(ε_c − ε_u) from the UNet's text-conditioned
and empty-prompt halves, one batched call; the prompt embeddings are the CLIP text encoder's last hidden states,
one per class, encoded once.

Memory of a guided step: the backward pass through ε̂ (``guidance_gradient=full``) and D keeps their
activations; ``gradient_checkpointing`` keeps only each block's input and recomputes the rest in the backward
pass (PyTorch's non-reentrant checkpoint, which ``autograd.grad`` with respect to x_t needs, frozen weights and
all). Attention slicing saves memory only where nothing back-propagates through the UNet: its sliced
attention keeps every probability matrix for a backward pass, where SDPA recomputes them (the config refuses
it with guidance_gradient=full in a guided round).

The pipeline is loaded component by component from a local folder in diffusers' ``save_pretrained`` layout
(``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a hub id; the safety checker is never
loaded. The saved scheduler is kept (its class and schedule) unless ``generator.scheduler`` names another. What
the backend can drive is checked from the configs before any weight is read: :func:`dp_ops.paths.check_pipeline`.
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dp_ops.engine.backends.latent import (
    LatentGenerator,
    PipelineSettings,
    frozen,
    load_component,
    load_vae,
    loading,
    scheduler_config,
)
from dp_ops.engine.schedulers import config_of

Tensor = torch.Tensor


class StableDiffusion(LatentGenerator):
    """UNet, VAE, text encoder and tokenizer of an SD pipeline; samples class-conditionally by prompt,
    optionally entropy-guided."""

    def __init__(
        self,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler_config: Mapping[str, Any],
        class_names: Sequence[str],
        settings: PipelineSettings,
    ) -> None:
        levels = 2 ** (len(unet.config.down_block_types) - 1)
        super().__init__(unet, vae, scheduler_config, settings, levels)
        self.unet = self.denoiser
        self.text_encoder = frozen(text_encoder, self.device, self.dtype)
        self.tokenizer = tokenizer
        self.class_names = tuple(class_names)
        self.prompts = tuple(settings.prompt.format(name=n) for n in self.class_names)
        self.cond = self._encode(list(self.prompts))  # (K, L, D): one text embedding per class
        self.uncond = self._encode([""])  # (1, L, D): the empty prompt, for classifier-free guidance

    @classmethod
    def from_components(
        cls, parts: Mapping[str, Any], class_names: Sequence[str], settings: PipelineSettings
    ) -> StableDiffusion:
        """From components built in code (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``:
        what :func:`~dp_ops.engine.backends.sd_random.random_components` returns), cast to ``settings``."""
        unet, vae, text_encoder, tokenizer = (parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
        return cls(unet, vae, text_encoder, tokenizer, config_of(parts["scheduler"]), class_names, settings)

    @classmethod
    def load(cls, model: str, class_names: Sequence[str], settings: PipelineSettings) -> StableDiffusion:
        """The pipeline at ``model`` (a folder or hub id), its weights read in ``settings.dtype``."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        dtype = settings.dtype
        with loading(model, "a Stable Diffusion pipeline"):
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
            # (transformers 5 calls it dtype; torch_dtype is the name every supported version knows)
            text_encoder = load_component(CLIPTextModel, model, "text_encoder", dtype)
            vae = load_vae(model, dtype)
            unet = load_component(UNet2DConditionModel, model, "unet", dtype)
            schedule = scheduler_config(model)
        return cls(unet, vae, text_encoder, tokenizer, schedule, class_names, settings)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Tensor:
        length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        ids = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return self.text_encoder(ids.input_ids.to(self.device))[0]

    # ---- the pieces of a denoising step (what the shared sampler, dp_ops.engine.sampling, calls) ----
    def model_output(self, z_t: Tensor, t: Tensor, labels: Tensor, cfg_scale: float) -> Tensor:
        """ε̂ (or v̂) with classifier-free guidance (one batched UNet call for both halves), in float32."""
        n, cond = z_t.shape[0], self.cond[labels]
        if cfg_scale == 1.0:
            return self.unet(z_t.to(self.dtype), t, encoder_hidden_states=cond).sample.float()
        text = torch.cat([cond, self.uncond.expand(n, -1, -1)])
        out = self.unet(torch.cat([z_t, z_t]).to(self.dtype), t, encoder_hidden_states=text).sample.float()
        eps_c, eps_u = out.chunk(2)
        return eps_u + cfg_scale * (eps_c - eps_u)
