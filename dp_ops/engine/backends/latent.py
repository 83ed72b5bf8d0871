"""What every latent diffusers pipeline shares: its settings, its VAE and the decode entropy guidance
back-propagates through, its sizes, its noise, its scheduler, and loading components quietly in one dtype.

Notation (as in :mod:`dp_ops.engine.sampling`):
    z_t     the latent being denoised, (n, C, H/f, W/f) for a VAE with downsampling factor f
    x̂0      the estimate of the clean *latent* from z_t and the model output
    D(·)    the VAE decoder, applied to x̂0 / scaling_factor + shift_factor; gives an image in [-1, 1]

A family's adapter (:mod:`~dp_ops.engine.backends.sd`, ``sdxl``, ``dit``, ``sd3``) derives from
:class:`LatentGenerator` and adds its conditioning and :meth:`~dp_ops.engine.sampling.Generator.model_output`;
loading is diffusers' own ``from_pretrained`` per component with ``torch_dtype`` (never float32 then cast), a
float16 pipeline keeping a VAE that sets ``force_upcast`` in float32 (:func:`upcast_vae`).

``generator.guidance_decoder`` (:class:`PipelineSettings.guidance_decoder`): a small decoder (diffusers'
``AutoencoderTiny``, TAESD-style) used only for the guided step's decode of x̂0, the final images still decoded
by the pipeline's own VAE. Its gradient approximates the VAE decoder's; it costs a fraction of the decode's
FLOPs (``bench/generation_cost.py``).
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from dp_ops.engine.data import resize
from dp_ops.engine.sampling import Generator
from dp_ops.engine.schedulers import make_scheduler
from dp_ops.errors import GeneratorError

Tensor = torch.Tensor


@dataclass(frozen=True)
class PipelineSettings:
    """How a loaded pipeline samples: conditioning, image sizes, device, precision and memory options."""

    prompt: str = "{name}"  # {name}: the class name (text-conditioned families)
    resolution: int = 0  # side of generated images; 0 = the model's sample_size × the VAE factor
    output_resolution: int = 0  # side of returned (stored) images; 0 = resolution
    learner_resolution: int = 0  # side of the learner's input; 0 = output_resolution
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    vae_slicing: bool = False
    attention_slicing: bool = False
    gradient_checkpointing: bool = False
    scheduler: str = ""  # a name of dp_ops.engine.schedulers.SCHEDULERS; "" = the pipeline's own
    guidance_decoder: str = ""  # an AutoencoderTiny folder or hub id; "" = the pipeline's VAE
    class_ids: tuple[int, ...] = ()  # class-conditioned families: the model's class index per class


def upcast_vae(dtype: torch.dtype, vae_config: Mapping[str, Any]) -> bool:
    """Keep the VAE in float32 in a float16 pipeline when its config asks to (``force_upcast``: SDXL's VAE
    overflows float16's range); AutoencoderKL's default, for configs that do not say (SD-1.5's), is True."""
    return dtype == torch.float16 and bool(vae_config.get("force_upcast", True))


@contextmanager
def quiet_hub_libraries() -> Iterator[None]:
    """Silence diffusers'/transformers' loading logs and progress bars (library code prints nothing)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _, _ in saved:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, verbosity, bar in saved:
            m.set_verbosity(verbosity)
            (m.enable_progress_bar if bar else m.disable_progress_bar)()


@contextmanager
def loading(model: str, family: str, key: str = "generator.model") -> Iterator[None]:
    """Quiet loading whose failures (a missing component, a damaged file) are one ``GeneratorError`` line naming
    ``key``'s value."""
    try:
        with quiet_hub_libraries():
            yield
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GeneratorError(f"{key}={model!r}: cannot load {family}: {reason}") from None


def load_component(cls: Any, model: str, subfolder: str, dtype: torch.dtype) -> Any:
    """One component of the pipeline at ``model``, its weights read in ``dtype`` (without a random init first
    where accelerate is installed)."""
    from diffusers.utils import is_accelerate_available

    kwargs: dict[str, Any] = {"subfolder": subfolder, "torch_dtype": dtype}
    if cls.__module__.startswith("diffusers"):
        kwargs["low_cpu_mem_usage"] = is_accelerate_available()
    return cls.from_pretrained(model, **kwargs)


def load_vae(model: str, dtype: torch.dtype, subfolder: str = "vae") -> Any:
    """The pipeline's AutoencoderKL, kept float32 in a float16 pipeline whose VAE asks to (:func:`upcast_vae`)."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(model, subfolder=subfolder)
    return load_component(AutoencoderKL, model, subfolder, torch.float32 if upcast_vae(dtype, config) else dtype)


def scheduler_config(model: str) -> dict[str, Any]:
    """The pipeline's saved scheduler config (its class and schedule; every scheduler reads the same file)."""
    from diffusers import DDIMScheduler

    return dict(DDIMScheduler.load_config(model, subfolder="scheduler"))


def pipeline_configs(model: str, files: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The JSON configs ``files`` (key -> path in the pipeline) of the pipeline at ``model``, a folder or hub id,
    without any weight; {} for one that cannot be read (the load then says why)."""
    import json
    from pathlib import Path

    from huggingface_hub import hf_hub_download

    configs: dict[str, dict[str, Any]] = {}
    for key, file in files.items():
        try:
            local = Path(model).expanduser() / file
            path = local if Path(model).expanduser().is_dir() else Path(hf_hub_download(model, file))
            config = json.loads(path.read_text())
        except (OSError, ValueError):  # (the hub's errors for a missing repo or file are OSErrors)
            config = {}
        configs[key] = config if isinstance(config, dict) else {}
    return configs


def frozen(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A component on ``device`` in ``dtype``, in eval mode, its weights excluded from autograd (guidance
    differentiates with respect to x_t only)."""
    with quiet_hub_libraries():  # (diffusers warns about casting with .to(): loaded components are in dtype already)
        return module.to(device, dtype).eval().requires_grad_(False)


class LatentGenerator(Generator):
    """A latent pipeline: ``denoiser`` (a UNet or transformer whose config has ``sample_size`` and
    ``in_channels``) over the latents of ``vae``, sampled with ``scheduler_config``'s scheduler (or the one
    ``settings.scheduler`` names). ``multiple``: how many pixels the denoiser's downsampling needs the side to be
    a multiple of, beyond the VAE's factor (a UNet's levels, a transformer's patch)."""

    def __init__(
        self,
        denoiser: Any,
        vae: Any,
        scheduler_config: Mapping[str, Any],
        settings: PipelineSettings,
        multiple: int,
    ) -> None:
        s = settings
        self.settings = s
        self.device, self.dtype = torch.device(s.device), s.dtype
        self.denoiser = frozen(denoiser, self.device, s.dtype)
        self.vae = frozen(vae, self.device, torch.float32 if upcast_vae(s.dtype, vae.config) else s.dtype)
        with quiet_hub_libraries():  # (a swapped-in scheduler warns about the saved one's options it ignores)
            self.scheduler = make_scheduler(scheduler_config, s.scheduler)
        if s.vae_slicing:
            self.vae.enable_slicing()
        if s.attention_slicing and hasattr(self.denoiser, "set_attention_slice"):
            self.denoiser.set_attention_slice("auto")
        if s.gradient_checkpointing:  # (diffusers' default checkpoint function is the non-reentrant one)
            for model in (self.denoiser, self.vae):
                model.enable_gradient_checkpointing()
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = s.resolution or self.denoiser.config.sample_size * self.vae_factor
        if self.resolution % (self.vae_factor * multiple):
            raise GeneratorError(
                f"generator.resolution={self.resolution}: must be a multiple of {self.vae_factor * multiple} "
                "for this model"
            )
        self.output_resolution = s.output_resolution or self.resolution
        self.learner_resolution = s.learner_resolution or self.output_resolution
        self.guidance_vae = self.vae
        if s.guidance_decoder:
            from diffusers import AutoencoderTiny

            with loading(s.guidance_decoder, "an AutoencoderTiny", "generator.guidance_decoder"):
                self.use_guidance_decoder(load_component(AutoencoderTiny, s.guidance_decoder, "", s.dtype))

    def use_guidance_decoder(self, tiny: Any) -> None:
        """Decode x̂0 for guided steps with ``tiny`` (an ``AutoencoderTiny`` for this model's latents) instead of
        the VAE; the final images are still the VAE's."""
        where = self.settings.guidance_decoder or "(built in code)"
        factor = tiny.config.upsampling_scaling_factor ** (len(tiny.config.decoder_block_out_channels) - 1)
        if factor != self.vae_factor or tiny.config.latent_channels != self.noise_shape[0]:
            raise GeneratorError(
                f"generator.guidance_decoder={where!r}: decodes {tiny.config.latent_channels}-channel latents "
                f"{factor}× up, the model's are {self.noise_shape[0]}-channel, {self.vae_factor}× up"
            )
        self.guidance_vae = frozen(tiny, self.device, self.dtype)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_factor
        return (self.denoiser.config.in_channels, side, side)

    @staticmethod
    def decode_with(vae: Any, z0: Tensor) -> Tensor:
        """D(x̂0 / scaling_factor + shift_factor) with ``vae``'s own factors: latents to images in (about)
        [-1, 1], float32; differentiable."""
        cfg = vae.config
        z = z0 / getattr(cfg, "scaling_factor", 1.0) + (getattr(cfg, "shift_factor", None) or 0.0)
        return vae.decode(z.to(vae.dtype)).sample.float()

    def decode(self, z0: Tensor) -> Tensor:
        """The pipeline's own VAE decode of latents."""
        return self.decode_with(self.vae, z0)

    def to_learner(self, z0: Tensor) -> Tensor:
        """How x̂0 becomes the learner's input: decoded with gradient (by the guidance decoder, if one is set),
        resized to the learner's side."""
        return resize(self.decode_with(self.guidance_vae, z0), self.learner_resolution)

    def to_images(self, z0: Tensor) -> Tensor:
        """The final latents as stored images: decoded by the VAE, clamped (it overshoots [-1, 1] a little),
        resized."""
        return resize(self.decode(z0).clamp(-1, 1), self.output_resolution)
