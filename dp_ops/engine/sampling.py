"""What every generator backend shares: the :class:`Generator` contract the loop calls, the
:class:`Samples` it returns, the progress callback type, and the one DDIM sampler both backends run.

Notation (the paper's, Askari-Hemmat et al., ICML 2025):
    x_t     the sample being denoised at timestep t: pixels, or a latent z_t for a latent backend
    ε̂       ε_θ(x_t, t, y) with classifier-free guidance, ε_u + s·(ε_c − ε_u)
    s       the classifier-free guidance scale (diffusers' convention: s = 1 is the conditional model alone)
    ᾱ_t     cumulative product of the noise schedule's alphas at t
    x̂0      the DDIM estimate of the clean sample from x_t and ε̂
    ω       entropy-guidance strength (:mod:`dp_ops.engine.guidance`); ω = 0 samples plainly

A backend (a :class:`Generator` subclass) supplies only what differs between models: its noise schedule, its ε̂, its
initial noise and its decoding of x̂0. :func:`ddim` runs the denoising loop (DDIM, η = 0) and
:meth:`Generator.sample` the batches, final decode and learner entropy; so sampling, guidance and the
cost count are the same code for every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dp_ops.engine.data import resize
from dp_ops.engine.devices import autocast
from dp_ops.engine.guidance import entropy, entropy_guidance

Tensor = torch.Tensor
Progress = Callable[[int, int], None]  # (completed, total)
Learner = Callable[[Tensor], Tensor]  # images in [-1, 1] at the learner's input size -> logits


@dataclass(frozen=True)
class Samples:
    """Generated images in [-1, 1] with their labels, per-sample seeds and learner entropy (nats)."""

    images: torch.Tensor
    labels: torch.Tensor
    seeds: np.ndarray
    entropy: torch.Tensor
    unet_evals: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class Generator(ABC):
    """A generator backend (``pixel``: :class:`~dp_ops.engine.backends.pixel.PixelDiffusion`, ``sd``:
    :class:`~dp_ops.engine.backends.sd.StableDiffusion`). The loop calls :meth:`sample`; a backend supplies
    only the model-specific pieces :func:`ddim` needs: its noise, its ε̂ and its decodes, plus

    - ``scheduler``: a diffusers DDIM scheduler holding the model's noise schedule (never stepped itself);
    - ``learner_resolution``: side of the learner's input (the returned images are resized to it to be scored).
    """

    scheduler: Any
    learner_resolution: int

    @abstractmethod
    def noise(self, seeds: np.ndarray) -> Tensor:
        """x_T on the model's device (use :func:`seeded_noise`)."""

    @abstractmethod
    def eps(self, x_t: Tensor, t: Tensor, labels: Tensor, cfg_scale: float) -> Tensor:
        """ε̂ at x_t (already scaled by the scheduler's ``scale_model_input``) for ``labels``."""

    @abstractmethod
    def to_learner(self, x0: Tensor) -> Tensor:
        """x̂0 as the learner's input, differentiably: what entropy guidance back-propagates through."""

    @abstractmethod
    def to_images(self, x0: Tensor) -> Tensor:
        """The final x_0 as the images to return (before the final clamp to [-1, 1])."""

    def sample(
        self,
        labels: Tensor,
        seeds: np.ndarray,
        *,
        steps: int,
        cfg_scale: float,
        learner: Learner,
        omega: float = 0.0,
        guide_every: int = 1,
        gradient: str = "full",
        precision: str = "float32",
        batch_size: int = 256,
        progress: Progress | None = None,
    ) -> Samples:
        """One image per label from per-sample seeds, on the CPU, in [-1, 1]. Sample i starts from the same
        noise alone or in any batch; its bytes are the same for the same batches on the same machine (on a GPU
        only with ``deterministic``), while another batch shape may round differently (rounds are therefore
        generated in fixed batches: :mod:`dp_ops.engine.rounds`). ``learner`` (images in [-1, 1] at its input
        size -> logits) steers guided steps (ω > 0) and scores the entropy of the returned images either way.
        ``gradient`` and ``precision``: ``generator.guidance_gradient`` and ``generator.precision`` (see
        :func:`ddim`)."""
        images, ents = [], []
        for start in range(0, len(labels), batch_size):
            sl = slice(start, start + batch_size)
            x0 = ddim(
                self,
                labels[sl],
                seeds[sl],
                steps=steps,
                cfg_scale=cfg_scale,
                learner=learner,
                omega=omega,
                guide_every=guide_every,
                gradient=gradient,
                precision=precision,
            )
            with torch.no_grad():
                x = self.to_images(x0).clamp(-1, 1)
                ents.append(entropy(learner(resize(x, self.learner_resolution))).cpu())  # (learner may be elsewhere)
            images.append(x.cpu())
            if progress:
                progress(min(start + batch_size, len(labels)), len(labels))
        evals = unet_evals(len(labels), steps, cfg_scale)
        return Samples(torch.cat(images), labels.clone(), np.asarray(seeds), torch.cat(ents), evals)


def seeded_noise(seeds: np.ndarray, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
    """Standard normal noise of ``shape`` per seed, drawn on the CPU with one ``torch.Generator`` per seed,
    so that a sample is the same alone or in any batch, on any device."""
    x = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(x).to(device)


def unet_evals(n: int, steps: int, cfg_scale: float) -> int:
    """UNet forward passes for ``n`` samples: one per step, two with classifier-free guidance (s ≠ 1).
    Guided steps reuse the ε̂ they differentiate, so guidance adds backward passes, not evaluations."""
    return steps * n * (1 if cfg_scale == 1.0 else 2)


def ddim(
    backend: Generator,
    labels: Tensor,
    seeds: np.ndarray,
    *,
    steps: int,
    cfg_scale: float,
    learner: Learner,
    omega: float = 0.0,
    guide_every: int = 1,
    gradient: str = "full",
    precision: str = "float32",
) -> Tensor:
    """The final x_0 of one batch: DDIM (η = 0) from seeded noise, entropy-guided at every ``guide_every``-th
    step when ω > 0. Written out step by step so that guidance can move x_t before each ``scheduler.step``.

    ``gradient``: ``full`` differentiates H through ε̂ (the UNet) and x̂0, ``x0`` through the learner and x̂0
    only (ε̂ held constant: no UNet backward). ``precision``: the model calls (ε̂, the learner, the decode)
    run under :func:`~dp_ops.engine.devices.autocast`; x_t, ε̂ as stepped and the scheduler stay float32."""
    scheduler = type(backend.scheduler).from_config(backend.scheduler.config)  # a private copy: set_timesteps mutates
    scheduler.set_timesteps(steps)
    x = backend.noise(seeds) * scheduler.init_noise_sigma
    labels = labels.to(x.device)
    # The model reads t on its own device (copied once, not once a step); the scheduler keeps its CPU copy, with
    # which its step indexes its CPU tables (a device t would cost a host sync a step, and the meta device none).
    model_timesteps = scheduler.timesteps.to(x.device)
    x0_of = scheduler.config.get("prediction_type", "epsilon")
    for i, t in enumerate(scheduler.timesteps):

        def eps_fn(x_t: Tensor, t: Tensor = t, t_model: Tensor = model_timesteps[i]) -> Tensor:
            with autocast(x_t.device, precision):
                return backend.eps(scheduler.scale_model_input(x_t, t), t_model, labels, cfg_scale).float()

        if omega > 0 and i % guide_every == 0:
            with autocast(x.device, precision):  # (the learner and the decode of x̂0)
                step = entropy_guidance(
                    x,
                    eps_fn,
                    scheduler.alphas_cumprod[t],
                    learner,
                    omega,
                    backend.to_learner,
                    through_eps=gradient == "full",
                    prediction_type=x0_of,
                )
            x, eps = step.x_t, step.eps  # x_t moved up the entropy gradient; ε̂ from before the move
        else:
            with torch.no_grad():
                eps = eps_fn(x)
        x = scheduler.step(eps, t, x).prev_sample  # exactly once per timestep, guided or not
    return x
