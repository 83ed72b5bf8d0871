"""The embedded world's generator: a class-conditional pixel diffusion model (diffusers).

A ``UNet2DModel`` with a class embedding predicts ε; one extra class index (``num_classes``) is the
*null* class, learned by label dropout, so sampling can use classifier-free guidance
ε̂ = ε_u + s·(ε_c − ε_u). Sampling is the shared DDIM sampler (:mod:`dp_ops.engine.sampling`), entropy-guided
(:mod:`dp_ops.engine.guidance`) when ω > 0, with its own DDIM scheduler or any of ``generator.scheduler``;
this module supplies ε̂, the noise's shape, and x̂0 as is.

Saved with diffusers' ``save_pretrained`` to ``<path>/unet`` and ``<path>/scheduler``, plus
``<path>/dpops_generator.json``: the folder's layout, its metadata and
:func:`~dp_ops.engine.saved.check_saved` (which :meth:`PixelDiffusion.load` calls first) live in
:mod:`dp_ops.engine.saved`, light enough for the CLI to check a folder before it imports this module.
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel

from dp_ops.config import DataConfig, GeneratorConfig
from dp_ops.engine.data import LabelledImages
from dp_ops.engine.devices import autocast
from dp_ops.engine.sampling import Generator, Progress
from dp_ops.engine.saved import CHECKSUMS, FORMAT_KEY, META_FILE, REDO, GeneratorMeta, check_saved, file_sha256
from dp_ops.engine.schedulers import config_of, make_scheduler
from dp_ops.errors import GeneratorError
from dp_ops.files import atomic_path, write_json
from dp_ops.formats import FORMATS


def build_unet(cfg: GeneratorConfig, resolution: int, num_classes: int, in_channels: int = 1) -> UNet2DModel:
    levels = len(cfg.channels)
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)  # attention only at the coarsest level
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    return UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=cfg.channels,
        layers_per_block=2,
        down_block_types=down,
        up_block_types=up,
        num_class_embeds=num_classes + 1,  # + the null class used for classifier-free guidance
        norm_num_groups=8,
        attention_head_dim=min(cfg.channels[-1], 32),
    )


def build_scheduler() -> DDIMScheduler:
    # Cosine ("squaredcos_cap_v2") noise schedule: better than linear for tiny images.
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


class PixelDiffusion(Generator):
    """A trained UNet plus its scheduler; samples class-conditionally, optionally entropy-guided."""

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler, meta: GeneratorMeta) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.meta = meta
        # the learner reads samples as they are generated (a Trainer resizes to its own input if it must)
        self.learner_resolution = meta.resolution

    @property
    def null_class(self) -> int:
        return self.meta.num_classes

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write atomically: a crash mid-save leaves the old generator at ``path`` (or none), never half of one."""
        with atomic_path(path, folder=True) as tmp:
            self.unet.save_pretrained(tmp / "unet")
            self.scheduler.save_pretrained(tmp / "scheduler")
            files = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
            sums = {f: file_sha256(tmp / f) for f in files}
            write_json(
                tmp / META_FILE, {FORMAT_KEY: FORMATS["generator"].current, **asdict(self.meta), CHECKSUMS: sums}
            )

    def to(self, device: torch.device | str, *, channels_last: bool = False) -> PixelDiffusion:
        """Move the UNet to ``device`` (where the learner runs), in channels-last layout if asked
        (``generator.channels_last``); noise is still drawn on the CPU, so the same seeds give the same
        starting points on every device."""
        self.unet.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return self

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.unet.device

    @classmethod
    def load(cls, path: str | Path, scheduler: str = "") -> PixelDiffusion:
        """The generator saved at ``path``, sampled with its own DDIM scheduler or the one ``scheduler`` names
        (:data:`dp_ops.generators.SCHEDULERS`), its schedule kept."""
        path = Path(path)
        meta = check_saved(path)
        try:
            unet = UNet2DModel.from_pretrained(path / "unet", low_cpu_mem_usage=False)  # no accelerate needed
            saved = DDIMScheduler.from_pretrained(path / "scheduler")
        except Exception as exc:  # (a format-0 folder without checksums, damaged in a way check_saved cannot see)
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
            raise GeneratorError(f"{path}: diffusers cannot load the generator ({cause}); {REDO}") from None
        return cls(unet, make_scheduler(config_of(saved), scheduler) if scheduler else saved, meta)

    def check_matches(self, data: DataConfig) -> None:
        """Refuse a generator trained on another split: it may have seen this run's val/test images."""
        for key, mine, theirs in (
            ("data.resolution", data.resolution, self.meta.resolution),
            ("data.split_seed", data.split_seed, self.meta.split_seed),
            ("data.name", data.name, self.meta.data),
        ):
            if mine != theirs:
                raise GeneratorError(
                    f"{key}={mine!r}: the generator was trained with {theirs!r}; "
                    "retrain it (dpops generator train) or point generator.path elsewhere"
                )

    # ---- the pieces of a denoising step (what the shared sampler, dp_ops.engine.sampling, calls) ----
    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.unet.config.in_channels, self.meta.resolution, self.meta.resolution)

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """ε̂ with classifier-free guidance: ε_u + s·(ε_c − ε_u) (diffusers' convention for s), the
        unconditional half from the null class, in one batched UNet call."""
        n = x_t.shape[0]
        if cfg_scale == 1.0:
            return self.unet(x_t, t.expand(n), class_labels=labels).sample.float()
        null = torch.full_like(labels, self.null_class)
        out = self.unet(torch.cat([x_t, x_t]), t.expand(2 * n), class_labels=torch.cat([labels, null])).sample.float()
        eps_c, eps_u = out[:n], out[n:]
        return eps_u + cfg_scale * (eps_c - eps_u)

    def to_learner(self, x0: torch.Tensor) -> torch.Tensor:
        """Pixels are what the learner reads: x̂0 itself."""
        return x0

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Pixels are the images: the final x_0 itself."""
        return x0


def train_generator(
    cfg: GeneratorConfig, data: LabelledImages, *, meta: GeneratorMeta, seed: int, progress: Progress | None = None
) -> PixelDiffusion:
    """Train the UNet with the standard ε-prediction loss; labels are dropped to the null class with
    probability ``cfg.label_dropout`` so one network is both conditional and unconditional (CFG).
    Weights are an exponential moving average (decay 0.995, a ~200-step horizon) of the trained ones,
    which samples cleaner.
    """
    rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(cfg, meta.resolution, meta.num_classes, in_channels=data.images.shape[1])
    ema = torch.optim.swa_utils.AveragedModel(unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.995))
    scheduler = build_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train_lr, weight_decay=0.0)
    warmup = max(1, cfg.train_iterations // 20)
    unet.train()
    for it in range(cfg.train_iterations):
        lr_factor = min(1.0, (it + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * it / cfg.train_iterations))
        for group in opt.param_groups:
            group["lr"] = cfg.train_lr * lr_factor
        idx = torch.randint(len(data), (cfg.train_batch_size,), generator=rng)
        x0, y = data.images[idx], data.labels[idx].clone()
        y[torch.rand(len(y), generator=rng) < cfg.label_dropout] = meta.num_classes
        noise = torch.randn(x0.shape, generator=rng)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(y),), generator=rng)
        with autocast("cpu", cfg.train_precision):
            eps = unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(unet)
        if progress:
            progress(it + 1, cfg.train_iterations)
    unet.load_state_dict(ema.module.state_dict())
    if not all(bool(torch.isfinite(w).all()) for w in unet.state_dict().values()):
        raise GeneratorError(
            f"generator training diverged (non-finite weights after {cfg.train_iterations} iterations); "
            "lower generator.train_lr"
        )
    return PixelDiffusion(unet, scheduler, meta)
