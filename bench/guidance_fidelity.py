"""What does entropy guidance do to the samples? Fidelity, hardness and diversity vs ω and the CFG scale.

    .venv/bin/python bench/guidance_fidelity.py [--cfg 1 1.5 2 3] [--omega 0 0.02 0.05 0.1 0.2] [-S key=value ...]

For each CFG scale: a learner is trained for ``--learner-iterations`` on unguided samples of that scale (the
state a DP learner is in at its first trigger); then the same labels and noise seeds are sampled at each ω,
guided by that learner. Per setting the table gives:

- recognised: the share a judge trained on *real* generator-train digits labels as the class they were
  generated for (guidance that crosses class boundaries turns into label noise);
- learner acc / H: the guiding learner's accuracy and mean entropy on them (how hard they are for it);
- diversity: mean pairwise L2 distance within a class (real validation digits: printed below the table).

Only the generator-train and validation splits are read; the held-out test split is not touched.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from dp_ops import runner
from dp_ops.config import load_config
from dp_ops.engine.data import LabelledImages, balanced_labels, quantize
from dp_ops.engine.learner import Trainer, build_learner
from dp_ops.engine.quality import train_judge


def diversity(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise L2 distance between images of the same class, averaged over classes."""
    per_class = [torch.cdist(images[labels == c].flatten(1), images[labels == c].flatten(1)) for c in labels.unique()]
    return float(np.mean([d.sum().item() / (d.shape[0] * (d.shape[0] - 1)) for d in per_class]))


def main() -> None:
    cfg = load_config(ARGS.params, ARGS.set)
    real = runner.load_real_data(cfg)
    generator = runner.load_generator(cfg, real)
    g = cfg.generator
    judge = train_judge(real, seed=0)
    k = real.num_classes
    labels = balanced_labels(ARGS.n, k, torch.Generator().manual_seed(0))
    seeds = np.random.SeedSequence([0, 1]).generate_state(ARGS.n)
    table = Table(
        "CFG",
        "ω",
        "recognised",
        "learner acc",
        "learner H",
        "diversity",
        "img/s",
        title=f"entropy guidance vs ω ({g.steps} DDIM steps, guided every {g.guide_every}, {g.guidance_gradient} "
        f"gradient, {g.precision}; {ARGS.n} samples)",
        title_justify="left",
    )
    for scale in ARGS.cfg:
        warm = generator.sample(
            torch.arange(ARGS.pool) % k,
            np.random.SeedSequence([0, 2]).generate_state(ARGS.pool),
            steps=g.steps,
            cfg_scale=scale,
            learner=judge.classify,
            precision=g.precision,
            batch_size=g.batch_size,
        )
        pool = LabelledImages(quantize(warm.images), warm.labels)
        learner = Trainer(build_learner(cfg.learner, k, real.val.images.shape[1], cfg.seed), cfg.train, cfg.seed)
        learner.train(pool, ARGS.learner_iterations)
        for omega in ARGS.omega:
            t0 = time.perf_counter()
            s = generator.sample(
                labels,
                seeds,
                steps=g.steps,
                cfg_scale=scale,
                learner=learner.classify,
                omega=omega,
                guide_every=g.guide_every,
                gradient=g.guidance_gradient,
                precision=g.precision,
                batch_size=g.batch_size,
            )
            seconds = time.perf_counter() - t0
            recognised = (judge.logits(s.images).argmax(-1) == labels).float().mean().item()
            learner_acc = (learner.logits(s.images).argmax(-1) == labels).float().mean().item()
            table.add_row(
                f"{scale:g}",
                f"{omega:g}",
                f"{recognised:.3f}",
                f"{learner_acc:.3f}",
                f"{s.entropy.mean().item():.3f}",
                f"{diversity(s.images, labels):.2f}",
                f"{ARGS.n / seconds:.0f}",
            )
        table.add_section()
    console = Console(width=140)
    console.print(table)
    console.print(
        f"real validation digits: diversity {diversity(real.val.images, real.val.labels):.2f}; "
        f"judge accuracy on them {judge.accuracy(real.val):.3f}; guiding learners trained "
        f"{ARGS.learner_iterations} iterations on {ARGS.pool} unguided samples of their CFG scale",
        soft_wrap=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--omega", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--n", type=int, default=500, help="samples per setting")
    parser.add_argument("--pool", type=int, default=500, help="unguided samples the guiding learner trains on")
    parser.add_argument("--learner-iterations", type=int, default=600)
    parser.add_argument("--params", default=None)
    parser.add_argument("-S", "--set", action="append", default=[], help="override a params.yaml key")
    ARGS = parser.parse_args()
    main()
