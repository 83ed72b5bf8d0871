"""Memory of one entropy-guided step at SD-1.5 shapes, counted on the meta device: no GPU, no weights, no RAM.

What is counted: the bytes of every tensor autograd saves for the backward pass of one guided step
(``torch.autograd.graph.saved_tensors_hooks``: numel·element size of each saved tensor's storage, each storage
once, parameters and buffers left out since they are resident anyway), per image. That is what a guided step
holds on top of the weights at its peak, the end of the forward pass. Transient buffers inside one op, the
gradients flowing back and the allocator's slack come on top, so a GPU's peak is somewhat higher.

The step is the library's own: :class:`~dp_ops.engine.backends.sd.StableDiffusion`'s ε̂ (classifier-free
guidance: a UNet batch of 2 per image) and ``to_learner`` (VAE decoder, resize to the learner's side), run by
:func:`dp_ops.engine.guidance.entropy_guidance` (x̂0 from ε̂, the learner, the entropy, ``autograd.grad``).
The models are :mod:`dp_ops.engine.backends.sd_random`'s SD-1.5 shapes built under ``torch.device("meta")``
in the row's dtype (``module.to(dtype)``: autocast has no meta device type); the learner is resnet50 at 224²
in float32, 100 classes.

Two stand-ins make the meta device count what a GPU holds:

- Attention. On meta, ``F.scaled_dot_product_attention`` takes its math fallback, which saves every L×L
  probability matrix; on a GPU it runs a fused kernel (flash or memory-efficient) that saves q, k, v, the
  output and a log-sum-exp. The count calls the memory-efficient kernel's own op (it has a meta kernel and
  the same saved set as flash). Sliced attention (``set_attention_slice``) is diffusers' own code on any
  device: it saves each slice's probabilities, which is what the ``sliced`` rows show.
- Gradient checkpointing. ``enable_gradient_checkpointing`` with the function diffusers uses by default
  (``torch.utils.checkpoint``, ``use_reentrant=False``), wrapped to count what it holds: the inputs of each
  checkpointed block stay alive until the backward (kept by the checkpoint, not in autograd's saved
  tensors), and during the backward one block at a time is recomputed (``recompute``: the largest block's
  saved bytes, held briefly on top). ``blocks`` counts the checkpointed calls, so a row shows that
  checkpointing really took effect (diffusers 0.42 checks ``torch.is_grad_enabled()``; older releases, the
  ``create_custom_forward`` ones, checked ``self.training`` in the VAE decoder and did nothing in eval mode,
  where guidance runs).

    .venv/bin/python bench/guided_memory.py            # SD-1.5 shapes at 512², per image
    .venv/bin/python bench/guided_memory.py --tiny     # tiny random components (seconds; the test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import diffusers
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from dp_ops.config import LearnerConfig
from dp_ops.engine.backends.latent import PipelineSettings
from dp_ops.engine.backends.sd import StableDiffusion
from dp_ops.engine.backends.sd_random import random_components
from dp_ops.engine.devices import DTYPES
from dp_ops.engine.guidance import entropy_guidance
from dp_ops.engine.learner import build_learner
from dp_ops.engine.schedulers import x0_at

META = torch.device("meta")
PHASES = ("unet", "vae", "learner", "other")


@dataclass(frozen=True)
class Setup:
    """One row's configuration."""

    dtype: str
    gradient: str  # full: through the UNet and the VAE decoder | x0: VAE decoder and learner only
    checkpointing: bool  # VAE and UNet gradient checkpointing
    attention: str  # fused: what SDPA runs on a GPU | sliced: set_attention_slice("auto")


@dataclass(frozen=True)
class Row:
    """Bytes per image saved for the backward pass, by where they were saved."""

    setup: Setup
    saved: dict[str, float]  # phase -> bytes per image (the checkpointed blocks' inputs included)
    recompute: float  # bytes per image of the largest checkpointed block, re-materialised in the backward
    blocks: int  # checkpointed calls in the step
    weights: float  # bytes of the UNet, VAE, text encoder and learner (not per image)

    @property
    def total(self) -> float:
        return sum(self.saved.values())


@dataclass
class SavedBytes:
    """A pack hook that adds up the storages autograd saves, once each, per phase; ``resident`` storages
    (parameters, buffers) are not counted. Saved tensors are kept referenced until the count ends, so a
    storage's identity is never reused by another one meanwhile."""

    resident: frozenset[int]
    phase: str = "other"
    by_phase: Counter[str] = field(default_factory=Counter)
    _kept: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.resident and key not in self._kept:
            self._kept[key] = t
            self.by_phase[self.phase] += storage.nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())


def storages(*modules: torch.nn.Module) -> frozenset[int]:
    return frozenset(t.untyped_storage()._cdata for m in modules for t in (*m.parameters(), *m.buffers()))


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as the memory-efficient kernel's op (what a GPU runs, and saves)."""
    math_fallback = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or dropout_p or is_causal or kw:  # (never in SD-1.x's UNet and VAE)
            return math_fallback(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        op = torch.ops.aten._scaled_dot_product_efficient_attention
        return op(query, key, value, None, True, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa  # type: ignore[assignment]  # (the same call)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = math_fallback


@dataclass
class Checkpointed:
    """What gradient checkpointing did in one step: blocks checkpointed, the largest block's recompute."""

    blocks: int = 0
    recompute: int = 0  # bytes
    measuring: bool = False

    def function(self, meter: SavedBytes) -> Callable[..., torch.Tensor]:
        """diffusers' default checkpointing function, counting the inputs it keeps and each block's recompute."""

        def checkpoint(module: torch.nn.Module, *args: object) -> torch.Tensor:
            if torch._C._current_autograd_node() is not None:  # a nested block's recompute, in the backward
                return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
            if self.measuring:  # a block nested in the one being measured: its activations are that block's
                return module(*args)
            self.blocks += 1
            for a in args:
                if isinstance(a, torch.Tensor):
                    meter.add(a)
            block = SavedBytes(meter.resident)
            self.measuring = True
            try:
                with block.counting():
                    module(*args)  # (meta: no compute) the tensors its recompute saves during the backward
            finally:
                self.measuring = False
            self.recompute = max(self.recompute, block.total)
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

        return checkpoint


def build(args: argparse.Namespace, setup: Setup) -> tuple[StableDiffusion, torch.nn.Module]:
    """The generator and the learner on meta, in ``setup``'s dtype (the learner in float32)."""
    with META:
        parts = random_components("tiny" if args.tiny else "sd15", seed=0)
        learner = build_learner(LearnerConfig(model=args.learner, drop_rate=0.0), args.classes, 3, seed=0)
    settings = PipelineSettings(
        resolution=args.resolution, learner_resolution=args.learner_size, device="meta", dtype=DTYPES[setup.dtype]
    )
    names = [f"class {k}" for k in range(args.classes)]
    sd = StableDiffusion.from_components(parts, names, settings)
    if setup.attention == "sliced":
        sd.unet.set_attention_slice("auto")  # what generator.attention_slicing sets
    return sd, learner.eval().requires_grad_(False)


def phase_hooks(meter: SavedBytes, modules: dict[str, list[torch.nn.Module]]) -> list:
    """Name what is saved after the module that saved it (``other``: x̂0, CFG, resize, entropy)."""

    def enter(name: str) -> Callable[..., None]:
        return lambda *_: setattr(meter, "phase", name)

    def leave(*_: object) -> None:
        meter.phase = "other"

    handles = []
    for name, ms in modules.items():
        for m in ms:
            handles += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    return handles


def measure(args: argparse.Namespace, setup: Setup) -> Row:
    """One guided step of ``args.n`` images under ``setup``, counted."""
    sd, learner = build(args, setup)
    models = (sd.unet, sd.vae, sd.text_encoder, learner)
    meter = SavedBytes(storages(*models))
    checkpointed = Checkpointed()
    if setup.checkpointing:
        for m in (sd.unet, sd.vae):
            m.enable_gradient_checkpointing(checkpointed.function(meter))
    handles = phase_hooks(
        meter, {"unet": [sd.unet], "vae": [sd.vae.post_quant_conv, sd.vae.decoder], "learner": [learner]}
    )
    scheduler = sd.scheduler
    scheduler.set_timesteps(args.steps)
    t_cpu = scheduler.timesteps[args.steps // 2]  # mid-schedule (the memory does not depend on t)
    t = t_cpu.to(META)
    labels = torch.arange(args.n, device=META) % args.classes
    z_t = torch.empty(args.n, sd.unet.config.in_channels, *2 * [args.resolution // sd.vae_factor], device=META)

    def eps_fn(z: torch.Tensor) -> torch.Tensor:
        return sd.model_output(scheduler.scale_model_input(z, t), t, labels, args.cfg_scale)

    try:
        with fused_attention(), meter.counting():
            entropy_guidance(
                z_t,
                eps_fn,
                x0_at(scheduler, args.steps // 2, t_cpu),
                learner,
                0.05,
                sd.to_learner,
                through_eps=setup.gradient == "full",
            )
    finally:
        for h in handles:
            h.remove()
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return Row(
        setup=setup,
        saved={p: meter.by_phase[p] / args.n for p in PHASES},
        recompute=checkpointed.recompute / args.n,
        blocks=checkpointed.blocks,
        weights=float(weights),
    )


def setups() -> list[Setup]:
    """Every dtype × gradient × checkpointing with fused attention, then sliced attention: what it adds to the
    full gradient, what checkpointing leaves of it, and that the x0 gradient (no UNet backward) does not see it."""
    rows = [
        Setup(dtype, gradient, ckpt, "fused")
        for dtype in ("float32", "bfloat16", "float16")
        for gradient in ("full", "x0")
        for ckpt in (False, True)
    ]
    sliced = [
        ("float32", "full", False),
        ("bfloat16", "full", False),
        ("bfloat16", "full", True),
        ("bfloat16", "x0", False),
    ]
    return rows + [Setup(dtype, gradient, ckpt, "sliced") for dtype, gradient, ckpt in sliced]


def report(args: argparse.Namespace, rows: list[Row]) -> None:
    unit, scale = ("MiB", 2**20) if args.tiny else ("GiB", 2**30)
    print(
        f"# saved for backward by one entropy-guided step, {unit} per image: "
        f"{'tiny random SD' if args.tiny else 'SD-1.5 shapes'} at {args.resolution}², CFG {args.cfg_scale:g} "
        f"(UNet batch 2 per image), learner {args.learner} at {args.learner_size}² (float32), "
        f"{args.n} image(s) per step, models in eval mode, diffusers {diffusers.__version__}, "
        "counted on the meta device"
    )
    head = ["dtype", "gradient", "ckpt", "attention", "UNet", "VAE dec", "learner", "other", "total", "+recompute"]
    print(
        f"{head[0]:<10}{head[1]:<9}{head[2]:<6}{head[3]:<10}" + "".join(f"{h:>11}" for h in head[4:]) + f"{'blocks':>8}"
    )
    for r in rows:
        s = r.setup
        figures = [*(r.saved[p] for p in PHASES), r.total, r.recompute]
        print(
            f"{s.dtype:<10}{s.gradient:<9}{'yes' if s.checkpointing else 'no':<6}{s.attention:<10}"
            + "".join(f"{v / scale:>11.3f}" for v in figures)
            + f"{r.blocks:>8}"
        )
    weights = {r.setup.dtype: r.weights for r in rows}
    print(
        "# weights (UNet, VAE, text encoder, learner): "
        + ", ".join(f"{d} {w / 2**30:.2f} GiB" for d, w in weights.items())
    )
    print(
        "# ckpt: VAE and UNet gradient checkpointing (blocks: checkpointed calls; +recompute: the largest block, "
        "held briefly in the backward); fused: SDPA as a GPU runs it; sliced: set_attention_slice('auto')"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random components at 32² (seconds; the test)")
    ap.add_argument("-n", type=int, default=1, help="images per guided step (figures are per image)")
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=30, help="DDIM steps (the step counted is the middle one)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    args.resolution = 32 if args.tiny else 512
    args.learner, args.learner_size = ("dpops_convnet_tiny", 16) if args.tiny else ("resnet50", 224)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse(argv)
    rows = [measure(args, s) for s in setups()]
    report(args, rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{**asdict(r), "total": r.total} for r in rows], fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
