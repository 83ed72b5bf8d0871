"""``generator.guidance_decoder``: a small decoder (diffusers' AutoencoderTiny, TAESD-style) for the guided step's
decode of x̂0 only. Its gradient approximates the VAE decoder's: distilled from the VAE (what TAESD is), its guided
step points where the VAE's does; an untrained one's does not, so the check can fail."""

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import pytest
import torch
from diffusers import AutoencoderTiny

from dp_ops.engine.backends.latent import PipelineSettings
from dp_ops.engine.backends.sd import StableDiffusion
from dp_ops.engine.backends.sd_random import random_components
from dp_ops.engine.guidance import entropy_guidance
from dp_ops.engine.schedulers import fresh, x0_at
from dp_ops.errors import GeneratorError

NAMES = ("cat", "dog", "red fox")


def _tiny_decoder(seed: int, latent_channels: int = 4, levels: int = 2) -> AutoencoderTiny:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderTiny(
            encoder_block_out_channels=(16,) * levels,
            decoder_block_out_channels=(16,) * levels,
            num_encoder_blocks=(1,) * levels,
            num_decoder_blocks=(1,) * levels,
            latent_channels=latent_channels,
            upsampling_scaling_factor=2,
        )


def _distilled(teacher: StableDiffusion, iterations: int = 200) -> AutoencoderTiny:
    """A tiny decoder trained to decode what the VAE decodes (latents as the pipeline holds them)."""
    student = _tiny_decoder(0)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(iterations):
        z = 2 * torch.randn(16, 4, 16, 16, generator=g)
        with torch.no_grad():
            target = teacher.decode(z)
        loss = torch.nn.functional.mse_loss(student.decode(z).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


def _guided_step(generator: StableDiffusion, learner) -> torch.Tensor:
    scheduler = fresh(generator.scheduler)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[5]
    z = torch.randn(8, *generator.noise_shape, generator=torch.Generator().manual_seed(3))
    step = entropy_guidance(
        z,
        lambda x: generator.model_output(x, t, torch.arange(8) % 3, 4.0),
        x0_at(scheduler, 5, t),
        learner,
        0.05,
        generator.to_learner,
        through_eps=False,
    )
    return (step.x_t - z).flatten(1)


@pytest.mark.slow
def test_a_distilled_guidance_decoder_points_the_guided_step_where_the_vae_does():
    parts = random_components("tiny", seed=0)
    settings = PipelineSettings(learner_resolution=16)
    full = StableDiffusion.from_components(parts, NAMES, settings)
    torch.manual_seed(1)
    learner = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(1568, 3)
    )
    for p in learner.parameters():
        torch.nn.init.normal_(p, std=0.3)
    reference = _guided_step(full, learner)
    cosines = {}
    for name, decoder in (("distilled", _distilled(full)), ("untrained", _tiny_decoder(5))):
        approx = StableDiffusion.from_components(parts, NAMES, settings)
        approx.use_guidance_decoder(decoder)
        cosines[name] = torch.nn.functional.cosine_similarity(_guided_step(approx, learner), reference)
        assert torch.equal(approx.to_images(torch.ones(1, 4, 16, 16)), full.to_images(torch.ones(1, 4, 16, 16)))
    assert cosines["distilled"].mean() > 0.5 and cosines["distilled"].min() > 0.3, cosines
    assert cosines["untrained"].abs().mean() < 0.2, cosines  # (the check tells an unrelated decoder apart)


def test_the_guidance_decoder_is_read_from_its_folder_and_decodes_guided_steps_only(tmp_path):
    _tiny_decoder(0).save_pretrained(tmp_path / "taesd")
    settings = PipelineSettings(guidance_decoder=str(tmp_path / "taesd"))
    sd = StableDiffusion.from_components(random_components("tiny", seed=0), NAMES, settings)
    assert type(sd.guidance_vae).__name__ == "AutoencoderTiny" and type(sd.vae).__name__ == "AutoencoderKL"
    z = torch.randn(2, 4, 16, 16)
    assert torch.equal(sd.to_learner(z), sd.decode_with(sd.guidance_vae, z))  # (learner side = the images' side)
    assert not torch.allclose(sd.to_learner(z), sd.decode(z))
    with pytest.raises(GeneratorError, match=r"generator.guidance_decoder='.*nowhere': cannot load an AutoencoderTiny"):
        StableDiffusion.from_components(
            random_components("tiny", seed=0), NAMES, PipelineSettings(guidance_decoder=str(tmp_path / "nowhere"))
        )


def test_a_guidance_decoder_for_other_latents_is_one_line():
    sd = StableDiffusion.from_components(random_components("tiny", seed=0), NAMES, PipelineSettings())
    with pytest.raises(GeneratorError, match=r"decodes 16-channel latents 2× up, the model's are 4-channel, 2× up"):
        sd.use_guidance_decoder(_tiny_decoder(0, latent_channels=16))
    with pytest.raises(GeneratorError, match=r"decodes 4-channel latents 4× up"):
        sd.use_guidance_decoder(_tiny_decoder(0, levels=3))
