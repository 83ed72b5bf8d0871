"""The SD3 (flow-matching) family on tiny random components made in code (two CLIP encoders, T5 optional),
saved with save_pretrained and loaded back; all on the CPU."""

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from dp_ops.engine import sampling
from dp_ops.engine.backends.latent import PipelineSettings
from dp_ops.engine.backends.sd3 import StableDiffusion3
from dp_ops.engine.backends.sd3_random import random_components, save_pipeline
from dp_ops.engine.schedulers import fresh, x0_space
from dp_ops.errors import GeneratorError

NAMES = ("cat", "dog", "red fox")
SETTINGS = PipelineSettings(output_resolution=24, learner_resolution=16)
CLIP_TOKENS, T5_TOKENS = 77, 256  # the pipeline's CLIP length and its default max_sequence_length


def _fixed_learner(x):
    """Logits that depend on the image (so guidance has a gradient), no training needed."""
    return x.flatten(1)[:, : len(NAMES)] * 5


@pytest.fixture(scope="module")
def parts():
    return random_components("tiny", seed=0)


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory, parts):
    return save_pipeline(parts, tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def sd3(sd3_path):
    return StableDiffusion3.load(str(sd3_path), NAMES, SETTINGS)


def _sample(gen, labels, seeds, **kw):
    args = dict(steps=4, cfg_scale=4.0, learner=_fixed_learner, batch_size=len(labels))
    return gen.sample(torch.as_tensor(labels), np.asarray(seeds), **{**args, **kw})


def test_save_pipeline_round_trips_to_the_images_of_from_components(sd3_path, sd3, parts):
    assert sorted(p.name for p in sd3_path.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "transformer",
        "vae",
    ]
    index = json.loads((sd3_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    assert sd3.resolution == 32 and sd3.vae_factor == 2 and sd3.noise_shape == (4, 16, 16)
    assert sd3.text_encoder_3 is None and sd3.vae.config.shift_factor == pytest.approx(0.0609)
    # joint embeddings: both CLIPs' tokens zero-padded to joint_attention_dim, then T5's place (zeros without it)
    assert sd3.cond.shape == (3, CLIP_TOKENS + T5_TOKENS, 48) and sd3.pooled.shape == (3, 40)
    assert sd3.uncond.shape == (1, CLIP_TOKENS + T5_TOKENS, 48) and sd3.uncond_pooled.shape == (1, 40)
    assert not sd3.cond[:, CLIP_TOKENS:].any() and not torch.allclose(sd3.pooled[0], sd3.pooled[2])
    built = StableDiffusion3.from_components(parts, NAMES, SETTINGS)
    labels, seeds = [0, 2, 1], [5, 6, 7]
    loaded, made = _sample(sd3, labels, seeds).images, _sample(built, labels, seeds).images
    assert torch.allclose(loaded, made, atol=1e-5), (loaded - made).abs().max()  # (same weights; BLAS may round)
    templated = StableDiffusion3.from_components(parts, NAMES, PipelineSettings(prompt="a photo of a {name}"))
    assert templated.prompts[2] == "a photo of a red fox" and not torch.allclose(templated.pooled, sd3.pooled)


@pytest.mark.parametrize("dynamic", [False, True])
def test_sampling_is_the_pipelines_own_denoising_loop(parts, dynamic):
    """The shared sampler with this adapter gives the latents StableDiffusion3Pipeline itself gives from the
    same x_T: same prompt embeddings, timestep convention, CFG and schedule (with ``mu`` when it shifts
    dynamically, as FLUX-style configs do)."""
    parts = dict(parts)
    if dynamic:
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    gen = StableDiffusion3.from_components(parts, NAMES, SETTINGS)
    assert ("mu" in gen.timestep_kwargs()) == dynamic
    labels, seeds = torch.tensor([0, 1, 2]), np.array([1, 2, 3])
    z0 = sampling.denoise(gen, labels, seeds, steps=4, cfg_scale=4.0, learner=_fixed_learner)
    x_T = torch.stack([torch.randn(gen.noise_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=4.0, output_type="latent", height=32, width=32)
    ref = pipe(list(NAMES), latents=x_T, **kw).images
    assert torch.allclose(z0, ref, atol=1e-4), (z0 - ref).abs().max()
    assert (z0 - x_T).abs().max() > 0.1  # (it did denoise)


def test_samples_are_images_reproducible_alone_or_in_a_batch_with_two_evaluations_per_cfg_step(sd3):
    batch_sizes = []
    hook = sd3.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        labels, seeds = [0, 1, 2, 0], [11, 12, 13, 14]
        out = _sample(sd3, labels, seeds)
        assert batch_sizes == [8] * 4  # one batched transformer call a step: both CFG halves
        alone = _sample(sd3, labels[2:3], seeds[2:3])
        plain = _sample(sd3, labels, seeds, cfg_scale=1.0)
        assert batch_sizes[-4:] == [4] * 4  # s = 1: the conditional half only
    finally:
        hook.remove()
    assert out.images.shape == (4, 3, 24, 24) and out.images.dtype == torch.float32
    assert out.images.min() >= -1 and out.images.max() <= 1 and out.images.std() > 0.01
    assert out.model_evals == 4 * 4 * 2 and plain.model_evals == 4 * 4
    assert torch.allclose(alone.images[0], out.images[2], atol=1e-5)
    assert torch.equal(out.images, _sample(sd3, labels, seeds).images)
    assert not torch.allclose(plain.images, out.images, atol=1e-3)  # s changes the samples
    assert out.entropy.shape == (4,) and out.entropy.isfinite().all()


def test_the_scheduler_is_flow_matching_and_guidance_uses_x0_from_the_velocity(sd3, monkeypatch):
    """x_t = (1−σ)·x0 + σ·ε, v = ε − x0: the sampler's x̂0 is x_t − σ·v̂ at each guided step."""
    assert (
        isinstance(sd3.scheduler, FlowMatchEulerDiscreteScheduler) and x0_space(sd3.scheduler) == "flow:flow_prediction"
    )
    schedule = fresh(sd3.scheduler)
    schedule.set_timesteps(4)
    seen = []
    real = sampling.entropy_guidance

    def spy(x_t, eps_fn, x0_of, *args, **kwargs):
        with torch.no_grad():
            v = eps_fn(x_t)
            sigma = schedule.sigmas[len(seen)]
            seen.append(torch.allclose(x0_of(x_t, v), x_t - sigma * v) and not torch.allclose(x0_of(x_t, v), x_t))
        return real(x_t, eps_fn, x0_of, *args, **kwargs)

    monkeypatch.setattr(sampling, "entropy_guidance", spy)
    _sample(sd3, [0, 1], [3, 4], omega=0.1, guide_every=1)
    assert seen == [True] * 4


@pytest.mark.parametrize("gradient", ["x0", "full"])
def test_entropy_guidance_runs_and_moves_the_samples(sd3, gradient):
    labels, seeds = [0, 1, 2], [21, 22, 23]
    plain = _sample(sd3, labels, seeds)
    guided = _sample(sd3, labels, seeds, omega=0.1, guide_every=2, gradient=gradient)
    moved = (guided.images - plain.images).flatten(1).norm(dim=1)
    assert (moved > 1e-2 * plain.images.flatten(1).norm(dim=1)).all(), moved
    assert guided.model_evals == plain.model_evals  # (v̂ of a guided step is the one the scheduler steps with)


def test_a_pipeline_with_t5_loads_it_and_fills_the_t5_tokens(tmp_path):
    parts = random_components("tiny", seed=0, t5=True)
    path = save_pipeline(parts, tmp_path / "with-t5")
    assert json.loads((path / "model_index.json").read_text())["text_encoder_3"][1] == "T5EncoderModel"
    gen = StableDiffusion3.load(str(path), NAMES, SETTINGS)
    assert gen.text_encoder_3 is not None and gen.cond.shape == (3, CLIP_TOKENS + T5_TOKENS, 48)
    assert gen.cond[:, CLIP_TOKENS:].abs().amax(dim=(1, 2)).min() > 0  # T5's tokens, not zeros
    built = StableDiffusion3.from_components(parts, NAMES, SETTINGS)
    assert torch.allclose(gen.cond, built.cond, atol=1e-5) and torch.allclose(gen.pooled, built.pooled, atol=1e-5)


def test_bad_folders_and_sizes_are_one_line_errors(sd3_path, parts, tmp_path):
    broken = tmp_path / "no-clip-2"
    shutil.copytree(sd3_path, broken)
    shutil.rmtree(broken / "text_encoder_2")
    for model in (broken, sd3_path / "transformer"):
        with pytest.raises(GeneratorError) as info:
            StableDiffusion3.load(str(model), NAMES, SETTINGS)
        message = str(info.value)
        assert message.startswith(f"generator.model={str(model)!r}: cannot load a Stable Diffusion 3 pipeline")
        assert "\n" not in message
    with pytest.raises(GeneratorError, match=r"generator\.resolution=18: must be a multiple of 4"):
        StableDiffusion3.from_components(parts, NAMES, PipelineSettings(resolution=18))
    with pytest.raises(GeneratorError, match=r"generator\.resolution=256: at most 128 for this model"):
        StableDiffusion3.from_components(parts, NAMES, PipelineSettings(resolution=256))


def test_the_sd3_medium_shapes_build_on_the_meta_device():
    with torch.device("meta"):
        parts = random_components("sd3-medium")
    millions = {k: sum(p.numel() for p in parts[k].parameters()) / 1e6 for k in ("transformer", "vae")}
    assert 2020 < millions["transformer"] < 2035 and 83 < millions["vae"] < 85  # SD3-medium: 2.03 B, 84 M
    assert parts["transformer"].config.joint_attention_dim == 4096 and parts["vae"].config.latent_channels == 16
    assert parts["text_encoder_3"] is None


def test_a_bfloat16_pipeline_gives_float32_velocities_and_finite_samples(parts):
    gen = StableDiffusion3.from_components(parts, NAMES, PipelineSettings(dtype=torch.bfloat16))
    assert {p.dtype for m in (gen.transformer, gen.text_encoder_2, gen.vae) for p in m.parameters()} == {torch.bfloat16}
    assert gen.cond.dtype == gen.pooled.dtype == torch.bfloat16
    v = gen.model_output(torch.randn(2, *gen.noise_shape), gen.scheduler.timesteps[0], torch.tensor([0, 2]), 4.0)
    assert v.dtype == torch.float32 and v.shape == (2, *gen.noise_shape) and v.isfinite().all()
    out = _sample(gen, [0, 1], [1, 2], omega=0.1, guide_every=2, precision="bfloat16")
    assert out.images.dtype == torch.float32 and out.images.isfinite().all()


def test_the_runner_loads_an_sd3_folder_by_backend_or_by_its_model_index(sd3_path):
    from dp_ops.config import build_config, load_config
    from dp_ops.runner import load_pipeline

    data = {"name": "folder", "val_root": "v", "test_root": "t", "resolution": 16, "shard_resolution": 24}
    for backend in ("sd3", "diffusers"):
        cfg = build_config({"device": "cpu", "data": data, "generator": {"backend": backend, "model": str(sd3_path)}})
        g = cfg.generator
        assert (g.steps, g.cfg_scale, g.guide_every, g.guidance_gradient) == (28, 7.0, 4, "x0")  # the family's
        gen = load_pipeline(cfg, ["cat", "dog"])
        assert isinstance(gen, StableDiffusion3) and gen.prompts == ("cat", "dog") and gen.output_resolution == 24
    example = load_config(Path(__file__).parents[3] / "examples" / "params-sd3.yaml").generator
    assert (example.backend, example.steps, example.cfg_scale, example.guidance_gradient) == ("sd3", 28, 7.0, "x0")
    assert example.resolution == 1024 and example.dtype == "auto" and example.gradient_checkpointing
