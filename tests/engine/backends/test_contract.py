"""The backend contract: one suite, run over every backend of ``dp_ops.generators.BACKENDS`` with tiny random
components. Samples have the stored shape and range; a sample is the same alone or in any batch, and the same
bytes for the same batch; guidance raises the learner's entropy on average; the sampler runs with every model
on torch's ``meta`` device (like a GPU, it refuses a CPU tensor where the model runs: a timestep, a label, a
schedule table left behind fails here, without one).

A new family is one entry of :data:`FAMILIES` (its tiny components and settings); what only it does goes in its
own test file.
"""

import functools
import importlib

import numpy as np
import pytest
import torch

from dp_ops.config import GeneratorConfig, LearnerConfig
from dp_ops.engine.backends.latent import PipelineSettings
from dp_ops.engine.backends.pixel import PixelDiffusion, build_scheduler, build_unet
from dp_ops.engine.guidance import entropy
from dp_ops.engine.learner import build_learner
from dp_ops.engine.sampling import Generator, denoise
from dp_ops.engine.saved import GeneratorMeta
from dp_ops.generators import BACKENDS

META = torch.device("meta")
NAMES = ("cat", "dog", "red fox")
SIDE = 16  # the learner's side
# family -> extra PipelineSettings for its tiny components (dit: the model's own class ids for NAMES)
FAMILIES: dict[str, dict] = {"pixel": {}, "sd": {}, "sdxl": {}, "dit": {"class_ids": (1, 2, 3)}, "sd3": {}}
# (dtype, ω, gradient) on the meta device: unguided, guided through each gradient, each dtype once
ON_META = [(torch.float32, 0.0, "full"), (torch.float32, 0.1, "x0"), (torch.bfloat16, 0.1, "full")]


def test_every_backend_is_in_the_suite():
    assert set(FAMILIES) == set(BACKENDS)


@functools.cache  # (one per family, device and dtype: sampling leaves a backend as it was)
def build(family: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Generator:
    if family == "pixel":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = build_unet(GeneratorConfig(channels=(8, 16)), 8, len(NAMES))
        pixel = PixelDiffusion(unet, build_scheduler(), GeneratorMeta(8, len(NAMES), 0, "digits", 1))
        return pixel.to(device)
    module, cls = BACKENDS[family].adapter.split(":")
    parts = importlib.import_module(f"{module}_random").random_components("tiny", seed=0)
    settings = PipelineSettings(
        output_resolution=24, learner_resolution=SIDE, device=device, dtype=dtype, **FAMILIES[family]
    )
    return getattr(importlib.import_module(module), cls).from_components(parts, NAMES, settings)


def _channels(family: str) -> int:
    return 1 if family == "pixel" else 3


@functools.cache
def _learner(family: str, device: str = "cpu") -> torch.nn.Module:
    model = build_learner(LearnerConfig(model="dpops_convnet_tiny", drop_rate=0.0), len(NAMES), _channels(family), 0)
    return model.to(device).eval()


def _sample(family: str, labels, seeds, omega: float = 0.0, gradient: str = "full", batch_size: int = 8):
    generator = build(family)
    steps = 3
    return generator.sample(
        torch.as_tensor(labels),
        np.asarray(seeds),
        steps=steps,
        cfg_scale=2.0,
        learner=_learner(family),
        omega=omega,
        guide_every=1,
        gradient=gradient,
        batch_size=batch_size,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_have_the_stored_shape_range_and_cost(family):
    out = _sample(family, [0, 1, 2, 0], [5, 6, 7, 8])
    side = 8 if family == "pixel" else 24
    assert out.images.shape == (4, _channels(family), side, side) and out.images.dtype == torch.float32
    assert out.images.isfinite().all() and out.images.min() >= -1 and out.images.max() <= 1
    assert out.images.std() > 0.01  # (not a constant)
    assert out.entropy.shape == (4,) and out.entropy.isfinite().all()
    assert out.model_evals == 3 * 4 * 2  # 3 steps, two model evaluations a step with CFG


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("omega", "gradient"), [(0.0, "full"), (0.1, "x0")])
def test_a_sample_is_the_same_alone_or_in_any_batch(family, omega, gradient):
    labels, seeds = [0, 1, 2, 1, 0], [11, 12, 13, 14, 15]
    whole = _sample(family, labels, seeds, omega, gradient)
    assert torch.equal(whole.images, _sample(family, labels, seeds, omega, gradient).images)  # same bytes
    alone = _sample(family, labels[2:3], seeds[2:3], omega, gradient)
    in_twos = _sample(family, labels, seeds, omega, gradient, batch_size=2)
    assert torch.allclose(alone.images[0], whole.images[2], atol=1e-4)
    assert torch.allclose(in_twos.images, whole.images, atol=1e-4)
    assert not torch.allclose(whole.images[0], whole.images[4], atol=1e-3)  # (same class, another seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_raises_the_learners_entropy_on_average(family):
    labels, seeds = torch.arange(12) % 3, np.arange(100, 112)
    plain = _sample(family, labels, seeds, omega=0.0)
    guided = _sample(family, labels, seeds, omega=0.2)
    assert not torch.allclose(guided.images, plain.images)
    assert guided.entropy.mean() > plain.entropy.mean(), (guided.entropy.mean(), plain.entropy.mean())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("dtype", "omega", "gradient"), ON_META)
def test_the_sampler_runs_with_every_model_on_a_non_cpu_device(family, dtype, omega, gradient):
    """What ``Generator.sample`` does for one batch, up to its copy to the CPU (a meta tensor has no bytes)."""
    generator = build(family, "meta", dtype)
    if family != "pixel":
        assert {p.device for p in generator.denoiser.parameters()} == {META}
    learner = _learner(family, "meta")
    x0 = denoise(
        generator,
        torch.tensor([0, 1, 2]),
        np.array([5, 6, 7]),
        steps=3,
        cfg_scale=2.0,
        learner=learner,
        omega=omega,
        guide_every=2,
        gradient=gradient,
        precision="bfloat16" if family == "pixel" and dtype == torch.bfloat16 else "float32",
    )
    images = generator.to_images(x0).clamp(-1, 1)
    assert entropy(learner(generator.to_learner(x0))).device == META
    side = 8 if family == "pixel" else 24
    assert images.device == META and images.shape == (3, _channels(family), side, side)
    assert images.dtype == torch.float32
