"""Entropy guidance: steer a diffusion sample toward what the current learner finds hard.

Notation (the paper's, Askari-Hemmat et al., ICML 2025):
    x_t        noisy sample (pixels here; a latent z_t for latent backends)
    ε̂          ε_θ(x_t, t, y), the (classifier-free guided) noise prediction
    ᾱ_t        cumulative product of the noise schedule's alphas at t
    x̂0         (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t, the DDIM estimate of the clean sample
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


def predict_x0(x_t: Tensor, eps: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """DDIM estimate of the clean sample from x_t and ε̂."""
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device)
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def normalise_step(g: Tensor, x_t: Tensor, omega: float) -> Tensor:
    """ω·‖x_t‖·g/‖g‖ per sample (norms over all non-batch dimensions)."""
    dims = tuple(range(1, g.ndim))
    g_norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * len(dims)))
    x_norm = x_t.flatten(1).norm(dim=1).view_as(g_norm)
    return omega * x_norm * g / g_norm


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
) -> GuidedStep:
    """One entropy-guided update of x_t (before the scheduler step).

    ``eps_fn`` maps x_t to ε̂ (with classifier-free guidance already applied). With ``through_eps`` the
    gradient flows through ε̂ as well as through x̂0, i.e. it is the true ∇_{x_t}; without, ε̂ is held
    constant, so g = ∇_{x̂0}H / √ᾱ_t (the same direction as ∇_{x̂0}H, which the normalised step keeps) and
    no backward pass goes through the model that gives ε̂. The returned ε̂ was computed at the *unmoved*
    x_t and is detached: the caller passes it to ``scheduler.step`` together with the moved x_t, so the
    scheduler is stepped exactly once per timestep and guidance costs one backward pass.
    """
    x = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        if through_eps:
            eps = eps_fn(x)
        else:
            with torch.no_grad():
                eps = eps_fn(x_t.detach())
        x0 = predict_x0(x, eps, alpha_bar_t)
        h = entropy(learner(to_learner(x0)))
        (g,) = torch.autograd.grad(h.sum(), x)
    moved = x_t.detach() + normalise_step(g, x_t.detach(), omega)
    return GuidedStep(x_t=moved, eps=eps.detach(), entropy=h.detach())
