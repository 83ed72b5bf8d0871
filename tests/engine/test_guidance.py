import math

import numpy as np
import torch

from dp_ops.config import LearnerConfig
from dp_ops.engine.guidance import entropy, entropy_guidance, normalise_step, predict_x0
from dp_ops.engine.learner import build_learner


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
    assert torch.allclose(predict_x0(x_t, eps, ab), x0, atol=1e-5)


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
    step = entropy_guidance(x_t, eps_fn, 0.5, learner, omega=0.02)
    with torch.no_grad():
        before = entropy(learner(predict_x0(x_t, eps_fn(x_t), 0.5)))
        after = entropy(learner(predict_x0(step.x_t, eps_fn(step.x_t), 0.5)))
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
