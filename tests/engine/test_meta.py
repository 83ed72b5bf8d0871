"""The device tier: every backend's sampler and the learner with every model on torch's ``meta`` device.

``meta`` tensors have shapes and dtypes but no data, and like CUDA tensors they refuse to mix with CPU
tensors in an op (0-d CPU scalars excepted). A CPU tensor left where a model runs (timesteps, labels,
noise, a schedule table) fails here as it would on the first GPU, in milliseconds and without one.
What a meta run cannot check is numbers: values, determinism and speed need a real device
(``bench/gpu_check.py``).
"""

import functools

import numpy as np
import pytest
import torch

from dp_ops.config import GeneratorConfig, LearnerConfig, TrainConfig
from dp_ops.engine.backends.pixel import PixelDiffusion, build_scheduler, build_unet
from dp_ops.engine.backends.sd import SDSettings, StableDiffusion
from dp_ops.engine.backends.sd_random import random_components
from dp_ops.engine.guidance import entropy
from dp_ops.engine.learner import Trainer, build_learner
from dp_ops.engine.sampling import Generator, ddim
from dp_ops.engine.saved import GeneratorMeta

META = torch.device("meta")
NAMES = ("cat", "dog", "red fox")
GUIDED = [(0.0, "full"), (0.1, "full"), (0.1, "x0")]  # unguided, and guided with either gradient


def _pixel() -> PixelDiffusion:
    unet = build_unet(GeneratorConfig(channels=(8, 16)), 8, len(NAMES))
    return PixelDiffusion(unet, build_scheduler(), GeneratorMeta(8, len(NAMES), 0, "digits", 1)).to(META)


@functools.cache  # (one per dtype: sampling leaves a backend as it was, and building one takes most of a test)
def _sd(dtype: torch.dtype) -> StableDiffusion:
    c = random_components("tiny", seed=0)
    settings = SDSettings(output_resolution=24, learner_resolution=16, device="meta", dtype=dtype)
    return StableDiffusion.from_components(c, NAMES, settings)


def _learner(in_chans: int) -> torch.nn.Module:
    return build_learner(LearnerConfig(model="dpops_convnet_tiny"), len(NAMES), in_chans, seed=0).to(META).eval()


def _sample_on_meta(backend: Generator, in_chans: int, omega: float, gradient: str, precision: str) -> torch.Tensor:
    """What ``Generator.sample`` does for one batch, up to its copy to the CPU (a meta tensor has no bytes)."""
    learner = _learner(in_chans)
    x0 = ddim(
        backend,
        torch.tensor([0, 1, 2]),
        np.array([5, 6, 7]),
        steps=3,
        cfg_scale=2.0,
        learner=learner,
        omega=omega,
        guide_every=2,
        gradient=gradient,
        precision=precision,
    )
    images = backend.to_images(x0).clamp(-1, 1)
    assert entropy(learner(backend.to_learner(x0))).device == META
    return images


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize(("omega", "gradient"), GUIDED)
def test_pixel_sampler_runs_on_a_non_cpu_device(precision, omega, gradient):
    images = _sample_on_meta(_pixel(), 1, omega, gradient, precision)
    assert images.device == META and images.shape == (3, 1, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("omega", "gradient"), GUIDED)
def test_sd_sampler_runs_on_a_non_cpu_device(dtype, omega, gradient):
    sd = _sd(dtype)
    assert {p.device for p in sd.unet.parameters()} == {META}
    images = _sample_on_meta(sd, 3, omega, gradient, "float32")
    assert images.device == META and images.shape == (3, 3, 24, 24) and images.dtype == torch.float32


@pytest.mark.parametrize(
    "recipe",
    # (not train.ema_decay: timm's ModelEmaV3 makes a torch.Generator on the weights' device, which meta has not)
    [{}, {"augment": "crop_flip", "mixup": 0.5, "cutmix": 1.0, "precision": "float32"}],
    ids=["default", "paper-extras"],
)
def test_learner_trains_and_evaluates_on_a_non_cpu_device(real, recipe):
    """The training step as :meth:`Trainer.train` runs it up to its one read of the device, at the end, and
    the evaluation of a chunk of real images as :meth:`Trainer.logits` runs it up to its copy to the CPU."""
    cfg = TrainConfig(iterations=10, eval_every=5, batch_size=8, **recipe)
    model = build_learner(LearnerConfig(model="dpops_convnet_tiny"), real.num_classes, 1, seed=0)
    trainer = Trainer(model, cfg, seed=0, input_size=6, device=META)
    total, bad_t, bad_loss = trainer._steps(real.val, 2)
    assert trainer.iteration == 2 and {total.device, bad_t.device, bad_loss.device} == {META}
    assert {p.device for p in trainer.model.parameters()} == {META}
    logits = trainer._chunk_logits(real.val.images[:5])
    assert logits.device == META and logits.shape == (5, real.num_classes)
