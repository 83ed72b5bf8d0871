import copy
import math

import numpy as np
import torch
from diffusers import DDIMScheduler

from dp_ops.config import LearnerConfig
from dp_ops.engine import guidance
from dp_ops.engine.backends.latent import PipelineSettings
from dp_ops.engine.backends.sd import StableDiffusion
from dp_ops.engine.backends.sd_random import random_components
from dp_ops.engine.guidance import StepScalars, entropy, entropy_guidance, normalise_step, predict_x0
from dp_ops.engine.learner import build_learner
from dp_ops.engine.sampling import denoise
from dp_ops.engine.schedulers import x0_at


def _vp_eps(alpha_bar):
    """x̂0 of an ε-prediction model at ᾱ_t = ``alpha_bar``."""
    return lambda x_t, out: predict_x0(x_t, out, "vp:epsilon", StepScalars(alpha_bar=alpha_bar))


def test_entropy_of_uniform_softmax_is_log_k():
    for k in (2, 10, 100):
        assert torch.allclose(entropy(torch.zeros(3, k)), torch.full((3,), math.log(k)), atol=1e-6)


def test_entropy_of_confident_prediction_is_near_zero():
    logits = torch.tensor([[50.0, 0.0, 0.0]])
    assert float(entropy(logits)) < 1e-6


def test_predict_x0_inverts_the_forward_noising():
    x0, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    ab = torch.tensor(0.3)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert torch.allclose(predict_x0(x_t, eps, "vp:epsilon", StepScalars(alpha_bar=ab)), x0, atol=1e-5)


def test_guidance_decodes_the_x0_of_the_models_parameterisation(tiny_generator, tiny_cfg):
    """A v-prediction model is guided through its own x̂0, the one its scheduler steps towards."""
    v_model = copy.copy(tiny_generator)
    v_model.scheduler = DDIMScheduler.from_config(tiny_generator.scheduler.config, prediction_type="v_prediction")
    seen: list[torch.Tensor] = []
    v_model.to_learner = lambda x0: seen.append(x0.detach()) or x0  # type: ignore[method-assign]
    learner = build_learner(tiny_cfg.learner, 10, 1, seed=3).eval()
    labels, seeds = torch.arange(4), np.arange(4)
    denoise(v_model, labels, seeds, steps=3, cfg_scale=2.0, learner=learner, omega=0.1, gradient="x0")
    scheduler = DDIMScheduler.from_config(v_model.scheduler.config, clip_sample=False)
    scheduler.set_timesteps(3)
    t = scheduler.timesteps[0]
    x = torch.stack([torch.randn(v_model.noise_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    with torch.no_grad():
        out = v_model.model_output(x, t, labels, 2.0)
    assert torch.allclose(seen[0], scheduler.step(out, t, x).pred_original_sample, atol=1e-5)


def test_float16_guidance_points_where_float32_guidance_does():
    """Through float16 weights the entropy gradient underflows unless it is scaled before the backward pass
    (a confident learner: ∂H/∂logits is tiny); the scaled float16 step points where the float32 one does."""
    names = ("cat", "dog", "red fox")
    base = build_learner(LearnerConfig(drop_rate=0.0), 3, 3, seed=0).eval()
    confident = lambda images: 100 * base(images)
    z, labels, t = None, torch.tensor([0, 1, 2, 0]), torch.tensor(500)
    steps = []
    for dtype in (torch.float32, torch.float16):
        c = random_components("tiny", seed=0)
        settings = PipelineSettings(output_resolution=16, learner_resolution=16, dtype=dtype)
        sd = StableDiffusion.from_components(c, names, settings)
        z = torch.randn(4, *sd.noise_shape, generator=torch.Generator().manual_seed(0)) if z is None else z
        eps_fn = lambda x, sd=sd: sd.model_output(x, t, labels, 2.0)
        sd.scheduler.set_timesteps(10)
        x0_of = x0_at(sd.scheduler, 5, t)
        step = entropy_guidance(z, eps_fn, x0_of, confident, 0.05, sd.to_learner)
        steps.append((step.x_t - z).flatten(1))
    cos = torch.nn.functional.cosine_similarity(*steps)
    assert steps[1].norm(dim=1).min() > 0
    assert cos.mean() > 0.99 and cos.min() > 0.98, cos


def test_the_gradient_scale_is_exact_in_float32(monkeypatch):
    learner = build_learner(LearnerConfig(model="dpops_convnet_tiny", drop_rate=0.0), 10, 1, seed=0).eval()
    x_t = torch.randn(4, 1, 8, 8)
    x0_of = _vp_eps(0.5)
    scaled = entropy_guidance(x_t, torch.tanh, x0_of, learner, omega=0.05)
    monkeypatch.setattr(guidance, "GRAD_SCALE", 1.0)
    assert torch.equal(scaled.x_t, entropy_guidance(x_t, torch.tanh, x0_of, learner, omega=0.05).x_t)


def test_step_is_omega_times_norm_of_x_per_sample():
    g = torch.randn(5, 1, 8, 8) * torch.arange(1, 6).view(5, 1, 1, 1)
    x = torch.randn(5, 1, 8, 8) * 3
    step = normalise_step(g, x, 0.05)
    assert torch.allclose(step.flatten(1).norm(dim=1), 0.05 * x.flatten(1).norm(dim=1), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(step.flatten(1), g.flatten(1))
    assert torch.allclose(cos, torch.ones(5), atol=1e-5)


def test_guided_step_moves_up_the_entropy_gradient():
    learner = build_learner(LearnerConfig(model="dpops_convnet_tiny", drop_rate=0.0), 10, 1, seed=0).eval()
    x_t = torch.randn(16, 1, 8, 8)
    eps_fn = lambda x: 0.5 * x  # a smooth stand-in for ε_θ(x_t, t, y)
    step = entropy_guidance(x_t, eps_fn, _vp_eps(0.5), learner, omega=0.02)
    with torch.no_grad():
        before = entropy(learner(_vp_eps(0.5)(x_t, eps_fn(x_t))))
        after = entropy(learner(_vp_eps(0.5)(step.x_t, eps_fn(step.x_t))))
    assert torch.allclose(step.entropy, before, atol=1e-5)
    assert (after > before).float().mean() > 0.9  # a small step along +∇H raises H


def test_guidance_raises_learner_entropy_of_samples(tiny_generator, tiny_cfg):
    learner = build_learner(tiny_cfg.learner, 10, 1, seed=3).eval()
    labels = torch.arange(64) % 10
    seeds = np.arange(64)
    common = dict(steps=4, cfg_scale=2.0, learner=learner, guide_every=1)
    plain = tiny_generator.sample(labels, seeds, omega=0.0, **common)
    guided = tiny_generator.sample(labels, seeds, omega=0.1, **common)
    assert guided.entropy.mean() > plain.entropy.mean() + 0.01
    assert not torch.allclose(guided.images, plain.images)


def test_x0_gradient_holds_eps_constant_and_follows_the_learner_through_x0():
    learner = build_learner(LearnerConfig(model="dpops_convnet_tiny", drop_rate=0.0), 10, 1, seed=0).eval()
    x_t, ab = torch.randn(8, 1, 8, 8), torch.tensor(0.5)
    calls: list[bool] = []

    def eps_fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return torch.tanh(x)  # (non-linear: the full gradient through ε̂ points elsewhere)

    step = entropy_guidance(x_t, eps_fn, _vp_eps(ab), learner, omega=0.02, through_eps=False)
    assert calls == [False]  # ε̂ evaluated once, outside autograd: no backward through the model
    x0 = _vp_eps(ab)(x_t, torch.tanh(x_t)).requires_grad_(True)
    (g,) = torch.autograd.grad(entropy(learner(x0)).sum(), x0)
    assert torch.allclose(step.x_t - x_t, normalise_step(g, x_t, 0.02), atol=1e-5)  # ∝ ∇_{x̂0}H, per sample
    full = entropy_guidance(x_t, torch.tanh, _vp_eps(ab), learner, omega=0.02)
    assert torch.equal(step.eps, full.eps)  # the same ε̂ is stepped with
    assert not torch.allclose(step.x_t, full.x_t)  # (the full gradient also flows through ε̂)


def test_bfloat16_sampling_is_reproducible_and_close_to_float32(tiny_generator, tiny_cfg):
    learner = build_learner(tiny_cfg.learner, 10, 1, seed=3).eval()
    labels, seeds = torch.arange(32) % 10, np.arange(32)
    common = dict(steps=3, cfg_scale=2.0, learner=learner, guide_every=1, omega=0.05)
    bf16 = [tiny_generator.sample(labels, seeds, precision="bfloat16", **common) for _ in range(2)]
    fp32 = tiny_generator.sample(labels, seeds, **common)
    assert torch.equal(bf16[0].images, bf16[1].images)  # same seed, same machine, same result
    assert bf16[0].images.dtype == torch.float32
    assert not torch.equal(bf16[0].images, fp32.images)  # (bfloat16 really ran)
    assert (bf16[0].images - fp32.images).abs().mean() < 0.05
