"""x̂0 for every scheduler dp_ops samples with, as a pure function of (x_t, model output) at step i: equal to the
scheduler's own estimate wherever it computes one, and recovering the true x0 from an x_t noised by the
scheduler's own forward process; and the sampler steps each scheduler exactly once per timestep."""

import inspect
from typing import ClassVar

import diffusers
import numpy as np
import pytest
import torch

from dp_ops.engine import schedulers
from dp_ops.engine.schedulers import SCHEDULERS, make_scheduler, x0_at, x0_space
from dp_ops.errors import GeneratorError

# (scheduler name, prediction type) pairs the scheduler's own step supports
CASES = [
    *(
        (name, p)
        for name in ("ddim", "ddpm", "dpm_solver", "unipc", "lcm")
        for p in ("epsilon", "v_prediction", "sample")
    ),
    ("euler", "epsilon"),
    ("euler", "v_prediction"),
    ("euler", "sample"),
    ("euler_ancestral", "epsilon"),
    ("euler_ancestral", "v_prediction"),
    ("flow_euler", "flow_prediction"),
]
STEPS = 10


def _scheduler(name: str, prediction: str):
    cls = getattr(diffusers, SCHEDULERS[name].cls)
    kwargs = {} if name == "flow_euler" else {"prediction_type": prediction}
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        kwargs["clip_sample"] = False  # (its own estimate is clipped to [-1, 1] for the step; x̂0 for guidance is not)
    scheduler = cls(**kwargs)
    scheduler.set_timesteps(STEPS, device="cpu")
    return scheduler


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))


def _theirs(scheduler, name: str, i: int, t, out, x_t):
    """The scheduler's own x̂0 at step i, or None where it computes none."""
    if name in ("dpm_solver", "unipc"):  # (their step returns none; convert_model_output is the x̂0 they step with)
        scheduler._step_index = i
        return scheduler.convert_model_output(out, sample=x_t)
    if name == "flow_euler":
        return None
    if hasattr(scheduler, "_step_index"):
        scheduler._step_index = i
    result = scheduler.step(out, t, x_t, generator=torch.Generator().manual_seed(1))
    return result.denoised if name == "lcm" else result.pred_original_sample


@pytest.mark.parametrize(("name", "prediction"), CASES)
def test_x0_is_the_schedulers_own_estimate(name, prediction):
    x_t, out, _ = _tensors()
    for i in (0, STEPS // 2, STEPS - 1):
        scheduler = _scheduler(name, prediction)
        t = scheduler.timesteps[i]
        ours = x0_at(scheduler, i, t)(x_t, out)
        theirs = _theirs(scheduler, name, i, t, out, x_t)
        if theirs is not None:
            assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (name, prediction, i)


def _truth(scheduler, name: str, prediction: str, i: int, x0, eps):
    """(x_t, the model output a perfect model gives, the x̂0 a perfect model's output should give) at step i, x_t from
    the scheduler's own forward process."""
    t = scheduler.timesteps[i]
    if name == "flow_euler":
        return scheduler.scale_noise(x0, t[None], eps), eps - x0, x0
    if name in ("euler", "euler_ancestral", "dpm_solver", "unipc"):
        scheduler._step_index = scheduler._begin_index = None  # (add_noise then finds the step of the timestep)
    x_t = scheduler.add_noise(x0, eps, t[None])
    if name in ("dpm_solver", "unipc", "euler", "euler_ancestral"):  # (ᾱ at the σ the step reads)
        alpha_bar = 1 / (scheduler.sigmas[i] ** 2 + 1)
    else:
        alpha_bar = scheduler.alphas_cumprod[t]
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction]
    if name in ("euler", "euler_ancestral") and prediction == "v_prediction":  # (σ-space x_t = (VP x_t)/√ᾱ)
        out = a * eps - s * x0
    if name == "lcm":
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        return x_t, out, c_out * x0 + c_skip * x_t
    return x_t, out, x0


@pytest.mark.parametrize(("name", "prediction"), CASES)
def test_x0_recovers_the_clean_sample_from_the_schedulers_forward_process(name, prediction):
    x0, eps, _ = _tensors(3)
    for i in (0, STEPS // 2, STEPS - 1):
        scheduler = _scheduler(name, prediction)
        x_t, out, expected = _truth(scheduler, name, prediction, i, x0, eps)
        ours = x0_at(scheduler, i, scheduler.timesteps[i])(x_t, out)
        assert torch.allclose(ours, expected, atol=1e-3, rtol=1e-3), (name, prediction, i)


def test_a_scheduler_outside_the_table_is_one_line_naming_the_choices():
    with pytest.raises(GeneratorError, match=r"PNDMScheduler.*generator.scheduler to one of ddim, ddpm"):
        make_scheduler(dict(diffusers.PNDMScheduler().config, _class_name="PNDMScheduler"))
    config = dict(diffusers.PNDMScheduler().config, _class_name="PNDMScheduler")
    assert type(make_scheduler(config, "euler")).__name__ == "EulerDiscreteScheduler"  # (named: its schedule kept)
    with pytest.raises(GeneratorError, match=r"prediction_type='velocity'"):
        x0_space(diffusers.DDIMScheduler(prediction_type="velocity"))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_the_sampler_steps_every_scheduler_once_per_timestep_and_guides_before_it(name, monkeypatch):
    """Guided on every step, a stateful scheduler is still stepped exactly once per timestep (a second call would
    advance its index), with the output guidance differentiated."""
    from dp_ops.engine.sampling import Generator, denoise

    class Toy(Generator):
        device = torch.device("cpu")
        learner_resolution = 4
        scheduler = make_scheduler(
            {"_class_name": SCHEDULERS[name].cls, **({} if name == "flow_euler" else {"clip_sample": False})}
        )
        noise_shape = (1, 4, 4)
        outputs: ClassVar[list[torch.Tensor]] = []

        def model_output(self, x_t, t, labels, cfg_scale):
            out = torch.tanh(x_t) * (1 + labels.view(-1, 1, 1, 1))
            self.outputs.append(out.detach())
            return out

        def to_learner(self, x0):
            return x0

        def to_images(self, x0):
            return x0

    cls = type(Toy.scheduler)
    stepped: list[torch.Tensor] = []
    real_step = cls.step
    monkeypatch.setattr(
        cls, "step", lambda self, out, t, x, **kw: stepped.append(out) or real_step(self, out, t, x, **kw)
    )
    learner = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    toy = Toy()
    x = denoise(toy, torch.tensor([0, 1]), np.array([4, 5]), steps=4, cfg_scale=1.0, learner=learner, omega=0.1)
    assert torch.isfinite(x).all() and len(stepped) == 4
    assert all(torch.equal(a, b) for a, b in zip(stepped, toy.outputs, strict=True))  # the output it guided with
    assert schedulers.entry_of(toy.scheduler) is SCHEDULERS[name]
