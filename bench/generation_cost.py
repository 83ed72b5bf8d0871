"""Cost of unguided and entropy-guided generation for every diffusers family, counted before a GPU is booked.

For each family at its real shapes (random weights built on the meta device: no weights, no GPU, seconds here)
and its defaults (steps, CFG scale s, guide_every, guidance gradient), per image:

- FLOPs of one unguided step, and of one guided step with the ``full`` gradient (back through ε̂ and the
  decode of x̂0) and the ``x0`` gradient (ε̂ held constant: back through the decode and the learner only), each
  with the pipeline's VAE decoder D and with a TAESD-sized ``AutoencoderTiny`` as ``generator.guidance_decoder``
  (encoder/decoder widths 64, blocks (1,3,3,3)/(3,3,3,1), 4 latent channels; 16 for SD3's latents, as taesd3),
  split into the denoiser's, the decoder's and the learner's share;
- the whole image's FLOPs at the family's steps and guide_every (steps·U + k·(G − U) + the final decode and
  learner score, k = ⌈steps/guide_every⌉ guided steps) and its ratio to the unguided image;
- the activation bytes a guided step saves for its backward pass (``torch.autograd.graph.saved_tensors_hooks``,
  each storage once, parameters and buffers left out: what it holds on top of the weights at its peak);
- the images/s ceiling those FLOPs imply at an accelerator's peak (``--peak-tflops``; default H100 SXM dense
  bf16): a bound from FLOPs alone, not a measurement (real utilisation is well below peak).

The step is the library's own: the family's generator from ``<Class>.from_components(random_components(size),
…, PipelineSettings(device="meta", dtype=bfloat16))``, one step of :func:`dp_ops.engine.sampling.denoise`
(``steps=1``; ω > 0 and ``guide_every=1`` for a guided one), counted by
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs a multiply-add; the backward pass computes input
gradients only, the weights being frozen). The learner is resnet50 at 224², 100 classes, float32. On the meta
device ``F.scaled_dot_product_attention`` would take its math fallback (every L×L probability matrix saved); the
count calls the memory-efficient kernel's op instead, what a GPU runs (the same FLOPs, its saved set). The text
encoders run once per class at construction, not per image: not counted.

    .venv/bin/python bench/generation_cost.py                         # every family present, real shapes
    .venv/bin/python bench/generation_cost.py --families sd,sd3 --peak-tflops 1979
    .venv/bin/python bench/generation_cost.py --families sd --tiny    # tiny random components (the test)
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dp_ops.config import LearnerConfig
from dp_ops.engine.backends.latent import PipelineSettings, quiet_hub_libraries
from dp_ops.engine.data import resize
from dp_ops.engine.guidance import entropy
from dp_ops.engine.learner import build_learner
from dp_ops.engine.sampling import denoise

META = torch.device("meta")
H100_BF16_DENSE = 989.0  # TFLOP/s, H100 SXM, dense bf16 tensor cores
PHASES = ("denoiser", "decoder", "learner")
ATTENTION: Counter[str] = Counter()  # attention calls counted, by how: fused (the GPU's kernel) | math (fallback)


@dataclass(frozen=True)
class Family:
    """A diffusers family as dp_ops drives it: its adapter, its real-shaped random components and defaults."""

    key: str
    module: str  # dp_ops.engine.backends.<module> (and <module>_random)
    cls: str
    size: str  # the random_components size with the real model's shapes
    resolution: int
    steps: int
    cfg_scale: float
    guide_every: int
    gradient: str  # the family's default generator.guidance_gradient


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family("sd", "sd", "StableDiffusion", "sd15", 512, 30, 4.0, 5, "full"),
        Family("sdxl", "sdxl", "StableDiffusionXL", "sdxl", 1024, 30, 5.0, 5, "full"),
        Family("dit", "dit", "DiT", "dit-xl-2-256", 256, 25, 4.0, 5, "full"),
        Family("sd3", "sd3", "StableDiffusion3", "sd3-medium", 1024, 28, 7.0, 4, "x0"),
    )
}
STEPS = (("unguided", "", ""), *((f"guided {g}", g, d) for g in ("full", "x0") for d in ("vae", "tiny")))


@dataclass(frozen=True)
class Count:
    """One counted step (or final decode): FLOPs by phase and bytes saved for the backward pass, per image."""

    flops: dict[str, float]  # phase (denoiser, decoder, learner, other) -> FLOPs per image
    saved: float  # bytes per image

    @property
    def total(self) -> float:
        return sum(self.flops.values())


@dataclass(frozen=True)
class Row:
    """One step kind of one family, per image."""

    family: str
    shape: str
    step: str  # unguided | guided full | guided x0
    decoder: str  # "" (unguided) | vae | tiny
    default: bool  # the family's default guidance gradient, with the pipeline's VAE
    step_flops: dict[str, float]
    image_flops: float
    image_ratio: float
    saved_bytes: float
    ceiling: float  # images/s at --peak-tflops
    error: str = ""

    @property
    def step_total(self) -> float:
        return sum(self.step_flops.values())


@dataclass
class SavedBytes:
    """A pack hook adding up the storages autograd saves, each once; ``resident`` storages (parameters, buffers)
    are left out. Saved tensors stay referenced until the count ends, so no storage's identity is reused."""

    resident: frozenset[int]
    total: int = 0
    _kept: dict[int, torch.Tensor] = field(default_factory=dict)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.resident and key not in self._kept:
            self._kept[key] = t
            self.total += storage.nbytes()
        return t

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self


def storages(*modules: torch.nn.Module) -> frozenset[int]:
    return frozenset(t.untyped_storage()._cdata for m in modules for t in (*m.parameters(), *m.buffers()))


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as the memory-efficient kernel's op: what a GPU runs and saves (the
    meta device would take the math fallback, which saves every probability matrix)."""
    math_fallback = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if dropout_p or is_causal or kw or query.ndim != 4:
            ATTENTION["math"] += 1
            return math_fallback(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        bias = None if attn_mask is None else attn_mask.to(query.dtype).expand(*query.shape[:-1], key.shape[-2])
        ATTENTION["fused"] += 1
        op = torch.ops.aten._scaled_dot_product_efficient_attention
        return op(query, key, value, bias, True, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa  # type: ignore[assignment]  # (the same call)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = math_fallback


class Phases:
    """Which model is running, kept by forward pre/post hooks and, in the backward pass, by gradient hooks on
    each model call's outputs (its backward begins) and inputs (it ends): each op's FLOPs go to its phase."""

    def __init__(self, modules: dict[str, list[torch.nn.Module]]) -> None:
        self.current = "other"
        self.handles = [
            h
            for name, ms in modules.items()
            for m in ms
            for h in (
                m.register_forward_pre_hook(self._enter(name), with_kwargs=True),
                m.register_forward_hook(self._leave(name), with_kwargs=True),
            )
        ]

    @staticmethod
    def _grad_tensors(*trees: object) -> list[torch.Tensor]:
        leaves = torch.utils._pytree.tree_leaves(trees)
        return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]

    def _set(self, name: str) -> Callable[..., None]:
        return lambda *_: setattr(self, "current", name)

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.current = name
            if torch.is_grad_enabled() and (inputs := self._grad_tensors(args, kwargs)):
                torch.autograd.graph.register_multi_grad_hook(inputs, self._set("other"), mode="any")

        return hook

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            self.current = "other"
            if torch.is_grad_enabled() and (outputs := self._grad_tensors(out)):
                torch.autograd.graph.register_multi_grad_hook(outputs, self._set(name), mode="any")

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class PhaseFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """FLOPs of each op (``torch.utils.flop_counter``'s formulas) added to the phase running it."""

    def __init__(self, phases: Phases) -> None:
        super().__init__()
        self.phases = phases
        self.flops: Counter[str] = Counter()
        self.counter = FlopCounterMode(display=False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func._overloadpacket
        if packet in self.counter.flop_registry:
            flop = self.counter.flop_registry[packet](*args, **(kwargs or {}), out_val=out)
            self.flops[self.phases.current] += flop
        return out


def tiny_decoder(latent_channels: int, levels: int = 4, width: int = 64) -> Any:
    """An ``AutoencoderTiny`` with TAESD's shapes (4 levels of 64 channels; diffusers' defaults are TAESD's
    config), for ``latent_channels``-channel latents; ``levels``/``width`` smaller for the tiny pipelines."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(width,) * levels,
        decoder_block_out_channels=(width,) * levels,
        num_encoder_blocks=(1,) + (3,) * (levels - 1),
        num_decoder_blocks=(3,) * (levels - 1) + (1,),
        latent_channels=latent_channels,
    )


def missing(family: Family) -> str:
    """Why ``family``'s adapter cannot be counted here (its files not there yet), or ''."""
    for name in (family.module, f"{family.module}_random"):
        if importlib.util.find_spec(f"dp_ops.engine.backends.{name}") is None:
            return f"dp_ops/engine/backends/{name}.py is not there"
    return ""


def build(args: argparse.Namespace, family: Family, decoder: str) -> tuple[Any, torch.nn.Module]:
    """The family's generator on meta in bfloat16 (its guidance decoder swapped for a TAESD-sized
    ``AutoencoderTiny`` when ``decoder == "tiny"``) and the learner."""
    adapter = importlib.import_module(f"dp_ops.engine.backends.{family.module}")
    random = importlib.import_module(f"dp_ops.engine.backends.{family.module}_random")
    cls = getattr(adapter, family.cls)
    with META, quiet_hub_libraries():
        parts = random.random_components("tiny" if args.tiny else family.size, seed=0)
        learner = build_learner(LearnerConfig(model=args.learner, drop_rate=0.0), args.classes, 3, seed=0)
    settings = PipelineSettings(
        resolution=args.resolution or (0 if args.tiny else family.resolution),
        learner_resolution=args.learner_size,
        device="meta",
        dtype=torch.bfloat16,
        class_ids=tuple(range(args.classes)),
    )
    names = [f"class {k}" for k in range(args.classes)]
    gen = cls.from_components(parts, names, settings)
    if decoder == "tiny":  # (as many latent channels as the model's: 16 for SD3's, as taesd3)
        with META:
            tiny = tiny_decoder(gen.noise_shape[0], len(gen.vae.config.block_out_channels), 8 if args.tiny else 64)
        gen.use_guidance_decoder(tiny)
    return gen, learner.eval().requires_grad_(False)


def decoding(vae: Any) -> list[torch.nn.Module]:
    """The modules a VAE's ``decode`` calls (it is a method, not the VAE's forward)."""
    return [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if isinstance(m, torch.nn.Module)]


def count(gen: Any, learner: torch.nn.Module, run: Callable[[], None], batch: int) -> Count:
    """FLOPs by phase and saved bytes of ``run()``, per image."""
    modules = {"denoiser": [gen.denoiser], "decoder": decoding(gen.guidance_vae), "learner": [learner]}
    if gen.guidance_vae is not gen.vae:
        modules["final decoder"] = decoding(gen.vae)  # (the final decode, by the pipeline's own VAE)
    phases = Phases(modules)
    meter = SavedBytes(storages(gen.denoiser, gen.vae, gen.guidance_vae, learner))
    flops = PhaseFlops(phases)
    try:
        with fused_attention(), meter.counting(), flops:
            run()
    finally:
        phases.remove()
    by_phase = {p: flops.flops[p] / batch for p in PHASES}
    by_phase["decoder"] += flops.flops["final decoder"] / batch
    by_phase["other"] = flops.flops["other"] / batch
    return Count(by_phase, meter.total / batch)


def step(gen: Any, learner: torch.nn.Module, family: Family, batch: int, gradient: str, classes: int) -> Count:
    """One step of the library's sampler (``denoise`` with one timestep): guided with ``gradient``, or unguided."""
    labels = torch.arange(batch) % classes
    seeds = np.arange(batch)
    omega = 0.05 if gradient else 0.0

    def run() -> None:
        denoise(
            gen,
            labels,
            seeds,
            steps=1,
            cfg_scale=family.cfg_scale,
            learner=learner,
            omega=omega,
            guide_every=1,
            gradient=gradient or "full",
        )

    return count(gen, learner, run, batch)


def final(gen: Any, learner: torch.nn.Module, batch: int) -> Count:
    """What ``Generator.sample`` does once per image after the last step: the VAE decode and the learner's score."""

    def run() -> None:
        with torch.no_grad():
            x = gen.to_images(torch.empty(batch, *gen.noise_shape, device=META)).clamp(-1, 1)
            entropy(learner(resize(x, gen.learner_resolution)))

    return count(gen, learner, run, batch)


def measure(args: argparse.Namespace, family: Family) -> list[Row]:
    """The rows of one family: unguided, then each guided step × decoder, with the whole image's cost."""
    steps, every = args.steps or family.steps, family.guide_every
    guided_steps = math.ceil(steps / every)
    counts: dict[tuple[str, str], Count] = {}
    shape = ""
    for decoder in ("vae", "tiny"):
        gen, learner = build(args, family, decoder)
        shape = f"{'tiny' if args.tiny else family.size} {gen.resolution}²"
        if decoder == "vae":
            counts["unguided", ""] = step(gen, learner, family, args.batch, "", args.classes)
            counts["final", ""] = final(gen, learner, args.batch)
        for gradient in ("full", "x0"):
            counts[f"guided {gradient}", decoder] = step(gen, learner, family, args.batch, gradient, args.classes)
    unguided, last = counts["unguided", ""].total, counts["final", ""].total
    plain_image = steps * unguided + last
    rows = []
    for name, gradient, decoder in STEPS:
        c = counts[name, decoder]
        image = plain_image + (guided_steps * (c.total - unguided) if gradient else 0.0)
        rows.append(
            Row(
                family=family.key,
                shape=shape,
                step=name,
                decoder=decoder,
                default=gradient == family.gradient and decoder == "vae",
                step_flops=c.flops,
                image_flops=image,
                image_ratio=image / plain_image,
                saved_bytes=c.saved,
                ceiling=args.peak_tflops * 1e12 / image,
            )
        )
    return rows


def failed(family: Family, why: str) -> Row:
    return Row(family.key, family.size, "", "", False, {}, math.nan, math.nan, math.nan, math.nan, why)


@dataclass(frozen=True)
class Units:
    """FLOPs and bytes as printed: TFLOP and GiB at real shapes, GFLOP and MiB for the tiny pipelines."""

    flop: str = "TFLOP"
    flops: float = 1e12
    mem: str = "GiB"
    bytes: float = 2**30

    def head(self) -> str:
        return (
            f"{'family':<22}{'step':<13}{'decoder':<9}{self.flop + '/step':>11}{'denoiser':>10}{'decoder':>9}"
            f"{'learner':>9}{'x unguided':>11}{self.flop + '/image':>12}{'x image':>9}{'saved ' + self.mem:>10}"
            f"{'img/s ceiling':>14}"
        )

    def line(self, r: Row, unguided_step: float) -> str:
        name = f"{r.family} {r.shape}"
        if r.error:
            return f"{name:<22}not counted: {r.error}"
        f, u = r.step_flops, self.flops
        return (
            f"{name:<22}{r.step + ('*' if r.default else ''):<13}{r.decoder or '-':<9}{r.step_total / u:>11.3f}"
            + "".join(f"{f[p] / u:>{w}.3f}" for p, w in zip(PHASES, (10, 9, 9), strict=True))
            + f"{r.step_total / unguided_step:>11.2f}{r.image_flops / u:>12.1f}{r.image_ratio:>9.2f}"
            + f"{r.saved_bytes / self.bytes:>10.2f}{r.ceiling:>14.2f}"
        )


def report(args: argparse.Namespace, rows: list[Row]) -> None:
    print(
        f"# FLOPs per image (batch {args.batch} per counted step), models in bfloat16 on the meta device, "
        f"learner {args.learner} at {args.learner_size}² (float32, {args.classes} classes), "
        f"diffusers {diffusers.__version__}, torch {torch.__version__}"
    )
    print(
        "# defaults: "
        + "; ".join(
            f"{f.key} {args.steps or f.steps} steps, CFG {f.cfg_scale:g}, guided every {f.guide_every} "
            f"({math.ceil((args.steps or f.steps) / f.guide_every)} guided), gradient {f.gradient}"
            for f in FAMILIES.values()
            if f.key in {r.family for r in rows}
        )
    )
    units = Units("GFLOP", 1e9, "MiB", 2**20) if args.tiny else Units()
    print(units.head())
    unguided = {r.family: r.step_total for r in rows if r.step == "unguided"}
    for r in rows:
        print(units.line(r, unguided.get(r.family, math.nan)))
    print(
        "# decoder: the guided step's decode of x̂0 (vae: the pipeline's VAE decoder; tiny: a TAESD-sized "
        "AutoencoderTiny as generator.guidance_decoder; the final decode is always the VAE); * the family's "
        "default gradient"
    )
    print(
        f"# {units.flop}/image: the whole image at its family's steps and guide_every, final VAE decode and "
        f"learner score included; x image: against the unguided image; saved {units.mem}: activations a guided "
        "step keeps for its backward pass, on top of the weights"
    )
    if ATTENTION["math"]:
        print(f"# attention: {ATTENTION['math']} of {ATTENTION.total()} calls took the math fallback (saves L×L)")
    print(
        f"# img/s ceiling: {args.peak_tflops:g} TFLOP/s (--peak-tflops; default H100 SXM dense bf16) divided by "
        "the image's FLOPs: a bound from FLOPs alone, not a measurement"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE, help="accelerator peak, TFLOP/s")
    ap.add_argument("--batch", type=int, default=1, help="images per counted step (figures are per image)")
    ap.add_argument("--resolution", type=int, default=0, help="override every family's side (default: its own)")
    ap.add_argument("--steps", type=int, default=0, help="override every family's step count (default: its own)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--tiny", action="store_true", help="each family's tiny random components (the test)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    args.family_list = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.family_list if f not in FAMILIES]
    if unknown or not args.family_list:
        ap.error(f"--families={args.families!r}: each must be one of {', '.join(FAMILIES)}")
    if args.batch < 1:
        ap.error(f"--batch={args.batch}: must be at least 1")
    args.learner, args.learner_size = ("dpops_convnet_tiny", 16) if args.tiny else ("resnet50", 224)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse(argv)
    t0 = time.perf_counter()
    rows: list[Row] = []
    for key in args.family_list:
        family = FAMILIES[key]
        why = missing(family)
        if not why:
            try:
                rows += measure(args, family)
                continue
            except Exception as exc:  # (one family's failure is its row; the others are still counted)
                text = str(exc).strip()
                why = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        rows.append(failed(family, why))
    report(args, rows)
    print(f"# counted in {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{**asdict(r), "step_total": r.step_total} for r in rows], fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
