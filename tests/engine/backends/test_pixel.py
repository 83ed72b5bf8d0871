import json

import numpy as np
import pytest
import torch

from dp_ops.config import DataConfig
from dp_ops.engine.backends.pixel import PixelDiffusion
from dp_ops.engine.learner import build_learner
from dp_ops.engine.saved import META_FILE
from dp_ops.errors import GeneratorError


@pytest.fixture(scope="module")
def learner(tiny_cfg):
    return build_learner(tiny_cfg.learner, 10, 1, seed=0).eval()


def _sample(gen, learner, n=12, seeds=None, **kw):
    labels = torch.arange(n) % 10
    seeds = np.arange(100, 100 + n) if seeds is None else seeds
    steps, cfg_scale = kw.pop("steps", 4), kw.pop("cfg_scale", 2.0)
    return gen.sample(labels, seeds, steps=steps, cfg_scale=cfg_scale, learner=learner, **kw)


def test_ddim_sampler_shapes_range_and_bookkeeping(tiny_generator, learner):
    s = _sample(tiny_generator, learner, n=12, batch_size=5)
    assert s.images.shape == (12, 1, 8, 8)
    assert s.images.min() >= -1 and s.images.max() <= 1
    assert s.entropy.shape == (12,) and (s.entropy >= 0).all() and (s.entropy <= np.log(10) + 1e-5).all()
    assert torch.equal(s.labels, torch.arange(12) % 10)
    assert s.model_evals == 12 * 4 * 2  # 4 steps, conditional + unconditional pass (CFG)
    assert _sample(tiny_generator, learner, n=12, cfg_scale=1.0).model_evals == 12 * 4


def test_sampler_is_deterministic_and_per_sample_reproducible(tiny_generator, learner):
    a = _sample(tiny_generator, learner, n=12, batch_size=12)
    b = _sample(tiny_generator, learner, n=12, batch_size=12)
    assert torch.equal(a.images, b.images)
    alone = _sample(tiny_generator, learner, n=1, seeds=np.array([100]))
    assert torch.allclose(alone.images[0], a.images[0], atol=1e-4)
    other = _sample(tiny_generator, learner, n=12, seeds=np.arange(200, 212))
    assert not torch.allclose(other.images, a.images)


def test_guidance_runs_through_the_shared_sampler_every_kth_step(tiny_generator, learner, monkeypatch):
    from dp_ops.engine import sampling

    calls = []
    real = sampling.entropy_guidance

    def spy(*args, **kwargs):
        calls.append(args[5] if len(args) > 5 else kwargs["to_learner"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "entropy_guidance", spy)
    _sample(tiny_generator, learner, n=5, steps=5, omega=0.1, guide_every=2, batch_size=3)
    assert len(calls) == 2 * 3  # two batches, steps 0, 2, 4 each
    assert all(fn == tiny_generator.to_learner for fn in calls)  # x̂0 is read by the learner as is


def test_save_load_roundtrip_and_split_check(tiny_generator, learner, tmp_path):
    path = tmp_path / "gen"
    tiny_generator.save(path)
    tiny_generator.save(path)  # replaces the saved one in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]  # no temporary or old folder left beside it
    assert json.loads((path / META_FILE).read_text())["resolution"] == 8
    loaded = PixelDiffusion.load(path)
    assert torch.equal(_sample(loaded, learner).images, _sample(tiny_generator, learner).images)
    loaded.check_matches(DataConfig(resolution=8))
    with pytest.raises(GeneratorError, match=r"data.split_seed=1: the generator was trained with 0"):
        loaded.check_matches(DataConfig(resolution=8, split_seed=1))
    with pytest.raises(GeneratorError, match="no trained generator there"):
        PixelDiffusion.load(tmp_path / "nothing")


def test_trained_generator_beats_its_initialisation(tiny_generator, real):
    # ε-prediction loss of the trained UNet is below that of a fresh one on held-out real digits.
    from dp_ops.engine.backends.pixel import build_unet

    with torch.random.fork_rng(devices=[]):  # a fixed initialisation: the global RNG differs per process
        torch.manual_seed(0)
        fresh = build_unet(tiny_generator_cfg(tiny_generator), 8, 10).eval()
    x0 = real.val.images[:128]
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (128,), generator=g)
    x_t = tiny_generator.scheduler.add_noise(x0, noise, t)
    y = real.val.labels[:128]
    with torch.no_grad():
        trained_loss = torch.nn.functional.mse_loss(tiny_generator.unet(x_t, t, class_labels=y).sample, noise)
        fresh_loss = torch.nn.functional.mse_loss(fresh(x_t, t, class_labels=y).sample, noise)
    assert trained_loss < 0.8 * fresh_loss


def tiny_generator_cfg(gen):
    from dp_ops.config import GeneratorConfig

    return GeneratorConfig(channels=tuple(gen.unet.config.block_out_channels))
