"""How good is the generator? A judge trained on *real* digits reads its unguided samples.

The recognition rate (judge accuracy on samples, labelled by the class they were generated for) is the
generator's quality figure: how often a classifier of real digits reads a sample as the digit it was asked
for. The judge's own accuracy on the real test split is reported next to it, so a weak judge cannot hide
a weak generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from dp_ops.config import GeneratorConfig, LearnerConfig, TrainConfig
from dp_ops.engine.backends.pixel import PixelDiffusion
from dp_ops.engine.data import RealData, balanced_labels
from dp_ops.engine.learner import Trainer, build_learner
from dp_ops.engine.sampling import Progress

JUDGE_RECIPE = TrainConfig(iterations=800, eval_every=800, batch_size=128, lr=2e-3, label_smoothing=0.0)


@dataclass(frozen=True)
class Quality:
    recognition: float  # judge accuracy on unguided samples
    judge_test_acc: float  # judge accuracy on the real held-out test split
    n_samples: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def train_judge(real: RealData, seed: int) -> Trainer:
    model = build_learner(LearnerConfig(drop_rate=0.1), real.num_classes, real.gen_train.images.shape[1], seed)
    judge = Trainer(model, JUDGE_RECIPE, seed)
    judge.train(real.gen_train, JUDGE_RECIPE.iterations)
    return judge


def measure_quality(
    generator: PixelDiffusion,
    real: RealData,
    cfg: GeneratorConfig,
    *,
    n_samples: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
) -> Quality:
    judge = train_judge(real, seed)
    labels = balanced_labels(n_samples, real.num_classes, torch.Generator().manual_seed(seed))
    seeds = np.random.SeedSequence([seed, 7919]).generate_state(n_samples)
    samples = generator.sample(
        labels,
        seeds,
        steps=cfg.steps,
        cfg_scale=cfg.cfg_scale,
        learner=judge.classify,
        precision=cfg.precision,
        batch_size=cfg.batch_size,
        progress=progress,
    )
    recognised = float((judge.logits(samples.images).argmax(-1) == samples.labels).float().mean())
    return Quality(recognised, judge.accuracy(real.test), n_samples)
