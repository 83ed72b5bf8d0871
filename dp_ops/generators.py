"""The one table of generator backends: ``generator.backend`` names an entry, and config validation, the path
checks, loading, the stored format and the docs all read it. Standard library only (the foundation layer): the
adapters themselves are named by import path and loaded by :func:`dp_ops.runner.load_generator`.

To add a family: write its adapter (a :class:`~dp_ops.engine.backends.latent.LatentGenerator` subclass with
``from_components``, ``load`` and ``model_output``) and its tiny random components, then add one :class:`Backend`
entry here; ``generator.backend=diffusers`` picks it from a pipeline folder's ``model_index.json``
(:func:`family_of`). docs/architecture.md walks through it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

# Sampling defaults a pretrained pipeline starts from (the paper's for SD: 30 steps, CFG 4 in diffusers'
# convention, entropy guidance every 5th step); a family's entry overrides some.
_PIPELINE = MappingProxyType(
    {
        "steps": 30,
        "cfg_scale": 4.0,
        "guide_every": 5,
        "batch_size": 8,
        "precision": "float32",  # (generator.dtype sets a pipeline's precision)
        "dtype": "auto",  # bfloat16 weights on CUDA, float32 on the CPU
        "guidance_gradient": "full",
    }
)


@dataclass(frozen=True)
class Backend:
    """One generator backend: what it is (for the docs and ``dpops run --help``), what it is conditioned on,
    the diffusers pipeline classes it drives with the folders they need, its adapter class, the ``generator.*``
    defaults it starts from, and how its samples are stored."""

    summary: str
    conditioned_on: str
    adapter: str  # "module:Class", imported when the generator loads
    defaults: Mapping[str, Any] = field(default_factory=dict)
    pipelines: tuple[str, ...] = ()  # model_index.json's _class_name values it drives
    layout: tuple[str, ...] = ()  # the subfolders such a pipeline folder has
    parameterisation: str = ""
    scheduler: str = ""
    guidance_through: str = ""
    stored_format: str = "png"  # shards: PNG for a pretrained pipeline's images, raw uint8 for tiny pixels
    by_class_id: bool = False  # conditioned on the model's own class ids (data.class_ids), not on prompts

    @property
    def pretrained(self) -> bool:
        """Loaded from ``generator.model`` (a pipeline) rather than trained here at ``generator.path``."""
        return self.adapter != PIXEL_ADAPTER


PIXEL_ADAPTER = "dp_ops.engine.backends.pixel:PixelDiffusion"
_SD_LAYOUT = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

BACKENDS: dict[str, Backend] = {
    "pixel": Backend(
        "the embedded class-conditional pixel diffusion model, trained here on digits or MNIST",
        "class index (a null class for CFG)",
        PIXEL_ADAPTER,
        {"steps": 6, "cfg_scale": 2.0, "guide_every": 2},
        parameterisation="ε (VP)",
        scheduler="DDIM",
        guidance_through="the UNet (full) and the learner",
        stored_format="raw",
    ),
    "sd": Backend(
        "SD-1.x and SD-2.x (ε or v prediction)",
        "a prompt from the class name (CLIP)",
        "dp_ops.engine.backends.sd:StableDiffusion",
        {**_PIPELINE, "scheduler": "ddim"},  # (sampled with DDIM whatever the folder saved, as before 0.10)
        ("StableDiffusionPipeline",),
        _SD_LAYOUT,
        "ε or v (VP)",
        "DDIM (any of generator.scheduler)",
        "the UNet (full), the VAE decoder",
    ),
    "sdxl": Backend(
        "SDXL and its few-step variants (SDXL-Turbo, LCM)",
        "a prompt from the class name (two CLIP encoders, pooled embeddings, size ids)",
        "dp_ops.engine.backends.sdxl:StableDiffusionXL",
        {**_PIPELINE, "cfg_scale": 5.0, "batch_size": 4},
        ("StableDiffusionXLPipeline",),
        ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
        "ε (VP, σ-space with Euler)",
        "its own (Euler; Euler ancestral for Turbo; LCM)",
        "the UNet (full), the VAE decoder",
    ),
    "dit": Backend(
        "DiT, class-conditional ImageNet models",
        "an ImageNet class id (by label name, WordNet id or data.class_ids)",
        "dp_ops.engine.backends.dit:DiT",
        {**_PIPELINE, "steps": 25, "batch_size": 16},
        ("DiTPipeline",),
        ("transformer", "vae", "scheduler"),
        "ε with learned σ (VP)",
        "its own (DDIM/DPM-Solver++)",
        "the transformer (full), the VAE decoder",
        by_class_id=True,
    ),
    "sd3": Backend(
        "Stable Diffusion 3 / 3.5, flow matching",
        "a prompt from the class name (two CLIP encoders, T5 if the folder has it)",
        "dp_ops.engine.backends.sd3:StableDiffusion3",
        {**_PIPELINE, "steps": 28, "cfg_scale": 7.0, "guide_every": 4, "batch_size": 4, "guidance_gradient": "x0"},
        ("StableDiffusion3Pipeline",),
        ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
        "flow velocity (x_t = (1−σ)·x0 + σ·ε)",
        "FlowMatchEuler",
        "the VAE decoder (x0, the default), the transformer too (full)",
    ),
}
DIFFUSERS = "diffusers"  # generator.backend=diffusers: the family named by the folder's model_index.json
NAMES = (*BACKENDS, DIFFUSERS)
PIPELINE_KEYS = frozenset(_PIPELINE)


@dataclass(frozen=True)
class Scheduler:
    """One diffusers scheduler ``generator.scheduler`` may name: its class, how it parameterises x_t (``vp``,
    ``karras``, ``flow`` or ``lcm``: :mod:`dp_ops.engine.schedulers`), whether its step draws noise (then each
    sample's own generator is passed to it), and whether its step reads σ = sigmas[i] (else ᾱ_t)."""

    cls: str
    space: str
    stochastic: bool = False
    by_sigma: bool = False


SCHEDULERS: dict[str, Scheduler] = {
    "ddim": Scheduler("DDIMScheduler", "vp"),
    "ddpm": Scheduler("DDPMScheduler", "vp", stochastic=True),
    "euler": Scheduler("EulerDiscreteScheduler", "karras", by_sigma=True),
    "euler_ancestral": Scheduler("EulerAncestralDiscreteScheduler", "karras", stochastic=True, by_sigma=True),
    "dpm_solver": Scheduler("DPMSolverMultistepScheduler", "vp", by_sigma=True),
    "unipc": Scheduler("UniPCMultistepScheduler", "vp", by_sigma=True),
    "lcm": Scheduler("LCMScheduler", "lcm", stochastic=True),
    "flow_euler": Scheduler("FlowMatchEulerDiscreteScheduler", "flow", by_sigma=True),
}


def family_of(pipeline_class: str) -> str | None:
    """The backend that drives a pipeline class (``model_index.json``'s ``_class_name``), or None."""
    return next((name for name, b in BACKENDS.items() if pipeline_class in b.pipelines), None)


def folder_family(model: str) -> str | None:
    """The backend a local pipeline folder's ``model_index.json`` names, or None (a hub id, no such file, a class
    no backend drives)."""
    index = Path(model).expanduser() / "model_index.json"
    try:
        cls = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return family_of(cls) if isinstance(cls, str) else None


def resolve(backend: str, model: str) -> str | None:
    """The table entry ``generator.backend`` means: itself, or for ``diffusers`` the family a local folder names
    (None until it can be read: a hub id's ``model_index.json`` is read when it loads)."""
    return folder_family(model) if backend == DIFFUSERS else backend


def defaults_of(backend: str, model: str) -> Mapping[str, Any]:
    """The ``generator.*`` defaults ``generator.backend`` starts from (a pipeline's until its family is known)."""
    name = resolve(backend, model)
    return BACKENDS[name].defaults if name else _PIPELINE


def stored_format(backend: str, model: str) -> str:
    """How a backend's samples are stored when ``data.shard_format=auto``."""
    name = resolve(backend, model)
    return BACKENDS[name].stored_format if name else "png"


def pipelines_supported() -> str:
    """The pipeline classes some backend drives, for error messages."""
    return ", ".join(f"{p} ({name})" for name, b in BACKENDS.items() for p in b.pipelines)
