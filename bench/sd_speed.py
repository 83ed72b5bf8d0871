"""Images/s of unguided vs entropy-guided sampling for every diffusers family, their cost ratio and peak GPU
memory, eager against ``torch.compile`` and channels-last side by side.

Builds the family's pipeline with random weights at the real model's shapes on the device (no download anywhere:
speed and memory depend on the shapes, not on the weights; the components are initialised on the device itself)
and samples through the library (:meth:`dp_ops.engine.sampling.Generator.sample`) at the family's defaults,
entropy guidance through the decode of x̂0 and a timm learner at its input size:

    sd    SD-1.5 at 512², 30 DDIM steps, CFG 4, guided every 5th step (the paper's 1.82× is printed beside it)
    sdxl  SDXL-base at 1024², 30 Euler steps, CFG 5, guided every 5th
    dit   DiT-XL/2 at 256², 25 DDIM steps, CFG 4, guided every 5th
    sd3   SD3-medium at 1024², 28 flow-Euler steps, CFG 7, guided every 4th, the ``x0`` gradient by default

Variants (each mode measured in each): ``eager``; ``--compile`` adds the denoiser and the VAE decoders under
``torch.compile`` (wrappers made once, sharing the weights; compiled in the warm-up, so ``-n`` must be a multiple
of ``--batch-size``); ``--channels-last`` adds the denoiser's and decoders' convolution weights in channels-last
memory format; both together add the combination.

    .venv/bin/python bench/sd_speed.py                              # GPU: SD-1.5 shapes, bf16
    .venv/bin/python bench/sd_speed.py --family sdxl --compile --channels-last
    .venv/bin/python bench/sd_speed.py --family sd3 --gradient full x0 -n 8 --batch-size 4
    .venv/bin/python bench/sd_speed.py --cpu --family dit           # CPU smoke check: tiny random components

Modes are measured in interleaved repeats (best of), after a warm-up, so drifting load hits each alike. A mode
that fails (out of memory, a device error) is reported as FAILED with its first error line, the others still
run, and the script exits 1 (``--json`` rows carry ``error``).
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import argparse
import importlib
import json
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from dp_ops.config import LearnerConfig, TrainConfig
from dp_ops.engine.backends.latent import PipelineSettings
from dp_ops.engine.devices import DTYPES, resolve_device, resolve_dtype
from dp_ops.engine.learner import Trainer, build_learner

PAPER_RATIO = 1.82  # SD-1.5 on an H100, guided every 5th step


@dataclass(frozen=True)
class Family:
    """A family's adapter, its real-shaped random components and its sampling defaults."""

    module: str  # dp_ops.engine.backends.<module> (and <module>_random)
    cls: str
    size: str
    title: str
    resolution: int
    steps: int
    cfg_scale: float
    guide_every: int
    gradient: str


FAMILIES: dict[str, Family] = {
    "sd": Family("sd", "StableDiffusion", "sd15", "SD-1.5", 512, 30, 4.0, 5, "full"),
    "sdxl": Family("sdxl", "StableDiffusionXL", "sdxl", "SDXL", 1024, 30, 5.0, 5, "full"),
    "dit": Family("dit", "DiT", "dit-xl-2-256", "DiT-XL/2", 256, 25, 4.0, 5, "full"),
    "sd3": Family("sd3", "StableDiffusion3", "sd3-medium", "SD3-medium", 1024, 28, 7.0, 4, "x0"),
}


@dataclass(frozen=True)
class Variant:
    """How the models run: eager or compiled, convolution weights contiguous or channels-last."""

    compiled: bool = False
    channels_last: bool = False

    @property
    def name(self) -> str:
        return "+".join(n for n, on in (("compile", self.compiled), ("channels-last", self.channels_last)) if on) or (
            "eager"
        )


EAGER = Variant()


class Mode(NamedTuple):
    """One measured way of sampling: unguided or guided (ω, every, gradient), in one variant."""

    name: str  # unguided | guided full | guided x0
    omega: float
    every: int
    gradient: str
    variant: Variant = EAGER

    @property
    def key(self) -> str:
        return self.name if self.variant == EAGER else f"{self.name} ({self.variant.name})"


class Switch:
    """Puts one generator into a variant at a time: the denoiser (every attribute of the generator that holds it)
    and each VAE's decoder swapped for their compiled wrappers or back, the convolution weights converted to the
    variant's memory format. Nothing is copied but the weights' layout."""

    def __init__(self, gen: Any) -> None:
        self.gen = gen
        self.denoiser = gen.denoiser
        self.vaes = list({id(v): v for v in (gen.vae, gen.guidance_vae)}.values())
        self.decoders = [vae.decoder for vae in self.vaes]
        self.compiled: tuple[Any, list[Any]] | None = None
        self.current = EAGER

    def apply(self, v: Variant) -> None:
        if v == self.current:
            return
        fmt = torch.channels_last if v.channels_last else torch.contiguous_format
        for m in (self.denoiser, *self.decoders):
            m.to(memory_format=fmt)
        if v.compiled and self.compiled is None:
            self.compiled = (torch.compile(self.denoiser), [torch.compile(d) for d in self.decoders])
        denoiser, decoders = self.compiled if v.compiled and self.compiled else (self.denoiser, self.decoders)
        for name, value in list(vars(self.gen).items()):
            if value is self.denoiser or (self.compiled and value is self.compiled[0]):
                setattr(self.gen, name, denoiser)
        for vae, decoder in zip(self.vaes, decoders, strict=True):
            vae.decoder = decoder
        self.current = v


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd", choices=sorted(FAMILIES))
    ap.add_argument("--tiny", action="store_true", help="the family's tiny random components, for a CPU smoke check")
    ap.add_argument("--cpu", action="store_true", help="--tiny on the CPU (the tests)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("-n", type=int, default=None, help="images per measurement (default 32; tiny 8)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="default: the family's")
    ap.add_argument("--guide-every", type=int, default=None, help="default: the family's")
    ap.add_argument("--cfg-scale", type=float, default=None, help="default: the family's")
    ap.add_argument("--omega", type=float, default=0.05)
    ap.add_argument(
        "--gradient",
        nargs="+",
        default=None,
        choices=["full", "x0"],
        help="generator.guidance_gradient: one guided mode each (e.g. --gradient full x0; default: the family's)",
    )
    ap.add_argument("--resolution", type=int, default=None, help="default: the family's (tiny: the model's own)")
    ap.add_argument("--learner", default=None, help="timm model (default resnet50; tiny dpops_convnet_tiny)")
    ap.add_argument("--learner-size", type=int, default=None, help="learner input side (default 224; tiny 16)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also measure under torch.compile (denoiser, decoders)")
    ap.add_argument("--channels-last", action="store_true", help="also measure with channels-last conv weights")
    ap.add_argument(
        "--tiny-decoder",
        action="store_true",
        help="guided steps decode x̂0 with a TAESD-sized AutoencoderTiny (generator.guidance_decoder; random weights)",
    )
    ap.add_argument("--vae-slicing", action="store_true")
    ap.add_argument("--attention-slicing", action="store_true")
    ap.add_argument(
        "--gradient-checkpointing", action="store_true", help="denoiser and VAE (generator.gradient_checkpointing)"
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.cpu:
        args.tiny, args.device = True, "cpu"
    family = FAMILIES[args.family]
    tiny = args.tiny
    args.n = args.n or (8 if tiny else 32)
    args.steps = args.steps or family.steps
    args.guide_every = args.guide_every or family.guide_every
    args.cfg_scale = family.cfg_scale if args.cfg_scale is None else args.cfg_scale
    args.gradient = args.gradient or [family.gradient]
    args.resolution = args.resolution or (0 if tiny else family.resolution)
    args.learner = args.learner or ("dpops_convnet_tiny" if tiny else "resnet50")
    args.learner_size = args.learner_size or (16 if tiny else 224)
    if args.compile and args.n % args.batch_size:
        ap.error(f"--compile with -n {args.n}: must be a multiple of --batch-size {args.batch_size} (no recompile)")
    return args


def variants(args: argparse.Namespace) -> list[Variant]:
    return [Variant(c, cl) for c in (False, True)[: 1 + args.compile] for cl in (False, True)[: 1 + args.channels_last]]


def tiny_decoder(latent_channels: int, levels: int = 4, width: int = 64) -> Any:
    """An ``AutoencoderTiny`` with TAESD's shapes (diffusers' defaults are TAESD's config) for
    ``latent_channels``-channel latents (16: taesd3); ``levels``/``width`` smaller for the tiny pipelines."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(width,) * levels,
        decoder_block_out_channels=(width,) * levels,
        num_encoder_blocks=(1,) + (3,) * (levels - 1),
        num_decoder_blocks=(3,) * (levels - 1) + (1,),
        latent_channels=latent_channels,
    )


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Trainer]:
    """The family's generator, its random components initialised on ``device``, and the learner."""
    family = FAMILIES[args.family]
    adapter = importlib.import_module(f"dp_ops.engine.backends.{family.module}")
    random = importlib.import_module(f"dp_ops.engine.backends.{family.module}_random")
    with device:
        parts = random.random_components("tiny" if args.tiny else family.size, seed=0)
    names = [f"class {i}" for i in range(args.classes)]
    settings = PipelineSettings(
        resolution=args.resolution,
        learner_resolution=args.learner_size,
        device=str(device),
        dtype=dtype,
        vae_slicing=args.vae_slicing,
        attention_slicing=args.attention_slicing,
        gradient_checkpointing=args.gradient_checkpointing,
        class_ids=tuple(range(args.classes)),  # (class-conditioned families: model class k for class k)
    )
    gen = getattr(adapter, family.cls).from_components(parts, names, settings)
    if args.tiny_decoder:
        with device:
            tiny = tiny_decoder(gen.noise_shape[0], len(gen.vae.config.block_out_channels), 8 if args.tiny else 64)
        gen.use_guidance_decoder(tiny)
    model = build_learner(LearnerConfig(model=args.learner, drop_rate=0.0), args.classes, 3, seed=0)
    return gen, Trainer(model, TrainConfig(), 0, input_size=args.learner_size, device=device)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or "auto", device)
    if device.type != "cuda" and not args.tiny and args.resolution > 64:
        raise SystemExit(
            f"full-size {FAMILIES[args.family].title} at {args.resolution}² on a CPU takes hours: use --cpu "
            "(or --tiny, or --resolution 64), or a GPU"
        )
    if args.compile:  # (one compiled graph per variant × grad mode × batch shape: more than the default allows)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    gen, learner = build(args, device, dtype)
    modes = [
        Mode(name, omega, every, gradient, v)
        for v in variants(args)
        for name, omega, every, gradient in [
            ("unguided", 0.0, 1, "full"),
            *((f"guided {g}", args.omega, args.guide_every, g) for g in args.gradient),
        ]
    ]
    best, errors = measure(args, device, gen, learner, modes, Switch(gen))
    report(args, device, dtype, modes, best, errors)
    if errors:
        raise SystemExit(1)


def measure(
    args: argparse.Namespace,
    device: torch.device,
    gen: Any,
    learner: Trainer,
    modes: list[Mode],
    switch: Switch | None = None,
) -> tuple[dict[str, tuple[float, float | None]], dict[str, str]]:
    """Best seconds and highest peak GiB per mode (by :attr:`Mode.key`), and the first line of the error of each
    mode that failed (out of memory, a device error): a failed mode is left out of the later repeats, the others
    go on. ``switch`` puts the generator into each mode's variant before it is timed."""
    labels = torch.arange(args.n) % args.classes
    seeds = np.arange(args.n)
    best: dict[str, tuple[float, float | None]] = {}
    errors: dict[str, str] = {}

    def seconds(mode: Mode, n: int) -> tuple[float, float | None] | None:
        try:
            if switch is not None:
                switch.apply(mode.variant)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            gen.sample(
                labels[:n],
                seeds[:n],
                steps=args.steps,
                cfg_scale=args.cfg_scale,
                learner=learner.classify,
                omega=mode.omega,
                guide_every=mode.every,
                gradient=mode.gradient,
                batch_size=args.batch_size,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # (reported in the table; the other modes still run)
            errors[mode.key] = first_line(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return time.perf_counter() - t0, peak

    for mode in modes:  # warm-up: kernels, allocator, autograd graph, compilation
        seconds(mode, min(args.n, args.batch_size))
    for _ in range(args.repeats):
        for mode in modes:
            if mode.key not in errors and (measured := seconds(mode, args.n)):
                s, peak = best.get(mode.key, measured)
                best[mode.key] = (min(s, measured[0]), None if peak is None else max(peak, measured[1] or 0.0))
    return best, errors


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def report(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    modes: list[Mode],
    best: dict[str, tuple[float, float | None]],
    errors: dict[str, str],
) -> None:
    """The table: per mode and variant, images/s, its cost against unguided in the same variant, its speed-up
    over the same mode eager, and peak memory."""
    family = FAMILIES[args.family]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shapes = f"tiny random {args.family}" if args.tiny else f"{family.title}-shaped random"
    decoder = "a TAESD-sized AutoencoderTiny" if args.tiny_decoder else "the VAE"
    print(
        f"# {shapes} weights on {gpu}, {dtype}, {args.resolution or 'model'}², {args.steps} steps, "
        f"CFG {args.cfg_scale:g}, batch {args.batch_size}, {args.n} images, learner {args.learner} at "
        f"{args.learner_size}², ω={args.omega:g}, guided every {args.guide_every} through {decoder}, "
        f"best of {args.repeats} interleaved repeats"
    )
    print(f"{'mode':<14}{'variant':<23}{'img/s':>10}{'s/img':>10}{'cost ratio':>12}{'vs eager':>10}{'peak GiB':>10}")
    rows: list[dict[str, object]] = []
    for mode in modes:
        v = mode.variant.name
        if mode.key in errors:
            rows.append({"mode": mode.name, "variant": v, "error": errors[mode.key]})
            print(f"{mode.name:<14}{v:<23}FAILED: {errors[mode.key]}")
            continue
        s, peak = best[mode.key]
        base = best.get(mode._replace(name="unguided", omega=0.0, every=1, gradient="full").key, (float("nan"),))[0]
        eager = best.get(mode._replace(variant=EAGER).key, (float("nan"),))[0]
        row = {"mode": mode.name, "variant": v, "images_per_s": args.n / s, "seconds_per_image": s / args.n}
        rows.append({**row, "cost_ratio": s / base, "speedup_vs_eager": eager / s, "peak_gib": peak, "error": None})
        mem = f"{'n/a':>10}" if peak is None else f"{peak:>10.1f}"
        print(f"{mode.name:<14}{v:<23}{args.n / s:>10.2f}{s / args.n:>10.3f}{s / base:>12.2f}{eager / s:>10.2f}{mem}")
    if family.module == "sd" and not args.tiny:
        print(f"{'paper (H100)':<14}{'':<23}{'':>10}{'':>10}{PAPER_RATIO:>12.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            out = {"args": vars(args), "device": gpu, "dtype": str(dtype), "rows": rows}
            json.dump(out, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
