"""Entropy guidance: steer a diffusion sample toward what the current learner finds hard.

Notation (the paper's, Askari-Hemmat et al., ICML 2025):
    x_t        noisy sample (pixels here; a latent z_t for latent backends)
    ε̂          ε_θ(x_t, t, y), the (classifier-free guided) model output: the noise ε for an ε-prediction
               model, v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 for a v-prediction one, x0 itself for sample prediction
    ᾱ_t        cumulative product of the noise schedule's alphas at t (x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε)
    x̂0         the estimate of the clean sample from x_t and ε̂, for the model's parameterisation
               (ε: (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t; v: √ᾱ_t·x_t − √(1−ᾱ_t)·ε̂; sample: ε̂)
    f_φ        the learner; H(p) = −Σ_y p_y log p_y the entropy of its softmax
    ω          guidance strength

At a guided step the sample moves *up* the entropy gradient g = ∇_{x_t} H(f_φ(x̂0(x_t))) (the paper's
printed Eq. 7 has the sign backwards for its stated intent), with the step normalised per sample,
ω·‖x_t‖·g/‖g‖, so that ω is scale-free (as in the authors' released code for their earlier work).
The backend only supplies ``to_learner``: how x̂0 becomes an image the learner can read (identity for
the pixel model, VAE decoding for a latent model); the sampler that calls this is
:func:`dp_ops.engine.sampling.ddim`.
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


# x̂0 from (x_t, model output, √ᾱ_t, √(1−ᾱ_t)) for each ``prediction_type`` a diffusers scheduler config names.
X0: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "epsilon": lambda x_t, out, a, s: (x_t - s * out) / a,
    "v_prediction": lambda x_t, out, a, s: a * x_t - s * out,
    "sample": lambda x_t, out, a, s: out,
}


def predict_x0(x_t: Tensor, eps: Tensor, alpha_bar_t: Tensor | float, prediction_type: str = "epsilon") -> Tensor:
    """The estimate of the clean sample from x_t and the model output ε̂, for ``prediction_type`` (a key of
    :data:`X0`; what the scheduler's own ``step(...).pred_original_sample`` computes). ᾱ_t stays a 0-d CPU
    tensor: it enters device arithmetic as a scalar, with no copy to the device."""
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype)
    return X0[prediction_type](x_t, eps, alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt())


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
    alpha_bar_t: Tensor | float,
    learner: Callable[[Tensor], Tensor],
    omega: float,
    to_learner: Callable[[Tensor], Tensor] = lambda x0: x0,
    *,
    through_eps: bool = True,
    prediction_type: str = "epsilon",
) -> GuidedStep:
    """One entropy-guided update of x_t (before the scheduler step).

    ``eps_fn`` maps x_t to ε̂ (with classifier-free guidance already applied). With ``through_eps`` the
    gradient flows through ε̂ as well as through x̂0, i.e. it is the true ∇_{x_t}; without, ε̂ is held
    constant, so g = ∇_{x̂0}H / √ᾱ_t (the same direction as ∇_{x̂0}H, which the normalised step keeps) and
    no backward pass goes through the model that gives ε̂. The returned ε̂ was computed at the *unmoved*
    x_t and is detached: the caller passes it to ``scheduler.step`` together with the moved x_t, so the
    scheduler is stepped exactly once per timestep and guidance costs one backward pass.

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
        x0 = predict_x0(x, eps, alpha_bar_t, prediction_type)
        h = entropy(learner(to_learner(x0)))
        (g,) = torch.autograd.grad(h.sum() * GRAD_SCALE, x)
    moved = x_t.detach() + normalise_step(g, x_t.detach(), omega)
    return GuidedStep(x_t=moved, eps=eps.detach(), entropy=h.detach())
