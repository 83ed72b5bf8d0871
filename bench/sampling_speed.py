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

from dp_ops import experiment
from dp_ops.config import load_config
from dp_ops.learner import Trainer, build_learner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("-S", "--set", action="append", default=[])
    ap.add_argument("-n", type=int, default=512, help="images per measurement")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(args.params, args.set)
    real = experiment.load_real_data(cfg)
    generator = (
        experiment.load_generator(cfg) if experiment.generator_exists(cfg) else experiment.train_and_save_generator(cfg, real)[0]
    )
    learner = Trainer(build_learner(cfg.learner, real.num_classes, 1, cfg.seed), cfg.train, cfg.seed)
    g = cfg.generator
    labels = torch.arange(args.n) % real.num_classes
    seeds = np.arange(args.n)

    def rate(omega: float, every: int) -> float:
        best = 0.0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            generator.sample(labels, seeds, steps=g.steps, cfg_scale=g.cfg_scale, learner=learner.classify,
                             omega=omega, guide_every=every, batch_size=g.batch_size)  # fmt: skip
            best = max(best, args.n / (time.perf_counter() - t0))
        return best

    print(f"# {g.steps} DDIM steps, CFG {g.cfg_scale:g}, batch {g.batch_size}, {args.n} images, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")  # fmt: skip
    base = rate(0.0, 1)
    print(f"{'mode':<28}{'img/s':>10}{'cost ratio':>12}")
    print(f"{'unguided':<28}{base:>10.1f}{1.0:>12.2f}")
    for every in sorted({1, 2, 5, g.guide_every}):
        r = rate(cfg.dp.omega or 0.05, every)
        print(f"{f'guided every {every} step(s)':<28}{r:>10.1f}{base / r:>12.2f}")


if __name__ == "__main__":
    main()
