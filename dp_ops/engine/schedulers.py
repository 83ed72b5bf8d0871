"""The diffusers schedulers a generator samples with, and x̂0 for each at a given step.

One table, :data:`dp_ops.generators.SCHEDULERS`: ``generator.scheduler`` names an entry (``""`` keeps the
pipeline's own), and each entry says how the scheduler parameterises x_t, so that :func:`x0_at` gives the
estimate of the clean sample as a pure function of (x_t, model output) at step i, without calling ``step`` (a
stateful scheduler advances its step index on every call). The functions themselves are
:data:`dp_ops.engine.guidance.X0`.

Parameterisations (x_t as the scheduler holds it, before ``scale_model_input``):
    vp      x_t = √ᾱ·x0 + √(1−ᾱ)·ε (DDIM, DDPM; DPM-Solver++ and UniPC through their σ: ᾱ = 1/(σ²+1));
            the model predicts ε, v or x0 (``prediction_type``)
    karras  x_t = x0 + σ·ε, the model reads x_t/√(σ²+1) (Euler, Euler ancestral)
    flow    x_t = (1−σ)·x0 + σ·ε, the model predicts v = ε − x0 (FlowMatchEuler; DPM-Solver++/UniPC with
            flow sigmas)
    lcm     vp, then the consistency boundary: x̂0 = c_out·x̂0_vp + c_skip·x_t (LCM)
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' imports)

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch

from dp_ops.engine.guidance import X0, StepScalars
from dp_ops.errors import GeneratorError
from dp_ops.generators import SCHEDULERS, Scheduler

Tensor = torch.Tensor


BY_CLASS = {entry.cls: name for name, entry in SCHEDULERS.items()}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def entry_of(scheduler: Any) -> Scheduler:
    """The table entry of a scheduler object (one line naming the choices for a class it does not hold)."""
    name = BY_CLASS.get(type(scheduler).__name__)
    if name is None:
        raise GeneratorError(
            f"the pipeline's scheduler is a {type(scheduler).__name__}, which dp_ops cannot sample with; "
            f"set generator.scheduler to one of {', '.join(SCHEDULERS)}"
        )
    return SCHEDULERS[name]


def config_of(scheduler: Any) -> dict[str, Any]:
    """A scheduler object's config with its class name, as ``save_pretrained`` writes it."""
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


def make_scheduler(config: Any, name: str = "") -> Any:
    """A scheduler from a pipeline's saved scheduler ``config``: its own class (``name`` empty), or the class
    ``name`` picks from :data:`SCHEDULERS`, with the saved schedule (betas, shift, offsets) kept."""
    import diffusers

    cls_name = SCHEDULERS[name].cls if name else dict(config).get("_class_name", "")
    if name == "" and cls_name not in BY_CLASS:
        raise GeneratorError(
            f"the pipeline's scheduler is a {cls_name or 'scheduler without a class name'}, which dp_ops cannot "
            f"sample with; set generator.scheduler to one of {', '.join(SCHEDULERS)}"
        )
    cls = getattr(diffusers, cls_name)
    own = inspect.signature(cls.__init__).parameters  # (another class's options would be warned about, each batch)
    scheduler = cls.from_config({k: v for k, v in dict(config).items() if k in own or k.startswith("_")})
    x0_space(scheduler)  # (a prediction type the entry cannot invert: refused now, not at the first guided step)
    return scheduler


def fresh(scheduler: Any) -> Any:
    """A private copy to sample one batch with (``set_timesteps`` and ``step`` mutate a scheduler)."""
    return copy.deepcopy(scheduler)


def x0_space(scheduler: Any) -> str:
    """The key of :data:`~dp_ops.engine.guidance.X0` for this scheduler's parameterisation and prediction type."""
    entry, cfg = entry_of(scheduler), scheduler.config
    space = entry.space
    prediction = cfg.get("prediction_type", "flow_prediction" if space == "flow" else "epsilon")
    if cfg.get("use_flow_sigmas", False) or prediction == "flow_prediction":
        space, prediction = "flow", "flow_prediction"
    key = f"{space}:{prediction}"
    if key not in X0:
        raise GeneratorError(
            f"the scheduler {type(scheduler).__name__} with prediction_type={prediction!r} cannot be inverted for "
            f"x̂0 by dp_ops (it can: {', '.join(sorted(X0))})"
        )
    return key


def scalars_at(scheduler: Any, i: int, t: Tensor) -> StepScalars:
    """The schedule's values at step ``i`` (timestep ``t``) that x̂0 needs, read where the scheduler's own step
    reads them: σ from ``sigmas[i]`` (then ᾱ = 1/(σ²+1) for a VP one), or ᾱ_t from ``alphas_cumprod[t]`` and,
    for LCM, the boundary scalings at t. 0-d CPU tensors: they enter device arithmetic as scalars, no copy."""
    if entry_of(scheduler).by_sigma:
        sigma = scheduler.sigmas[i]
        return StepScalars(alpha_bar=1 / (sigma**2 + 1), sigma=sigma)
    alpha_bar = scheduler.alphas_cumprod[t]
    if entry_of(scheduler).space == "lcm":
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        return StepScalars(alpha_bar=alpha_bar, c_skip=c_skip, c_out=c_out)
    return StepScalars(alpha_bar=alpha_bar)


def x0_at(scheduler: Any, i: int, t: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """x̂0 as a function of (x_t, model output) at step ``i`` of ``scheduler`` (after ``set_timesteps``)."""
    form, scalars = X0[x0_space(scheduler)], scalars_at(scheduler, i, t)
    return lambda x_t, out: form(x_t, out, scalars)


def step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """What ``step`` is passed beside (output, t, x_t): each sample's own generator where the step draws noise."""
    if entry_of(scheduler).stochastic and "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generators}
    return {}
