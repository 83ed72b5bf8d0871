"""Learner training images/s by precision and memory layout, each against float32 in the same process, and
(``--accuracy``) the validation accuracy each precision reaches on one fixed synthetic pool.

Speed: ``--steps`` training steps of ``train.batch_size`` on a pool of generated images, every mode
interleaved (drifting machine load hits every mode alike), best of ``--repeats``. Accuracy: the whole
``train.iterations`` budget on the same pool (``--pool`` unguided samples of the generator at
generator.path, quantised to uint8 as a run stores them), for seeds 0..``--seeds``−1, scored on the real
validation split (never the held-out test split).

    .venv/bin/python bench/learner_speed.py [--params params.yaml] [-S key=value] [--accuracy]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dp_ops import runner
from dp_ops.config import load_config
from dp_ops.engine.data import LabelledImages, balanced_labels, to_uint8
from dp_ops.engine.learner import Trainer, build_learner

MODES = {
    "float32 (today)": ("float32", False),
    "float32 + channels-last": ("float32", True),
    "bfloat16": ("bfloat16", False),
    "bfloat16 + channels-last": ("bfloat16", True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("-S", "--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=100, help="training steps per speed measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pool", type=int, default=2000, help="generated images in the fixed pool")
    ap.add_argument("--accuracy", action="store_true", help="also train the whole budget per mode and seed")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.params, args.set)
    real = runner.load_real_data(cfg)
    generator = runner.load_generator(cfg, real)
    labels = balanced_labels(args.pool, real.num_classes, torch.Generator().manual_seed(0))
    g = cfg.generator
    samples = generator.sample(
        labels, np.arange(args.pool), steps=g.steps, cfg_scale=g.cfg_scale, learner=lambda x: x.flatten(1)[:, :10]
    )
    pool = LabelledImages(to_uint8(samples.images), samples.labels)  # (what a run's pool holds)

    def trainer(mode: str, seed: int = 0) -> Trainer:
        precision, channels_last = MODES[mode]
        t = cfg.train.model_copy(update={"precision": precision, "channels_last": channels_last})
        return Trainer(build_learner(cfg.learner, real.num_classes, 1, seed), t, seed)

    def seconds(mode: str) -> float:
        tr = trainer(mode)
        tr.train(pool, 5)  # warm-up: oneDNN kernels, allocator
        t0 = time.perf_counter()
        tr.train(pool, args.steps)
        return time.perf_counter() - t0

    best = dict.fromkeys(MODES, float("inf"))
    for _ in range(args.repeats):
        for mode in MODES:
            best[mode] = min(best[mode], seconds(mode))
    base = next(iter(MODES))
    print(
        f"# {cfg.learner.model}, batch {cfg.train.batch_size}, {args.steps} steps at {cfg.data.resolution}², "
        f"{torch.get_num_threads()} threads, best of {args.repeats} interleaved"
    )
    print(f"{'mode':<28}{'img/s':>10}{'× float32':>11}")
    for mode in MODES:
        rate = args.steps * cfg.train.batch_size / best[mode]
        print(f"{mode:<28}{rate:>10.0f}{best[base] / best[mode]:>11.2f}")
    if not args.accuracy:
        return
    print(f"\n# validation accuracy after {cfg.train.iterations} iterations on {args.pool} generated images")
    print(f"{'mode':<28}{'val acc mean':>13}{'sd':>8}  per seed")
    for mode in (m for m, (_, channels_last) in MODES.items() if not channels_last):  # (layout: same numbers)
        accs = []
        for seed in range(args.seeds):
            tr = trainer(mode, seed)
            tr.train(pool, cfg.train.iterations)
            accs.append(tr.accuracy(real.val))
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{mode:<28}{statistics.mean(accs):>13.4f}{sd:>8.4f}  {' '.join(f'{a:.4f}' for a in accs)}")


if __name__ == "__main__":
    main()
