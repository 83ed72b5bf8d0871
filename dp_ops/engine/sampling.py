"""What every generator backend shares: the :class:`Generator` contract the loop calls, the
:class:`Samples` it returns, the progress callback type, and the one sampler every backend runs.

Notation (the paper's, Askari-Hemmat et al., ICML 2025):
    x_t     the sample being denoised at timestep t: pixels, or a latent z_t for a latent backend
    ε̂       the model output at x_t with classifier-free guidance, ε_u + s·(ε_c − ε_u): ε, v or a flow velocity,
            as the model predicts
    s       the classifier-free guidance scale (diffusers' convention: s = 1 is the conditional model alone)
    x̂0      the estimate of the clean sample from x_t and ε̂ (:func:`dp_ops.engine.schedulers.x0_at`)
    ω       entropy-guidance strength (:mod:`dp_ops.engine.guidance`); ω = 0 samples plainly

A backend (a :class:`Generator` subclass) supplies only what differs between models: loading, conditioning,
the model output with CFG (:meth:`Generator.model_output`), the shape of its noise and the decode of x̂0.
:func:`denoise` runs the denoising loop with any scheduler of :data:`dp_ops.engine.schedulers.SCHEDULERS`
and :meth:`Generator.sample` the batches, final decode and learner entropy; so sampling, guidance and the
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
from dp_ops.engine.guidance import OUTPUT_ONLY, entropy, entropy_guidance
from dp_ops.engine.schedulers import fresh, step_kwargs, x0_at, x0_space
from dp_ops.errors import GeneratorError

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
    model_evals: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class Generator(ABC):
    """A generator backend (the table of them: :data:`dp_ops.generators.BACKENDS`). The loop calls
    :meth:`sample`; a backend supplies only the model-specific pieces :func:`denoise` needs:

    - ``scheduler``: a diffusers scheduler of :data:`~dp_ops.engine.schedulers.SCHEDULERS` holding the model's
      noise schedule (never stepped itself: each batch steps a fresh copy);
    - ``learner_resolution``: side of the learner's input (the returned images are resized to it to be scored);
    - :attr:`noise_shape`, :meth:`model_output`, :meth:`to_learner`, :meth:`to_images`, and where the scheduler
      needs more than the step count, :meth:`timestep_kwargs`.
    """

    scheduler: Any
    learner_resolution: int
    device: torch.device

    @property
    @abstractmethod
    def noise_shape(self) -> tuple[int, ...]:
        """The shape of one sample's x_T, drawn on the CPU from the sample's seed by :func:`denoise` (a sample is
        the same alone or in any batch, on any device)."""

    @abstractmethod
    def model_output(self, x_t: Tensor, t: Tensor, labels: Tensor, cfg_scale: float) -> Tensor:
        """ε̂ at x_t (already scaled by the scheduler's ``scale_model_input``), with classifier-free guidance,
        for ``labels``: the model's output as its scheduler expects it, x_t's shape, float32. ``t`` is the
        scheduler's timestep on the model's device (a 0-d tensor; the backend converts it to its model's
        convention)."""

    @abstractmethod
    def to_learner(self, x0: Tensor) -> Tensor:
        """x̂0 as the learner's input, differentiably: what entropy guidance back-propagates through."""

    @abstractmethod
    def to_images(self, x0: Tensor) -> Tensor:
        """The final x_0 as the images to return (before the final clamp to [-1, 1])."""

    def timestep_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``scheduler.set_timesteps`` beyond the step count (a flow model's ``mu``)."""
        return {}

    def evals_per_step(self, cfg_scale: float) -> int:
        """Model evaluations per sample and step: two with classifier-free guidance (s ≠ 1), else one."""
        return 1 if cfg_scale == 1.0 else 2

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
        :func:`denoise`)."""
        images, ents = [], []
        for start in range(0, len(labels), batch_size):
            sl = slice(start, start + batch_size)
            x0 = denoise(
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
        evals = steps * len(labels) * self.evals_per_step(cfg_scale)
        return Samples(torch.cat(images), labels.clone(), np.asarray(seeds), torch.cat(ents), evals)


def denoise(
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
    """The final x_0 of one batch: the backend's scheduler from seeded noise, entropy-guided at every
    ``guide_every``-th step when ω > 0. Written out step by step so that guidance can move x_t before each
    ``scheduler.step``, which is called exactly once per timestep and given the model output guidance
    differentiated; a step that draws noise draws each sample's from the generator that drew its x_T.

    ``gradient``: ``full`` differentiates H through ε̂ (the model) and x̂0, ``x0`` through the learner and x̂0
    only (ε̂ held constant: no backward through the model). ``precision``: the model calls (ε̂, the learner, the
    decode) run under :func:`~dp_ops.engine.devices.autocast`; x_t, ε̂ as stepped and the scheduler stay
    float32."""
    scheduler = fresh(backend.scheduler)
    # The scheduler's tables stay on the CPU, where its step indexes them (a device t would cost a host sync a
    # step, and the meta device could not be read at all); the model reads its timesteps on its own device,
    # copied once. The step's scalars are 0-d CPU tensors, which device arithmetic takes as numbers.
    scheduler.set_timesteps(steps, device="cpu", **backend.timestep_kwargs())
    space = x0_space(scheduler)
    if omega > 0 and gradient == "x0" and space in OUTPUT_ONLY:
        raise GeneratorError(
            f"generator.guidance_gradient='x0': the model predicts x0 itself ({space}), so x̂0 does not depend on "
            "x_t once its output is held fixed; use guidance_gradient=full"
        )
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(backend.noise_shape, generator=g) for g in generators]).to(backend.device)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # (σ_max for σ-space schedulers; a flow one has none)
    labels = labels.to(x.device)
    model_timesteps = scheduler.timesteps.to(x.device)
    scale = getattr(scheduler, "scale_model_input", lambda x_t, t: x_t)  # (a flow scheduler has none)
    extra = step_kwargs(scheduler, generators)
    for i, t in enumerate(scheduler.timesteps):

        def eps_fn(x_t: Tensor, t: Tensor = t, t_model: Tensor = model_timesteps[i]) -> Tensor:
            with autocast(x_t.device, precision):
                return backend.model_output(scale(x_t, t), t_model, labels, cfg_scale).float()

        if omega > 0 and i % guide_every == 0:
            with autocast(x.device, precision):  # (the learner and the decode of x̂0)
                step = entropy_guidance(
                    x,
                    eps_fn,
                    x0_at(scheduler, i, t),
                    learner,
                    omega,
                    backend.to_learner,
                    through_eps=gradient == "full",
                )
            x, eps = step.x_t, step.eps  # x_t moved up the entropy gradient; ε̂ from before the move
        else:
            with torch.no_grad():
                eps = eps_fn(x)
        x = scheduler.step(eps, t, x, **extra).prev_sample  # exactly once per timestep, guided or not
    return x
