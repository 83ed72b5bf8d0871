"""Stable Diffusion XL (SDXL-base, SDXL-Turbo, LCM-SDXL): a diffusers ``StableDiffusionXLPipeline`` prompted with
class names.

Notation (as in :mod:`dp_ops.engine.backends.latent`): ε̂ = ε_u + s·(ε_c − ε_u) from the UNet's text-conditioned
and unconditional halves, one batched call. SDXL conditions its UNet on more than SD's text embeddings: the
hidden states of two CLIP text encoders (penultimate layers, concatenated), the pooled projection of the second
one, and six "time ids" (original size, crop top-left, target size). All three are computed by the pipeline's
own code (``encode_prompt``, ``_get_add_time_ids``) once at init, one per class prompt and one for the
unconditional half, which is all zeros where the pipeline says ``force_zeros_for_empty_prompt`` (SDXL-base's).

Few-step variants: SDXL-Turbo is sampled without CFG (s = 1: the conditional half only, one UNet call a step) with
its own EulerAncestral scheduler (trailing timestep spacing); the LCM scheduler (``generator.scheduler=lcm``)
drives LCM-distilled UNets, whose guidance scale enters as an embedding (``time_cond_proj_dim``: the pipeline's
``get_guidance_scale_embedding`` of s − 1) rather than as two halves, again one UNet call a step. With 1–4 steps
entropy guidance is meant to act on every step (``guide_every: 1``).

The VAE's ``force_upcast`` (SDXL's VAE overflows float16) keeps it in float32 in a float16 pipeline
(:func:`~dp_ops.engine.backends.latent.upcast_vae`); bfloat16 needs no upcast.
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
    quiet_hub_libraries,
    scheduler_config,
)
from dp_ops.engine.schedulers import config_of

Tensor = torch.Tensor


class StableDiffusionXL(LatentGenerator):
    """UNet, VAE, both text encoders and tokenizers of an SDXL pipeline; samples class-conditionally by prompt,
    optionally entropy-guided. ``force_zeros_for_empty_prompt``: the pipeline's option (model_index.json) making
    the unconditional embeddings zeros instead of the empty prompt's encoding."""

    def __init__(
        self,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        text_encoder_2: Any,
        tokenizer: Any,
        tokenizer_2: Any,
        scheduler_config: Mapping[str, Any],
        class_names: Sequence[str],
        settings: PipelineSettings,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        from diffusers import StableDiffusionXLPipeline

        levels = 2 ** (len(unet.config.down_block_types) - 1)
        super().__init__(unet, vae, scheduler_config, settings, levels)
        self.unet = self.denoiser
        self.text_encoder = frozen(text_encoder, self.device, self.dtype)
        self.text_encoder_2 = frozen(text_encoder_2, self.device, self.dtype)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        with quiet_hub_libraries():  # (the pipeline object only lends its own conditioning code)
            self.pipeline = StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer_2,
                unet=self.unet,
                scheduler=self.scheduler,
                image_encoder=None,
                feature_extractor=None,
                force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                add_watermarker=False,
            )
        self.class_names = tuple(class_names)
        self.prompts = tuple(settings.prompt.format(name=n) for n in self.class_names)
        self.cond, self.pooled = self._encode(list(self.prompts))  # (K, L, D), (K, P): one per class
        self.uncond, self.uncond_pooled = self._encode_unconditional()  # (1, L, D), (1, P)
        side = (self.resolution, self.resolution)
        self.time_ids = self.pipeline._get_add_time_ids(
            side, (0, 0), side, dtype=self.dtype, text_encoder_projection_dim=self.text_encoder_2.config.projection_dim
        ).to(self.device)  # (1, 6): original size, crop top-left, target size
        self.embedded_guidance = self.unet.config.time_cond_proj_dim is not None

    @classmethod
    def from_components(
        cls, parts: Mapping[str, Any], class_names: Sequence[str], settings: PipelineSettings
    ) -> StableDiffusionXL:
        """From components built in code (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``,
        ``tokenizer_2``, ``scheduler``: what :func:`~dp_ops.engine.backends.sdxl_random.random_components` returns;
        optionally ``force_zeros_for_empty_prompt``), cast to ``settings``."""
        return cls(
            parts["unet"],
            parts["vae"],
            parts["text_encoder"],
            parts["text_encoder_2"],
            parts["tokenizer"],
            parts["tokenizer_2"],
            config_of(parts["scheduler"]),
            class_names,
            settings,
            force_zeros_for_empty_prompt=bool(parts.get("force_zeros_for_empty_prompt", True)),
        )

    @classmethod
    def load(cls, model: str, class_names: Sequence[str], settings: PipelineSettings) -> StableDiffusionXL:
        """The pipeline at ``model`` (a folder or hub id), its weights read in ``settings.dtype``."""
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        dtype = settings.dtype
        with loading(model, "a Stable Diffusion XL pipeline"):
            index = StableDiffusionXLPipeline.load_config(model)
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
            tokenizer_2 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
            text_encoder = load_component(CLIPTextModel, model, "text_encoder", dtype)
            text_encoder_2 = load_component(CLIPTextModelWithProjection, model, "text_encoder_2", dtype)
            vae = load_vae(model, dtype)
            unet = load_component(UNet2DConditionModel, model, "unet", dtype)
            schedule = scheduler_config(model)
        zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        return cls(
            unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, schedule, class_names, settings, zeros
        )

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The pipeline's prompt embeddings and pooled embeddings of ``prompts``."""
        with quiet_hub_libraries():  # (it warns about prompts longer than CLIP's 77 tokens, which it truncates)
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return embeds.to(self.dtype), pooled.to(self.dtype)

    @torch.no_grad()
    def _encode_unconditional(self) -> tuple[Tensor, Tensor]:
        """The unconditional half's embeddings, as the pipeline makes them without a negative prompt: zeros
        with ``force_zeros_for_empty_prompt``, else the empty prompt's encoding."""
        with quiet_hub_libraries():
            _, embeds, _, pooled = self.pipeline.encode_prompt(
                [""], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
            )
        return embeds.to(self.dtype), pooled.to(self.dtype)

    def evals_per_step(self, cfg_scale: float) -> int:
        """One UNet evaluation per sample and step without CFG (s = 1) or with the guidance scale embedded
        (LCM-distilled UNets), else two."""
        return 1 if self.embedded_guidance else super().evals_per_step(cfg_scale)

    # ---- the pieces of a denoising step (what the shared sampler, dp_ops.engine.sampling, calls) ----
    def _unet(self, z: Tensor, t: Tensor, text: Tensor, pooled: Tensor, timestep_cond: Tensor | None) -> Tensor:
        added = {"text_embeds": pooled, "time_ids": self.time_ids.expand(z.shape[0], -1)}
        out = self.unet(
            z.to(self.dtype), t, encoder_hidden_states=text, timestep_cond=timestep_cond, added_cond_kwargs=added
        )
        return out.sample.float()

    def model_output(self, z_t: Tensor, t: Tensor, labels: Tensor, cfg_scale: float) -> Tensor:
        """ε̂ (or v̂) with classifier-free guidance (one batched UNet call for both halves), in float32; the
        conditional half alone for s = 1 or a UNet that embeds s itself."""
        n, cond, pooled = z_t.shape[0], self.cond[labels], self.pooled[labels]
        if self.embedded_guidance:  # (LCM: w = s − 1, as the pipeline passes it)
            w = torch.full((n,), cfg_scale - 1.0)
            dim = self.unet.config.time_cond_proj_dim
            emb = self.pipeline.get_guidance_scale_embedding(w, embedding_dim=dim).to(self.device, self.dtype)
            return self._unet(z_t, t, cond, pooled, emb)
        if cfg_scale == 1.0:
            return self._unet(z_t, t, cond, pooled, None)
        text = torch.cat([cond, self.uncond.expand(n, -1, -1)])
        pooled = torch.cat([pooled, self.uncond_pooled.expand(n, -1)])
        eps_c, eps_u = self._unet(torch.cat([z_t, z_t]), t, text, pooled, None).chunk(2)
        return eps_u + cfg_scale * (eps_c - eps_u)
