"""Images/s of unguided vs entropy-guided DDIM sampling with the embedded generator, and their ratio.

The paper measured a guided image at 1.82× the cost of an unguided one (SD-1.5 on an H100). Here the
gradient flows through the UNet (x̂0 depends on ε̂(x_t)), and guidance runs every k-th step, so the
ratio depends on k: this prints it for several k.

    .venv/bin/python bench/sampling_speed.py [--params params.yaml] [-n 512] [--repeats 2]

Uses the generator at generator.path (trains one first if absent, like `dpops run`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dp_ops import runner
from dp_ops.config import load_config
from dp_ops.engine.learner import Trainer, build_learner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("-S", "--set", action="append", default=[])
    ap.add_argument("-n", type=int, default=512, help="images per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.params, args.set)
    real = runner.load_real_data(cfg)
    generator = (
        runner.load_generator(cfg) if runner.generator_exists(cfg) else runner.train_and_save_generator(cfg, real)[0]
    )
    learner = Trainer(build_learner(cfg.learner, real.num_classes, 1, cfg.seed), cfg.train, cfg.seed)
    g = cfg.generator
    labels = torch.arange(args.n) % real.num_classes
    seeds = np.arange(args.n)

    def seconds(omega: float, every: int, n: int = args.n) -> float:
        t0 = time.perf_counter()
        generator.sample(
            labels[:n],
            seeds[:n],
            steps=g.steps,
            cfg_scale=g.cfg_scale,
            learner=learner.classify,
            omega=omega,
            guide_every=every,
            batch_size=g.batch_size,
        )
        return time.perf_counter() - t0

    omega = cfg.dp.omega or 0.05
    modes = [("unguided", 0.0, 1)] + [(f"guided every {k} step(s)", omega, k) for k in sorted({1, 2, 5, g.guide_every})]
    seconds(omega, 1, n=64)  # warm-up: allocator, thread pool, autograd graph
    best = {name: float("inf") for name, _, _ in modes}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every mode alike
        for name, w, k in modes:
            best[name] = min(best[name], seconds(w, k))
    print(
        f"# {g.steps} DDIM steps, CFG {g.cfg_scale:g}, batch {g.batch_size}, {args.n} images, "
        f"{torch.get_num_threads()} threads, best of {args.repeats} interleaved repeats, ω={omega:g}"
    )
    print(f"{'mode':<28}{'img/s':>10}{'cost ratio':>12}")
    for name, _, _ in modes:
        print(f"{name:<28}{args.n / best[name]:>10.1f}{best[name] / best['unguided']:>12.2f}")


if __name__ == "__main__":
    main()
