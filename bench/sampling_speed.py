"""Images/s of DDIM sampling with the embedded generator: precision, memory layout and the entropy gradient,
each mode against today's path (float32, contiguous, full gradient) in the same process.

Unguided and guided sampling (ω > 0, every ``generator.guide_every``-th step) are measured in each mode,
interleaved (drifting machine load hits every mode alike), best of ``--repeats``. The last table puts the
measured rates against this machine's ceiling: the peak GFLOP/s of a 2048² matmul in float32 and in
bfloat16 (measured here too) over the UNet FLOPs one image costs (counted by ``torch.utils.flop_counter``).
The paper measured a guided image at 1.82× an unguided one (SD-1.5, H100).

    .venv/bin/python bench/sampling_speed.py [--params params.yaml] [-S key=value] [-n 256] [--repeats 3]

Uses the generator at generator.path (trains one first if absent, like `dpops run`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dp_ops import runner
from dp_ops.config import load_config
from dp_ops.engine.learner import Trainer, build_learner
from dp_ops.paths import generator_exists


@dataclass(frozen=True)
class Mode:
    name: str
    precision: str
    channels_last: bool
    gradient: str = "full"


MODES = (
    Mode("float32 (today)", "float32", False),
    Mode("float32 + channels-last", "float32", True),
    Mode("bfloat16", "bfloat16", False),
    Mode("bfloat16 + channels-last", "bfloat16", True),
    Mode("float32, x0 gradient", "float32", False, "x0"),
    Mode("bfloat16, x0 gradient", "bfloat16", False, "x0"),
)


def peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("-S", "--set", action="append", default=[])
    ap.add_argument("-n", type=int, default=256, help="images per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.params, args.set)
    real = runner.load_real_data(cfg)
    generator = runner.load_generator(cfg) if generator_exists(cfg) else runner.train_and_save_generator(cfg, real)[0]
    learner = Trainer(build_learner(cfg.learner, real.num_classes, 1, cfg.seed), cfg.train, cfg.seed)
    g, omega = cfg.generator, cfg.dp.omega or 0.05
    labels, seeds = torch.arange(args.n) % real.num_classes, np.arange(args.n)

    def seconds(mode: Mode, w: float, n: int = args.n) -> float:
        layout = torch.channels_last if mode.channels_last else torch.contiguous_format
        generator.unet.to(memory_format=layout)
        return _timed(
            lambda: generator.sample(
                labels[:n],
                seeds[:n],
                steps=g.steps,
                cfg_scale=g.cfg_scale,
                learner=learner.classify,
                omega=w,
                guide_every=g.guide_every,
                gradient=mode.gradient,
                precision=mode.precision,
                batch_size=g.batch_size,
            )
        )

    runs = [(m, "unguided", 0.0) for m in MODES if m.gradient == "full"] + [(m, "guided", omega) for m in MODES]
    for m, _, w in runs:
        seconds(m, w, n=min(64, args.n))  # warm-up: allocator, thread pool, oneDNN kernels, autograd graph
    best = {(m.name, kind): float("inf") for m, kind, _ in runs}
    for _ in range(args.repeats):
        for m, kind, w in runs:
            best[m.name, kind] = min(best[m.name, kind], seconds(m, w))
    print(
        f"# {g.steps} DDIM steps, CFG {g.cfg_scale:g}, guided every {g.guide_every} step(s) at ω={omega:g}, "
        f"batch {g.batch_size}, {args.n} images, {torch.get_num_threads()} threads, best of {args.repeats} interleaved"
    )
    base = MODES[0].name
    print(f"{'mode':<28}{'unguided img/s':>16}{'× today':>9}{'guided img/s':>14}{'× today':>9}{'guided/unguided':>17}")
    for m in MODES:
        u, gd = best.get((m.name, "unguided")), best[m.name, "guided"]
        cells = [f"{args.n / u:>16.1f}{best[base, 'unguided'] / u:>9.2f}" if u else f"{'—':>16}{'':>9}"]
        cells.append(f"{args.n / gd:>14.1f}{best[base, 'guided'] / gd:>9.2f}")
        cells.append(f"{gd / u:>17.2f}" if u else f"{'':>17}")
        print(f"{m.name:<28}{''.join(cells)}")

    generator.unet.to(memory_format=torch.contiguous_format)
    x = torch.randn(2, *generator.noise_shape)
    with FlopCounterMode(display=False) as counter:
        generator.model_output(x, torch.tensor(500), torch.tensor([0, 1]), g.cfg_scale)
    per_image = counter.get_total_flops() / 2 * g.steps  # (the CFG pair is one call of 2× the batch)
    print(f"\n# ceiling: {per_image / 1e9:.2f} GFLOP per unguided image ({g.steps} steps, CFG pair)")
    print(f"{'precision':<12}{'matmul GFLOP/s':>16}{'ceiling img/s':>15}{'best img/s':>12}{'share':>8}")
    for precision, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        peak = peak_gflops(dtype)
        rate = max(
            args.n / best[m.name, "unguided"] for m in MODES if m.precision == precision and m.gradient == "full"
        )
        ceiling = peak * 1e9 / per_image
        print(f"{precision:<12}{peak:>16.0f}{ceiling:>15.0f}{rate:>12.1f}{rate / ceiling:>8.1%}")


if __name__ == "__main__":
    main()
