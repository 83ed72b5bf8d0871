"""The learner f_φ: a timm model built by name, trained from scratch on the synthetic pool.

Recipe (the paper's, Askari-Hemmat et al., ICML 2025; step 4 of :mod:`dp_ops.engine.loop`): AdamW, label
smoothing, mini-batches drawn uniformly from the whole pool, and a warm-up / stable / decay ("WSD")
learning rate: linear warm-up over the first ``warmup_fraction`` of the budget, constant afterwards (not
reset when data arrives), cosine cool-down over the last ``cooldown_fraction``, during which the loop
adds no data.

The text-to-image world adds the paper's ImageNet extras, all off by default (``train.*``): random-resized-
crop/flip, Mixup and CutMix (:mod:`dp_ops.engine.augment`), and an EMA of the weights (timm's ``ModelEmaV3``),
which is then what is evaluated and what guidance back-propagates through. Pool images may be stored
larger than the learner's input (``data.shard_resolution``); batches are cropped or resized
(:func:`dp_ops.engine.data.resize`) to it.

``dpops_convnet`` is registered with timm so it is built by name like any timm model: a small VGG-style
network that suits 16×16 grey images (timm's ImageNet models downsample 32× and waste such inputs).
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before timm)

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from dp_ops.config import LearnerConfig, TrainConfig
from dp_ops.engine.augment import MixCut, crop_flip, soft_target_loss
from dp_ops.engine.data import LabelledImages, Pool, resize
from dp_ops.engine.guidance import entropy


class ConvNet(nn.Module):
    """conv-conv-pool ×2 then a linear head; BatchNorm-free (GroupNorm) so eval = train behaviour."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16, drop_rate: float = 0.0, **_: Any):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU())

        self.features = nn.Sequential(
            block(in_chans, w),
            block(w, w),
            nn.MaxPool2d(2),
            block(w, 2 * w),
            block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


@register_model
def dpops_convnet(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    """Small CNN for low-resolution images (36k parameters at width 16: ~50 steps/s of 128 on 2 cores)."""
    return ConvNet(**kwargs)


@register_model
def dpops_convnet_tiny(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    """Width-8 variant for tests."""
    return ConvNet(width=8, **kwargs)


def build_learner(cfg: LearnerConfig, num_classes: int, in_chans: int, seed: int) -> nn.Module:
    """Build ``cfg.model`` from timm's registry with a seeded initialisation (no global RNG side effect)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(
            cfg.model, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate
        )


def known_models() -> list[str]:
    return timm.list_models()


def wsd_factor(iteration: int, total: int, warmup_fraction: float, cooldown_fraction: float) -> float:
    """Learning-rate multiplier at ``iteration`` (0-based) of ``total``: warm-up, stable, cosine decay."""
    warmup = round(warmup_fraction * total)
    cooldown = round(cooldown_fraction * total)
    if iteration < warmup:
        return (iteration + 1) / warmup
    decay_start = total - cooldown
    if iteration < decay_start:
        return 1.0
    progress = (iteration - decay_start + 1) / max(cooldown, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Trainer:
    """Holds f_φ, its optimiser and schedule, and the RNG of mini-batch draws; steps and evaluates."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        seed: int,
        *,
        input_size: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """``input_size``: side the model reads (batches of another size are resized); None = as stored."""
        from timm.utils import ModelEmaV3

        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.cfg = cfg
        self.input_size = input_size
        self.iteration = 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.batch_rng = torch.Generator().manual_seed(seed)
        self.dropout_rng_state = torch.Generator().manual_seed(seed + 1).get_state()
        self.augment_rng = torch.Generator().manual_seed(seed + 2)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        num_classes = getattr(model, "num_classes", None)
        mixing = cfg.mixup > 0 or cfg.cutmix > 0
        self.mixcut = MixCut(cfg.mixup, cfg.cutmix, cfg.label_smoothing, num_classes, seed + 3) if mixing else None

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and guided with: the EMA when ``train.ema_decay`` > 0."""
        return self.ema.module if self.ema is not None else self.model

    def lr_at(self, iteration: int) -> float:
        c = self.cfg
        return c.lr * wsd_factor(iteration, c.iterations, c.warmup_fraction, c.cooldown_fraction)

    def train(self, pool: Pool, steps: int) -> float:
        """``steps`` optimiser steps on uniform mini-batches of the pool; returns the mean loss."""
        self.model.train()
        total = 0.0
        with self._dropout_rng():
            for _ in range(steps):
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(self.iteration)
                batch = pool.sample_batch(self.cfg.batch_size, self.batch_rng)
                loss = self._loss(self._augment(batch.images.to(self.device)), batch.labels.to(self.device))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.iteration += 1
                if self.ema is not None:
                    self.ema.update(self.model, step=self.iteration)
                total += loss.item()
        return total / max(steps, 1)

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        size = self.input_size or images.shape[-1]
        if self.cfg.augment != "none":
            return crop_flip(
                images, size, self.augment_rng, crop=self.cfg.augment == "crop_flip", min_scale=self.cfg.crop_min_scale
            )
        return self._to_input(images)

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mixcut is None:
            return F.cross_entropy(self.model(images), labels, label_smoothing=self.cfg.label_smoothing)
        images, targets = self.mixcut(images, labels)  # label smoothing is inside the soft targets
        return soft_target_loss(self.model(images), targets)

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the model reads them: resized to ``input_size`` when stored at another size."""
        return images if self.input_size is None else resize(images, self.input_size)

    @contextmanager
    def _dropout_rng(self) -> Iterator[None]:
        # Dropout draws from torch's global RNG; keep our own stream in it so that runs are reproducible
        # whatever else touched the global RNG in between (and so the stream can be checkpointed).
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.dropout_rng_state)
            yield
            self.dropout_rng_state = torch.get_rng_state()

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Eval-mode logits on the CPU, in chunks (images may live anywhere)."""
        model = self.eval_model.eval()
        chunks = (images[i : i + batch_size].to(self.device) for i in range(0, len(images), batch_size))
        return torch.cat([model(self._to_input(x)).cpu() for x in chunks])

    def accuracy(self, data: LabelledImages) -> float:
        return float((self.logits(data.images).argmax(-1) == data.labels).float().mean())

    def entropy(self, images: torch.Tensor) -> torch.Tensor:
        return entropy(self.logits(images))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable logits in eval mode (on the learner's device): what entropy guidance
        back-propagates through."""
        return self.eval_model.eval()(self._to_input(images.to(self.device)))

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "batch_rng": self.batch_rng.get_state(),
            "dropout_rng": self.dropout_rng_state,
            "augment_rng": self.augment_rng.get_state(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.mixcut is not None:
            state["mixcut"] = self.mixcut.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.batch_rng.set_state(state["batch_rng"])
        self.dropout_rng_state = state["dropout_rng"]
        if "augment_rng" in state:  # (absent in checkpoints written before augmentation existed)
            self.augment_rng.set_state(state["augment_rng"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.mixcut is not None:
            self.mixcut.load_state_dict(state["mixcut"])
