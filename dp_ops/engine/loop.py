"""The Deliberate Practice loop (Algorithm 1 of Askari-Hemmat et al., 2025) and its two baselines.

    1. generate N samples unguided (ω = 0)                                    -> round 0
    2. train f_φ on uniform mini-batches of the whole pool; every τ iterations
       evaluate on the real validation split; no improvement: T ← T + 1, else T ← 0
    3. T ≥ T_max (and not in the cool-down): acquire P new samples, keep the old -> round k
    4. WSD learning rate; in the cool-down no data is added
    5. report real validation and held-out real test accuracy

Strategies differ only in step 3, each by its entry of :data:`~dp_ops.engine.strategies.STRATEGIES`
(the round it acquires): ``dp`` generates P samples entropy-guided by the current learner, ``oversample``
generates r·P unguided and keeps the P of highest learner entropy, ``static`` never acquires (all N are
generated up front).

*Incremental patience* (ours; the paper does not publish its rule): T_max grows with the pool,
T_max(k) = ceil(T_max · |pool| / N), because a fixed T_max fires ever more often once the pool is large.

Memory is bounded by a part, not by the pool: each round is generated and written part by part into
``<shards>/round_<k>/`` (:mod:`dp_ops.engine.rounds`), and the learner streams its mini-batches from those
parts (:mod:`dp_ops.engine.pool`). The loop does no tracking or versioning: those plug in through
:class:`Observer`, which receives each round's parts as facts (:class:`~dp_ops.engine.rounds.RoundParts`).

On several processes (``world``, :mod:`dp_ops.engine.dist`) every process runs this same loop: each
generates its block of a round's parts guided by its own replica of the learner, trains its micro-batches
under DDP, and evaluates its block of validation chunks; accuracies are summed in integers, so every
process takes the same decisions at the same iterations. Observers are the caller's: rank 0's record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dp_ops.config import Config
from dp_ops.engine.data import RealData, balanced_labels
from dp_ops.engine.dist import SINGLE, World
from dp_ops.engine.learner import Trainer, build_learner
from dp_ops.engine.pool import Pool
from dp_ops.engine.rounds import RoundParts, Sampling, make_round
from dp_ops.engine.sampling import Generator
from dp_ops.engine.shards import round_dir
from dp_ops.engine.strategies import STRATEGIES, Acquisition


@dataclass(frozen=True)
class RoundRecord:
    """One data acquisition. Round 0 is the initial pool (no trigger, so ``val_acc_at_trigger`` is None)."""

    round: int
    pool_size: int  # after insertion
    n_new: int  # samples inserted
    n_generated: int  # samples generated (> n_new for oversample)
    omega: float  # ω the samples were generated with (0: unguided, as round 0, oversample and static are)
    entropy_mean: float  # learner entropy (nats) of the inserted samples at insertion
    entropy_median: float
    entropy_p90: float
    val_acc_at_trigger: float | None
    iteration: int  # iterations trained before this round
    patience: int  # T_max in force after this round
    gen_seconds: float
    train_seconds: float  # training + evaluation since the previous round
    model_evals: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunSummary:
    strategy: str
    final_val_acc: float
    final_test_acc: float
    best_val_acc: float
    pool_size: int
    generated_samples: int  # including samples discarded by `oversample`
    iterations: int
    rounds: int  # acquisitions after round 0
    gen_seconds: float
    train_seconds: float
    model_evals: int
    final_ood_acc: float | None = None  # on the other embedded world's real digits (real.ood): reported only

    def to_dict(self) -> dict:
        """The fields, less an absent OOD accuracy (metrics files hold numbers only)."""
        return {k: v for k, v in asdict(self).items() if not (k == "final_ood_acc" and v is None)}


@dataclass(frozen=True)
class RunResult:
    summary: RunSummary
    records: tuple[RoundRecord, ...]
    curve: tuple[tuple[int, float], ...]  # (iteration, val accuracy) at every evaluation

    def to_dict(self) -> dict:
        return {
            "summary": self.summary.to_dict(),
            "rounds": [r.to_dict() for r in self.records],
            "curve": [{"iteration": i, "val_acc": a} for i, a in self.curve],
        }


class Observer:
    """Hooks the loop calls; subclass and override what you need (progress bars, tracking, versioning)."""

    def on_progress(self, task: str, completed: int, total: int) -> None:
        """``task`` is ``"generate"`` or ``"train"``."""

    def on_eval(self, iteration: int, val_acc: float) -> None: ...

    def on_round(self, record: RoundRecord, round_parts: RoundParts) -> None:
        """``round_parts``: the parts written this round (for oversample, of the kept samples)."""

    def on_checkpoint(self, state: dict) -> None:
        """After each completed round (and its ``on_round`` hooks), and once more at the end with the final
        learner (before ``on_finish``): everything needed to resume."""

    def on_finish(self, result: RunResult) -> None: ...


class Plateau:
    """Counts evaluations without improvement of the best validation accuracy so far (T in Alg. 1)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -math.inf
        self.stale = 0

    def update(self, acc: float) -> bool:
        """Record an evaluation; True when the learner has plateaued (T ≥ T_max)."""
        if acc > self.best:
            self.best, self.stale = acc, 0
        else:
            self.stale += 1
        return self.stale >= self.patience

    def reset(self, patience: int) -> None:
        self.patience, self.stale = patience, 0


def patience_for(cfg: Config, pool_size: int) -> int:
    if not cfg.dp.incremental_patience:
        return cfg.dp.patience
    return max(cfg.dp.patience, math.ceil(cfg.dp.patience * pool_size / cfg.dp.initial_size))


def round_seeds(seed: int, round_index: int, n: int) -> np.ndarray:
    """Per-sample noise seeds of a round: independent streams, each sample reproducible on its own."""
    return np.random.SeedSequence([seed, round_index]).generate_state(n).astype(np.int64)


def round_labels(seed: int, round_index: int, n: int, num_classes: int) -> torch.Tensor:
    """Class labels of a round: balanced over classes, in a seeded random order."""
    stream = np.random.SeedSequence([seed, round_index, 1]).generate_state(1)[0]
    return balanced_labels(n, num_classes, torch.Generator().manual_seed(int(stream)))


class DPLoop:
    """One experiment. ``run()`` reads top to bottom like Algorithm 1."""

    def __init__(
        self,
        cfg: Config,
        generator: Generator,
        real: RealData,
        observers: Sequence[Observer] = (),
        *,
        shards: Path,
        world: World = SINGLE,
    ) -> None:
        """``shards``: the folder this run's round parts are written to (and the pool streams from), the
        same folder for every process of ``world``."""
        self.cfg, self.generator, self.real, self.shards, self.world = cfg, generator, real, Path(shards), world
        self.observers = list(observers)
        model = build_learner(cfg.learner, real.num_classes, real.val.images.shape[1], cfg.seed)
        # the learner reads data.resolution; pool images may be stored larger (data.shard_resolution)
        device = world.device(cfg.device)
        self.trainer = Trainer(model, cfg.train, cfg.seed, input_size=real.resolution, device=device, world=world)
        self.pool = Pool()  # the table of parts written so far
        self.strategy = STRATEGIES[cfg.dp.strategy]
        self.plateau = Plateau(cfg.dp.patience)
        self.records: list[RoundRecord] = []
        self.curve: list[tuple[int, float]] = []
        self._train_seconds = 0.0

    def run(self) -> RunResult:
        cfg = self.cfg
        if not self.records:  # (a resumed loop has its rounds already)
            self._acquire(cfg.dp.initial_size, omega=0.0, keep=cfg.dp.initial_size, trigger=None)  # 1.
        while self.trainer.iteration < cfg.train.iterations:
            self._train_until_next_eval()  # 2.
            val_acc = self._evaluate()
            if self.plateau.update(val_acc) and (more := self._next_round()) is not None:  # 3.
                self._acquire(more.n, omega=more.omega, keep=more.keep, trigger=val_acc)
        return self._finish()  # 5.

    # ---- the named steps -------------------------------------------------------------------------
    def _train_until_next_eval(self) -> None:
        t0 = time.perf_counter()
        steps = min(self.cfg.train.eval_every, self.cfg.train.iterations - self.trainer.iteration)
        self.trainer.train(self.pool, steps)
        self._train_seconds += time.perf_counter() - t0
        self._emit("on_progress", "train", self.trainer.iteration, self.cfg.train.iterations)

    def _evaluate(self) -> float:
        t0 = time.perf_counter()
        acc = self.trainer.accuracy(self.real.val)
        self._train_seconds += time.perf_counter() - t0
        self.curve.append((self.trainer.iteration, acc))
        self._emit("on_eval", self.trainer.iteration, acc)
        return acc

    def _next_round(self) -> Acquisition | None:
        """The round the strategy acquires at a plateau; None when it adds none (``static``), in the
        cool-down, or after ``dp.max_rounds`` rounds."""
        dp = self.cfg.dp
        cooldown_start = self.cfg.train.iterations - round(self.cfg.train.cooldown_fraction * self.cfg.train.iterations)
        if self.trainer.iteration >= cooldown_start:  # 4. no data during the cool-down
            return None
        if dp.max_rounds and len(self.records) > dp.max_rounds:
            return None
        return self.strategy.acquire(dp)

    def _acquire(self, n: int, *, omega: float, keep: int, trigger: float | None) -> None:
        """Generate ``n`` samples (guided when ω > 0), keep the ``keep`` of highest learner entropy."""
        k, t0 = len(self.records), time.perf_counter()
        samples = self._generate(k, n, omega, keep)
        self.pool.add(samples.parts)
        self.plateau.reset(patience_for(self.cfg, len(self.pool)))
        ent = samples.entropy.astype(np.float64)
        record = RoundRecord(
            round=k,
            pool_size=len(self.pool),
            n_new=len(samples),
            n_generated=n,
            omega=float(omega),
            entropy_mean=float(ent.mean()),
            entropy_median=float(np.median(ent)),
            entropy_p90=float(np.quantile(ent, 0.9)),
            val_acc_at_trigger=trigger,
            iteration=self.trainer.iteration,
            patience=self.plateau.patience,
            gen_seconds=time.perf_counter() - t0,
            train_seconds=self._train_seconds,
            model_evals=samples.model_evals,
        )
        self._train_seconds = 0.0
        self.records.append(record)
        self._emit("on_round", record, samples)
        self._emit("on_checkpoint", self.state_dict())

    def _generate(self, k: int, n: int, omega: float, keep: int) -> RoundParts:
        """Round k's parts: its n samples written as they are generated (by every process of the world
        together, :func:`~dp_ops.engine.rounds.make_round`); for ``keep`` < n only the ``keep`` of highest
        learner entropy become the round."""
        g = self.cfg.generator
        how = Sampling(
            g.steps, g.cfg_scale, g.guide_every, g.batch_size, self.trainer.classify, g.guidance_gradient, g.precision
        )
        return make_round(
            self.generator,
            round_labels(self.cfg.seed, k, n, self.real.num_classes),
            round_seeds(self.cfg.seed, k, n),
            round_dir(self.shards, k),
            how,
            self.world,
            round_index=k,
            omega=omega,
            keep=keep,
            part_size=self.cfg.data.part_size,
            fmt=self.cfg.shard_format,
            progress=lambda done, total: self._emit("on_progress", "generate", done, total),
        )

    # ---- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Loop state after a completed round (the pool itself lives in the round shards)."""
        return {
            "records": [r.to_dict() for r in self.records],
            "curve": [list(point) for point in self.curve],
            "plateau": {"best": self.plateau.best, "stale": self.plateau.stale, "patience": self.plateau.patience},
            "trainer": self.trainer.state_dict(),
        }

    def load_state_dict(self, state: dict, pool: Pool) -> None:
        """Continue from a checkpoint; ``pool``: the table of the checkpointed rounds' parts (from headers)."""
        self.records = [RoundRecord(**r) for r in state["records"]]
        if len(pool) != self.records[-1].pool_size:
            raise ValueError(f"the parts hold {len(pool)} samples, the checkpoint's pool {self.records[-1].pool_size}")
        self.curve = [(int(i), float(a)) for i, a in state["curve"]]
        p = state["plateau"]
        self.plateau.best, self.plateau.stale, self.plateau.patience = p["best"], p["stale"], p["patience"]
        self.trainer.load_state_dict(state["trainer"])
        self.pool = pool

    def _finish(self) -> RunResult:
        train_seconds = sum(r.train_seconds for r in self.records) + self._train_seconds
        summary = RunSummary(
            strategy=self.cfg.dp.strategy,
            final_val_acc=self.curve[-1][1],
            final_test_acc=self.trainer.accuracy(self.real.test),  # the only use of the test split
            best_val_acc=max(a for _, a in self.curve),
            pool_size=len(self.pool),
            generated_samples=sum(r.n_generated for r in self.records),
            iterations=self.trainer.iteration,
            rounds=len(self.records) - 1,
            gen_seconds=sum(r.gen_seconds for r in self.records),
            train_seconds=train_seconds,
            model_evals=sum(r.model_evals for r in self.records),
            final_ood_acc=None if self.real.ood is None else self.trainer.accuracy(self.real.ood),  # never decides
        )
        result = RunResult(summary, tuple(self.records), tuple(self.curve))
        self._emit("on_checkpoint", self.state_dict())  # the weights behind the final accuracies
        self._emit("on_finish", result)
        return result

    def _emit(self, hook: str, *args: object) -> None:
        for obs in self.observers:
            getattr(obs, hook)(*args)
