"""Images/s of unguided vs entropy-guided Stable Diffusion sampling, their cost ratio and peak GPU memory.

Builds an SD-1.5-shaped pipeline with random weights on the device (no download anywhere: speed and
memory depend on the shapes, not on the weights): UNet 320/640/1280/1280 with cross-attention 768, the
4-level VAE, a 12-layer 768-wide CLIP text encoder. Samples at 512² with 30 DDIM steps and CFG, entropy
guidance every 5th step through the VAE decoder and a timm learner at its input size, and prints a table
next to the paper's 1.82× (SD-1.5 on an H100).

    .venv/bin/python bench/sd_speed.py                      # GPU: full size, bf16
    .venv/bin/python bench/sd_speed.py --tiny               # CPU smoke check: tiny random components
    .venv/bin/python bench/sd_speed.py --dtype float16 -n 64 --batch-size 16 --json out.json
    .venv/bin/python bench/sd_speed.py --gradient full x0   # both guidance gradients, one guided mode each

Modes are measured in interleaved repeats (best of), after a warm-up, so drifting load hits each alike. A mode
that fails (out of memory, a device error) is reported as FAILED with its first error line, the others still
run, and the script exits 1 (``--json`` rows carry ``error``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dp_ops.config import LearnerConfig, TrainConfig
from dp_ops.engine.backends.sd import SDSettings, StableDiffusion
from dp_ops.engine.backends.sd_random import random_components
from dp_ops.engine.devices import DTYPES, resolve_device, resolve_dtype
from dp_ops.engine.learner import Trainer, build_learner

PAPER_RATIO = 1.82


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random components at 32², for a CPU smoke check")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("-n", type=int, default=None, help="images per measurement (default 32; tiny 8)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guide-every", type=int, default=5)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--omega", type=float, default=0.05)
    ap.add_argument(
        "--gradient",
        nargs="+",
        default=["full"],
        choices=["full", "x0"],
        help="generator.guidance_gradient: one guided mode each (e.g. --gradient full x0)",
    )
    ap.add_argument("--resolution", type=int, default=None, help="default 512; tiny 32")
    ap.add_argument("--learner", default=None, help="timm model (default resnet50; tiny dpops_convnet_tiny)")
    ap.add_argument("--learner-size", type=int, default=None, help="learner input side (default 224; tiny 16)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vae-slicing", action="store_true")
    ap.add_argument("--attention-slicing", action="store_true")
    ap.add_argument(
        "--gradient-checkpointing", action="store_true", help="UNet and VAE decoder (generator.gradient_checkpointing)"
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    tiny = args.tiny
    args.n = args.n or (8 if tiny else 32)
    args.resolution = args.resolution or (32 if tiny else 512)
    args.learner = args.learner or ("dpops_convnet_tiny" if tiny else "resnet50")
    args.learner_size = args.learner_size or (16 if tiny else 224)
    return args


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[StableDiffusion, Trainer]:
    parts = random_components("tiny" if args.tiny else "sd15", seed=0)
    names = [f"class {i}" for i in range(args.classes)]
    settings = SDSettings(
        resolution=args.resolution,
        learner_resolution=args.learner_size,
        device=str(device),
        dtype=dtype,
        vae_slicing=args.vae_slicing,
        attention_slicing=args.attention_slicing,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    sd = StableDiffusion.from_components(parts, names, settings)
    model = build_learner(LearnerConfig(model=args.learner, drop_rate=0.0), args.classes, 3, seed=0)
    return sd, Trainer(model, TrainConfig(), 0, input_size=args.learner_size, device=device)


Mode = tuple[float, int, str]  # (ω, guide_every, gradient)


def main() -> None:
    args = parse()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or "auto", device)
    if device.type != "cuda" and not args.tiny and args.resolution > 64:
        raise SystemExit("full-size SD at 512² on a CPU takes hours: use --tiny (or --resolution 64), or a GPU")
    sd, learner = build(args, device, dtype)
    modes: dict[str, Mode] = {"unguided": (0.0, 1, "full")}
    modes.update({f"guided {g}": (args.omega, args.guide_every, g) for g in args.gradient})
    best, errors = measure(args, device, sd, learner, modes)
    report(args, device, dtype, list(modes), best, errors)
    if errors:
        raise SystemExit(1)


def measure(
    args: argparse.Namespace, device: torch.device, sd: StableDiffusion, learner: Trainer, modes: dict[str, Mode]
) -> tuple[dict[str, tuple[float, float | None]], dict[str, str]]:
    """Best seconds and highest peak GiB per mode, and the first line of the error of each mode that failed
    (out of memory, a device error): a failed mode is left out of the later repeats, the others go on."""
    labels = torch.arange(args.n) % args.classes
    seeds = np.arange(args.n)
    best: dict[str, tuple[float, float | None]] = {}
    errors: dict[str, str] = {}

    def seconds(name: str, n: int) -> tuple[float, float | None] | None:
        omega, every, gradient = modes[name]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            sd.sample(
                labels[:n],
                seeds[:n],
                steps=args.steps,
                cfg_scale=args.cfg_scale,
                learner=learner.classify,
                omega=omega,
                guide_every=every,
                gradient=gradient,
                batch_size=args.batch_size,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # (reported in the table; the other modes still run)
            errors[name] = first_line(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return time.perf_counter() - t0, peak

    for name in modes:  # warm-up: kernels, allocator, autograd graph
        seconds(name, min(args.n, args.batch_size))
    for _ in range(args.repeats):
        for name in modes:
            if name not in errors and (measured := seconds(name, args.n)):
                s, peak = best.get(name, measured)
                best[name] = (min(s, measured[0]), None if peak is None else max(peak, measured[1] or 0.0))
    return best, errors


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def report(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    names: list[str],
    best: dict[str, tuple[float, float | None]],
    errors: dict[str, str],
) -> None:
    base = best["unguided"][0] if "unguided" in best else float("nan")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# {'tiny random SD' if args.tiny else 'SD-1.5-shaped random weights'} on {gpu}, {dtype}, "
        f"{args.resolution}², {args.steps} DDIM steps, CFG {args.cfg_scale:g}, batch {args.batch_size}, "
        f"{args.n} images, learner {args.learner} at {args.learner_size}², ω={args.omega:g}, "
        f"guided every {args.guide_every}, best of {args.repeats} interleaved repeats"
    )
    print(f"{'mode':<20}{'img/s':>10}{'s/img':>10}{'cost ratio':>12}{'peak GiB':>10}")
    rows: list[dict[str, object]] = []
    for name in names:
        if name in errors:
            rows.append({"mode": name, "error": errors[name]})
            print(f"{name:<20}FAILED: {errors[name]}")
            continue
        s, peak = best[name]
        row = {"mode": name, "images_per_s": args.n / s, "seconds_per_image": s / args.n, "cost_ratio": s / base}
        rows.append({**row, "peak_gib": peak, "error": None})
        mem = f"{'n/a':>10}" if peak is None else f"{peak:>10.1f}"
        print(f"{name:<20}{args.n / s:>10.2f}{s / args.n:>10.3f}{s / base:>12.2f}{mem}")
    print(f"{'paper (H100)':<20}{'':>10}{'':>10}{PAPER_RATIO:>12.2f}{'':>10}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "device": gpu, "dtype": str(dtype), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
