"""Entropy guidance: steer a diffusion sample toward what the current learner finds hard.

Notation (the paper's, Askari-Hemmat et al., ICML 2025):
    x_t        noisy sample (pixels here; a latent z_t for latent backends)
    ε̂          the (classifier-free guided) model output at x_t: the noise ε for an ε-prediction model,
               v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 for a v-prediction one, x0 itself for sample prediction, the velocity
               ε − x0 for a flow-matching one
    ᾱ_t, σ     the noise schedule at t: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (VP), x0 + σ·ε (σ-space, Euler),
               (1−σ)·x0 + σ·ε (flow)
    x̂0         the estimate of the clean sample from x_t and ε̂, for the model's parameterisation (:data:`X0`;
               ε, VP: (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t; flow: x_t − σ·ε̂)
    f_φ        the learner; H(p) = −Σ_y p_y log p_y the entropy of its softmax
    ω          guidance strength

At a guided step the sample moves *up* the entropy gradient g = ∇_{x_t} H(f_φ(x̂0(x_t))) (the paper's
printed Eq. 7 has the sign backwards for its stated intent), with the step normalised per sample,
ω·‖x_t‖·g/‖g‖, so that ω is scale-free (as in the authors' released code for their earlier work).
The backend only supplies ``to_learner``: how x̂0 becomes an image the learner can read (identity for
the pixel model, VAE decoding for a latent model); the sampler that calls this is
:func:`dp_ops.engine.sampling.denoise`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy (nats) of softmax(logits); ``log K`` for a uniform prediction over K classes."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


@dataclass(frozen=True)
class StepScalars:
    """The schedule's values at one step that x̂0 needs (0-d tensors or floats): ᾱ_t, σ, and the consistency
    boundary's c_skip and c_out (:mod:`dp_ops.engine.schedulers` reads them off a scheduler)."""

    alpha_bar: Tensor | float = 1.0
    sigma: Tensor | float = 0.0
    c_skip: Tensor | float = 0.0
    c_out: Tensor | float = 1.0


def _vp(prediction: str) -> Callable[[Tensor, Tensor, StepScalars], Tensor]:
    """x̂0 for x_t = √ᾱ·x0 + √(1−ᾱ)·ε: ε: (x_t − √(1−ᾱ)·ε̂)/√ᾱ; v: √ᾱ·x_t − √(1−ᾱ)·v̂; sample: the output."""

    def x0(x_t: Tensor, out: Tensor, c: StepScalars) -> Tensor:
        alpha_bar = torch.as_tensor(c.alpha_bar, dtype=x_t.dtype)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if prediction == "epsilon":
            return (x_t - s * out) / a
        return a * x_t - s * out if prediction == "v_prediction" else out

    return x0


def _karras_v(x_t: Tensor, out: Tensor, c: StepScalars) -> Tensor:
    sigma = torch.as_tensor(c.sigma, dtype=x_t.dtype)
    return out * (-sigma / (sigma**2 + 1) ** 0.5) + x_t / (sigma**2 + 1)


def _lcm(prediction: str) -> Callable[[Tensor, Tensor, StepScalars], Tensor]:
    vp = _vp(prediction)
    return lambda x_t, out, c: c.c_out * vp(x_t, out, c) + c.c_skip * x_t


# x̂0 from (x_t, model output, the step's scalars), keyed "<space>:<prediction_type>" (what
# dp_ops.engine.schedulers.x0_space names for a scheduler; the same as its own step's pred_original_sample).
X0: dict[str, Callable[[Tensor, Tensor, StepScalars], Tensor]] = {
    **{f"vp:{p}": _vp(p) for p in ("epsilon", "v_prediction", "sample")},
    "karras:epsilon": lambda x_t, out, c: x_t - c.sigma * out,  # x_t = x0 + σ·ε
    "karras:v_prediction": _karras_v,
    "karras:sample": lambda x_t, out, c: out,
    "flow:flow_prediction": lambda x_t, out, c: x_t - c.sigma * out,  # x_t = (1−σ)·x0 + σ·ε, v = ε − x0
    **{f"lcm:{p}": _lcm(p) for p in ("epsilon", "v_prediction", "sample")},
}
# Parameterisations where x̂0 does not depend on x_t once the output is held fixed: guidance_gradient=x0 gets no
# gradient there (only through the model).
OUTPUT_ONLY = frozenset({"vp:sample", "karras:sample"})


def predict_x0(x_t: Tensor, out: Tensor, space: str = "vp:epsilon", scalars: StepScalars | None = None) -> Tensor:
    """The estimate of the clean sample from x_t and the model output, for the parameterisation ``space`` (a key of
    :data:`X0`); what the scheduler's own ``step(...).pred_original_sample`` computes."""
    return X0[space](x_t, out, scalars or StepScalars())


def normalise_step(g: Tensor, x_t: Tensor, omega: float) -> Tensor:
    """ω·‖x_t‖·g/‖g‖ per sample (norms over all non-batch dimensions)."""
    dims = tuple(range(1, g.ndim))
    g_norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * len(dims)))
    x_norm = x_t.flatten(1).norm(dim=1).view_as(g_norm)
    return omega * x_norm * g / g_norm


# 2¹², as a loss scaler would: back-propagated through float16 weights (a VAE decoder, a UNet), the entropy gradient
# of a confident learner (∂H/∂logit is tiny) underflows below float16's smallest normal, 6.1e-5, and points
# elsewhere; ∂H/∂logit is at most about ln K, so 2¹² times it stays far below float16's largest value, 65,504.
GRAD_SCALE = 2.0**12


@dataclass(frozen=True)
class GuidedStep:
    """Result of one guided step: the moved sample, the ε̂ the scheduler steps with, H on x̂0."""

    x_t: Tensor
    eps: Tensor
    entropy: Tensor


def entropy_guidance(
    x_t: Tensor,
    eps_fn: Callable[[Tensor], Tensor],
    x0_of: Callable[[Tensor, Tensor], Tensor],
    learner: Callable[[Tensor], Tensor],
    omega: float,
    to_learner: Callable[[Tensor], Tensor] = lambda x0: x0,
    *,
    through_eps: bool = True,
) -> GuidedStep:
    """One entropy-guided update of x_t (before the scheduler step).

    ``eps_fn`` maps x_t to the model output ε̂ (with classifier-free guidance already applied), ``x0_of``
    (x_t, ε̂) to x̂0 for the scheduler's parameterisation at this step (:func:`predict_x0`). With ``through_eps``
    the gradient flows through ε̂ as well as through x̂0, i.e. it is the true ∇_{x_t}; without, ε̂ is held
    constant, so g = c·∇_{x̂0}H with c = ∂x̂0/∂x_t > 0 (1/√ᾱ_t for ε, 1 for σ-space and flow: the same direction
    as ∇_{x̂0}H, which the normalised step keeps) and no backward pass goes through the model that gives ε̂.
    The returned ε̂ was computed at the *unmoved* x_t and is detached: the caller passes it to ``scheduler.step``
    together with the moved x_t, so the scheduler is stepped exactly once per timestep and guidance costs one
    backward pass.

    H is scaled by :data:`GRAD_SCALE` before the backward pass (as a loss scaler does), so that a gradient
    through float16 weights (a VAE decoder, a UNet) does not underflow to zero; the step is normalised, so
    the scale changes nothing else (a power of two: float32 and bfloat16 results are bit for bit the same).
    """
    x = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        if through_eps:
            eps = eps_fn(x)
        else:
            with torch.no_grad():
                eps = eps_fn(x_t.detach())
        x0 = x0_of(x, eps)
        h = entropy(learner(to_learner(x0)))
        (g,) = torch.autograd.grad(h.sum() * GRAD_SCALE, x)
    moved = x_t.detach() + normalise_step(g, x_t.detach(), omega)
    return GuidedStep(x_t=moved, eps=eps.detach(), entropy=h.detach())
