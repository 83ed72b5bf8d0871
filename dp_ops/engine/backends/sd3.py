"""Stable Diffusion 3 and 3.5 (flow matching): a diffusers ``StableDiffusion3Pipeline`` prompted with class names.

Notation (as in :mod:`dp_ops.engine.backends.latent`): the MMDiT transformer predicts the flow velocity
v = ε − x0 of x_t = (1−σ)·x0 + σ·ε, so the sampler's x̂0 = x_t − σ·v̂ (``flow:flow_prediction`` in
:mod:`dp_ops.engine.schedulers`), and v̂ = v_u + s·(v_c − v_u) from the prompt-conditioned and empty-prompt halves
of one batched transformer call. The conditioning of a class is the pipeline's own
``StableDiffusion3Pipeline.encode_prompt`` of its prompt: the joint text embeddings (the two CLIP encoders'
penultimate hidden states side by side, zero-padded to T5's width, then T5's tokens, or zeros where the folder
has no T5) and the pooled projections (both CLIP encoders' pooled outputs), encoded once at load, one per class,
with the empty prompt's for classifier-free guidance.

The timestep the transformer reads is the scheduler's, σ·1000, broadcast to the batch as the pipeline's denoising
loop does. A scheduler with dynamic shifting (``use_dynamic_shifting``) is set up with the ``mu`` the pipeline
computes from the image's token count (:meth:`StableDiffusion3.timestep_kwargs`).

Entropy guidance: the family default is ``guidance_gradient=x0`` (v̂ held fixed, the gradient through the VAE
decoder and the learner only: no backward pass through a multi-billion-parameter transformer); ``full`` works too.

The pipeline is loaded component by component from a folder in diffusers' ``save_pretrained`` layout
(``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``,
``scheduler/``, and ``text_encoder_3/`` with ``tokenizer_3/`` where its ``model_index.json`` lists them) or a hub
id. The saved scheduler is kept unless ``generator.scheduler`` names another.
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
from dp_ops.errors import GeneratorError

Tensor = torch.Tensor
FAMILY = "a Stable Diffusion 3 pipeline"
PROMPTS_PER_CALL = 16  # class prompts encoded per encode_prompt call (T5-XXL over 1000 prompts at once is a lot)


class StableDiffusion3(LatentGenerator):
    """Transformer, VAE, the two CLIP text encoders and tokenizers (and T5, where the pipeline has it) of an SD3
    pipeline; samples class-conditionally by prompt, optionally entropy-guided."""

    def __init__(
        self,
        transformer: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        text_encoder_2: Any,
        tokenizer_2: Any,
        scheduler_config: Mapping[str, Any],
        class_names: Sequence[str],
        settings: PipelineSettings,
        text_encoder_3: Any = None,
        tokenizer_3: Any = None,
    ) -> None:
        from diffusers import StableDiffusion3Pipeline

        patch = transformer.config.patch_size
        super().__init__(transformer, vae, scheduler_config, settings, patch)
        self.transformer = self.denoiser
        tokens = self.noise_shape[1] // patch
        if tokens > transformer.config.pos_embed_max_size:
            largest = transformer.config.pos_embed_max_size * patch * self.vae_factor
            raise GeneratorError(
                f"generator.resolution={self.resolution}: at most {largest} for this model (its position "
                f"embedding covers {transformer.config.pos_embed_max_size} patches a side)"
            )
        self.text_encoder = frozen(text_encoder, self.device, self.dtype)
        self.text_encoder_2 = frozen(text_encoder_2, self.device, self.dtype)
        self.text_encoder_3 = None if text_encoder_3 is None else frozen(text_encoder_3, self.device, self.dtype)
        with quiet_hub_libraries():
            self.pipeline = StableDiffusion3Pipeline(
                transformer=self.transformer,
                scheduler=self.scheduler,
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=tokenizer,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=tokenizer_2,
                text_encoder_3=self.text_encoder_3,
                tokenizer_3=tokenizer_3 if text_encoder_3 is not None else None,
            )
        self.class_names = tuple(class_names)
        self.prompts = tuple(settings.prompt.format(name=n) for n in self.class_names)
        self.cond, self.pooled = self._encode(list(self.prompts))  # (K, L, D), (K, P): one per class
        self.uncond, self.uncond_pooled = self._encode_negative()  # (1, L, D), (1, P): the empty prompt

    @classmethod
    def from_components(
        cls, parts: Mapping[str, Any], class_names: Sequence[str], settings: PipelineSettings
    ) -> StableDiffusion3:
        """From components built in code (what :func:`~dp_ops.engine.backends.sd3_random.random_components`
        returns: ``transformer``, ``vae``, ``text_encoder(_2)``, ``tokenizer(_2)``, ``scheduler``, and optionally
        ``text_encoder_3``/``tokenizer_3``), cast to ``settings``."""
        return cls(
            parts["transformer"],
            parts["vae"],
            parts["text_encoder"],
            parts["tokenizer"],
            parts["text_encoder_2"],
            parts["tokenizer_2"],
            config_of(parts["scheduler"]),
            class_names,
            settings,
            parts.get("text_encoder_3"),
            parts.get("tokenizer_3"),
        )

    @classmethod
    def load(cls, model: str, class_names: Sequence[str], settings: PipelineSettings) -> StableDiffusion3:
        """The pipeline at ``model`` (a folder or hub id), its weights read in ``settings.dtype``; T5 loaded where
        its ``model_index.json`` lists one."""
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        dtype = settings.dtype
        with loading(model, FAMILY):
            index = StableDiffusion3Pipeline.load_config(model)
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
            tokenizer_2 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
            text_encoder = load_component(CLIPTextModelWithProjection, model, "text_encoder", dtype)
            text_encoder_2 = load_component(CLIPTextModelWithProjection, model, "text_encoder_2", dtype)
            t5: dict[str, Any] = {}
            if _listed(index, "text_encoder_3"):
                t5["tokenizer_3"] = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_3")
                t5["text_encoder_3"] = load_component(T5EncoderModel, model, "text_encoder_3", dtype)
            vae = load_vae(model, dtype)
            transformer = load_component(SD3Transformer2DModel, model, "transformer", dtype)
            schedule = scheduler_config(model)
        return cls(
            transformer,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            schedule,
            class_names,
            settings,
            **t5,
        )

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The pipeline's own prompt embeddings (joint, pooled) of ``prompts``, a few at a time."""
        joint, pooled = [], []
        for start in range(0, len(prompts), PROMPTS_PER_CALL):
            with quiet_hub_libraries():  # (a prompt over 77 tokens is truncated with a warning, as the pipeline does)
                e, _, p, _ = self.pipeline.encode_prompt(
                    prompts[start : start + PROMPTS_PER_CALL],
                    None,
                    None,
                    device=self.device,
                    do_classifier_free_guidance=False,
                )
            joint.append(e.to(self.dtype))
            pooled.append(p.to(self.dtype))
        return torch.cat(joint), torch.cat(pooled)

    @torch.no_grad()
    def _encode_negative(self) -> tuple[Tensor, Tensor]:
        """The pipeline's negative-prompt embeddings of the empty prompt (its default negative prompt)."""
        with quiet_hub_libraries():
            _, e, _, p = self.pipeline.encode_prompt(
                [""], None, None, device=self.device, do_classifier_free_guidance=True, negative_prompt=""
            )
        return e.to(self.dtype), p.to(self.dtype)

    # ---- the pieces of a denoising step (what the shared sampler, dp_ops.engine.sampling, calls) ----
    def timestep_kwargs(self) -> dict[str, Any]:
        """``mu`` for a scheduler with dynamic shifting, as the pipeline computes it from the image's token count
        (``calculate_shift``); nothing for SD3's and SD3.5's own (a fixed shift of 3)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", None):
            return {}
        side = self.noise_shape[1] // self.transformer.config.patch_size
        mu = calculate_shift(
            side * side,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.16),
        )
        return {"mu": mu}

    def model_output(self, z_t: Tensor, t: Tensor, labels: Tensor, cfg_scale: float) -> Tensor:
        """v̂ with classifier-free guidance (one batched transformer call, the empty prompt's half first as in the
        pipeline), in float32. ``t``: the scheduler's timestep (σ·1000), broadcast to the batch."""
        n, cond, pooled = z_t.shape[0], self.cond[labels], self.pooled[labels]
        if cfg_scale == 1.0:
            x, text, pool = z_t, cond, pooled
        else:
            x = torch.cat([z_t, z_t])
            text = torch.cat([self.uncond.expand(n, -1, -1), cond])
            pool = torch.cat([self.uncond_pooled.expand(n, -1), pooled])
        v = self.transformer(
            hidden_states=x.to(self.dtype),
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=text,
            pooled_projections=pool,
            return_dict=False,
        )[0].float()
        if cfg_scale == 1.0:
            return v
        v_u, v_c = v.chunk(2)
        return v_u + cfg_scale * (v_c - v_u)


def _listed(index: Mapping[str, Any], name: str) -> bool:
    """Whether ``model_index.json`` lists a component (``[library, class]``, not ``[null, null]`` or absent)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
