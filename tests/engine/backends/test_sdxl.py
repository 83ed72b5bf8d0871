"""The SDXL adapter on tiny random SDXL components built in code (diffusers' own test shapes: two CLIP text
encoders, a UNet with text_time conditioning), saved with save_pretrained and loaded back; all on the CPU."""

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from dp_ops.config import load_config
from dp_ops.engine import sampling
from dp_ops.engine.backends.latent import PipelineSettings
from dp_ops.engine.backends.sdxl import StableDiffusionXL
from dp_ops.engine.backends.sdxl_random import random_components, save_pipeline
from dp_ops.errors import GeneratorError

NAMES = ("cat", "dog", "red fox")
SETTINGS = PipelineSettings(output_resolution=24, learner_resolution=16)


def _learner() -> torch.nn.Module:
    """A fixed random convnet over 16² images (its entropy has a gradient; no training needed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, len(NAMES)),
        )
    return net.eval().requires_grad_(False)


LEARNER = _learner()


@pytest.fixture(scope="module")
def parts():
    return random_components("tiny", seed=0)


@pytest.fixture(scope="module")
def sdxl(parts):
    return StableDiffusionXL.from_components(parts, NAMES, SETTINGS)


@pytest.fixture
def unet_calls():
    """Collect the batch size of every UNet call of a generator: ``seen = unet_calls(gen)``."""
    hooks = []

    def watch(gen):
        seen = []
        hooks.append(gen.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0])))
        return seen

    yield watch
    for hook in hooks:
        hook.remove()


def _turbo(parts, **settings):
    """SDXL-Turbo's own scheduler: EulerAncestral with trailing timestep spacing (steps start at t = 999)."""
    own = EulerAncestralDiscreteScheduler.from_config(parts["scheduler"].config, timestep_spacing="trailing")
    return StableDiffusionXL.from_components({**parts, "scheduler": own}, NAMES, PipelineSettings(**settings))


def _spy_guidance(monkeypatch):
    calls = []
    real = sampling.entropy_guidance

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "entropy_guidance", spy)
    return calls


def test_conditioning_comes_from_the_pipelines_own_code(sdxl, parts):
    assert sdxl.resolution == 32 and sdxl.noise_shape == (4, 16, 16)  # the model's own size, VAE factor 2
    assert sdxl.cond.shape == (3, 77, 16 + 24) and sdxl.pooled.shape == (3, 20)  # both encoders; the projection
    assert not torch.allclose(sdxl.cond[0], sdxl.cond[2]) and not torch.allclose(sdxl.pooled[0], sdxl.pooled[2])
    assert sdxl.uncond.shape == (1, 77, 40) and not sdxl.uncond.any() and not sdxl.uncond_pooled.any()  # zeros
    assert sdxl.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]  # original size, crop top-left, target size
    empty = StableDiffusionXL.from_components({**parts, "force_zeros_for_empty_prompt": False}, NAMES, SETTINGS)
    assert empty.uncond.abs().sum() > 0 and torch.equal(empty.cond, sdxl.cond)  # the empty prompt's encoding
    templated = StableDiffusionXL.from_components(parts, NAMES, PipelineSettings(prompt="a photo of a {name}"))
    assert templated.prompts[2] == "a photo of a red fox" and not torch.allclose(templated.cond, sdxl.cond)
    with pytest.raises(GeneratorError, match=r"generator\.resolution=18: must be a multiple of 4"):
        StableDiffusionXL.from_components(parts, NAMES, PipelineSettings(resolution=18))
    wide = StableDiffusionXL.from_components(parts, NAMES, PipelineSettings(resolution=48))
    assert wide.time_ids.tolist() == [[48, 48, 0, 0, 48, 48]] and wide.noise_shape == (4, 24, 24)


def test_sampling_is_per_sample_reproducible_and_counts_cfg_evaluations(sdxl, unet_calls):
    labels, seeds = torch.tensor([0, 1, 2, 0]), np.array([11, 12, 13, 14])
    seen = unet_calls(sdxl)
    out = sdxl.sample(labels, seeds, steps=3, cfg_scale=5.0, learner=LEARNER)
    assert out.images.shape == (4, 3, 24, 24) and out.images.min() >= -1 and out.images.max() <= 1
    assert out.images.std() > 0.01 and out.entropy.shape == (4,)
    assert out.model_evals == 3 * 4 * 2 == sum(seen)  # CFG: both halves, one batched call a step
    assert seen == [8, 8, 8]
    alone = sdxl.sample(labels[2:3], seeds[2:3], steps=3, cfg_scale=5.0, learner=LEARNER)
    assert torch.allclose(alone.images[0], out.images[2], atol=1e-5)  # a sample does not depend on its batch
    seen.clear()
    plain = sdxl.sample(labels, seeds, steps=3, cfg_scale=1.0, learner=LEARNER)
    assert plain.model_evals == 3 * 4 == sum(seen)  # s = 1: the conditional half only
    assert not torch.allclose(plain.images, out.images, atol=1e-3)  # (the unconditional half mattered)


@pytest.mark.parametrize("gradient", ["full", "x0"])
def test_entropy_guidance_moves_the_latents(sdxl, gradient):
    labels, seeds = torch.tensor([0, 2]), np.array([3, 4])
    kw = dict(steps=3, cfg_scale=5.0, learner=LEARNER, guide_every=1, gradient=gradient)
    plain = sampling.denoise(sdxl, labels, seeds, omega=0.0, **kw)
    guided = sampling.denoise(sdxl, labels, seeds, omega=0.1, **kw)
    assert guided.shape == plain.shape == (2, 4, 16, 16) and guided.isfinite().all()
    assert ((guided - plain).flatten(1).norm(dim=1) > 1e-2 * plain.flatten(1).norm(dim=1)).all()


@pytest.mark.parametrize("steps", [1, 2])
def test_turbo_samples_without_cfg_and_guides_every_step(parts, monkeypatch, steps):
    turbo = _turbo(parts, learner_resolution=16)
    scheduler = sampling.fresh(turbo.scheduler)
    scheduler.set_timesteps(steps)
    assert type(scheduler).__name__ == "EulerAncestralDiscreteScheduler" and scheduler.timesteps[0] == 999
    calls = _spy_guidance(monkeypatch)
    labels, seeds = torch.tensor([0, 1, 2]), np.array([5, 6, 7])
    kw = dict(steps=steps, cfg_scale=1.0, learner=LEARNER, guide_every=1)
    guided = turbo.sample(labels, seeds, omega=0.1, **kw)
    assert len(calls) == steps and guided.model_evals == steps * 3  # every step guided; one UNet call a step
    plain = turbo.sample(labels, seeds, omega=0.0, **kw)
    assert not torch.allclose(guided.images, plain.images, atol=1e-3)
    alone = turbo.sample(labels[1:2], seeds[1:2], omega=0.0, **kw)  # ancestral noise: each sample's own
    assert torch.allclose(alone.images[0], plain.images[1], atol=1e-5)


@pytest.mark.parametrize("steps", [2, 4])
def test_lcm_scheduler_runs_few_steps_guided_every_step(parts, monkeypatch, steps):
    lcm = StableDiffusionXL.from_components(parts, NAMES, PipelineSettings(scheduler="lcm", learner_resolution=16))
    assert type(lcm.scheduler).__name__ == "LCMScheduler"
    calls = _spy_guidance(monkeypatch)
    labels, seeds = torch.tensor([0, 2]), np.array([8, 9])
    out = lcm.sample(labels, seeds, steps=steps, cfg_scale=1.0, learner=LEARNER, omega=0.1, guide_every=1)
    assert len(calls) == steps and out.images.shape == (2, 3, 32, 32) and out.images.isfinite().all()
    plain = lcm.sample(labels, seeds, steps=steps, cfg_scale=1.0, learner=LEARNER)
    assert not torch.allclose(out.images, plain.images, atol=1e-3)


def test_an_lcm_distilled_unet_embeds_the_guidance_scale_in_one_call(unet_calls):
    """LCM-SDXL's UNet takes s − 1 as an embedding (time_cond_proj_dim), as the pipeline passes it: one
    evaluation a step, and s still changes the output."""
    parts = random_components("tiny", seed=1, time_cond_proj_dim=8)
    lcm = StableDiffusionXL.from_components(parts, NAMES, PipelineSettings(scheduler="lcm", learner_resolution=16))
    seen = unet_calls(lcm)
    labels, seeds = torch.tensor([0, 1]), np.array([1, 2])
    low = lcm.sample(labels, seeds, steps=2, cfg_scale=2.0, learner=LEARNER)
    high = lcm.sample(labels, seeds, steps=2, cfg_scale=8.0, learner=LEARNER)
    assert low.model_evals == high.model_evals == 2 * 2 and sum(seen) == 2 * 2 * 2
    assert not torch.allclose(low.images, high.images, atol=1e-4)


def test_saved_pipeline_loads_back_to_the_same_images(tmp_path, parts, sdxl):
    path = save_pipeline(parts, tmp_path / "tiny-sdxl")
    assert sorted(p.name for p in path.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "unet",
        "vae",
    ]
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    loaded = StableDiffusionXL.load(str(path), NAMES, SETTINGS)
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    labels, seeds = torch.tensor([2, 0]), np.array([21, 22])
    kw = dict(steps=2, cfg_scale=5.0, learner=LEARNER)
    assert torch.allclose(loaded.sample(labels, seeds, **kw).images, sdxl.sample(labels, seeds, **kw).images, atol=1e-6)

    broken = tmp_path / "no-text-encoder-2"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(GeneratorError) as info:
        StableDiffusionXL.load(str(broken), NAMES, SETTINGS)
    message = str(info.value)
    assert message.startswith(f"generator.model={str(broken)!r}: cannot load a Stable Diffusion XL pipeline")
    assert "\n" not in message


def test_a_float16_pipeline_keeps_sdxls_vae_in_float32():
    """SDXL's VAE sets force_upcast (it overflows float16); bfloat16 keeps everything in bfloat16."""
    parts = random_components("tiny", seed=0)  # (its own: the constructor casts the modules in place)
    half = StableDiffusionXL.from_components(parts, NAMES, PipelineSettings(dtype=torch.float16))
    assert half.vae.dtype == torch.float32 and half.unet.dtype == torch.float16
    assert half.cond.dtype == half.pooled.dtype == half.time_ids.dtype == torch.float16
    brain = StableDiffusionXL.from_components(parts, NAMES, PipelineSettings(dtype=torch.bfloat16))
    assert brain.vae.dtype == brain.unet.dtype == brain.text_encoder_2.dtype == torch.bfloat16


def test_the_examples_are_what_a_gpu_user_starts_from():
    examples = Path(__file__).parents[3] / "examples"
    base, turbo = (load_config(examples / f"params-{name}.yaml").generator for name in ("sdxl", "sdxl-turbo"))
    assert (base.backend, base.resolution, base.steps, base.cfg_scale, base.guide_every) == ("sdxl", 1024, 30, 5.0, 5)
    assert (turbo.backend, turbo.resolution, turbo.steps, turbo.cfg_scale, turbo.guide_every) == (
        "sdxl",
        512,
        4,
        1.0,
        1,
    )
    assert base.scheduler == turbo.scheduler == "" and base.dtype == turbo.dtype == "auto"  # the pipelines' own
    assert base.gradient_checkpointing and base.guidance_gradient == turbo.guidance_gradient == "full"
