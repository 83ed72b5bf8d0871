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

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, cast

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from torch.nn.parallel import DistributedDataParallel

from dp_ops.config import LearnerConfig, TrainConfig
from dp_ops.engine.augment import MixCut, crop_flip, soft_target_loss
from dp_ops.engine.data import AUGMENT, DROPOUT, MIX, LabelledImages, from_uint8, resize, step_seed
from dp_ops.engine.devices import autocast
from dp_ops.engine.dist import SINGLE, World
from dp_ops.engine.pool import Pool
from dp_ops.errors import ConfigError, NonFiniteError


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
    """Build ``cfg.model`` from timm's store with a seeded initialisation (no global RNG side effect)."""
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


def micro_batches(cfg: TrainConfig, world: World) -> int:
    """M, the micro-batches of each iteration (``train.micro_batches``, 0 = one per process), checked
    against the processes that share them and the batch they split."""
    m = cfg.micro_batches or world.size
    if m % world.size:
        raise ConfigError(
            f"train.micro_batches={cfg.micro_batches}: must be a multiple of the run's {world.size} processes "
            "(each computes the same number of micro-batches)"
        )
    if cfg.batch_size % m:
        raise ConfigError(f"train.batch_size={cfg.batch_size}: must be divisible by the {m} micro-batches")
    return m


def no_forward_buffer_sync(ddp: Any) -> dict[str, Any]:
    """The keyword of ``ddp`` (torch's DistributedDataParallel) that stops it broadcasting rank 0's buffers
    before every forward pass (a collective per micro-batch): each rank's BatchNorm statistics follow its
    own micro-batches, and are averaged over the ranks after each stretch of training
    (:meth:`Trainer._share_batchnorm`), not replaced by rank 0's. torch 2.13 names it
    ``forward_sync_buffers`` (and deprecates ``broadcast_buffers``); older torch has only
    ``broadcast_buffers=False``, which also skips the buffers' broadcast at construction: the same here, as
    every rank builds the learner from the same seed (and resumes from the same checkpoint)."""
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class Trainer:
    """Holds f_φ, its optimiser and schedule; steps on keyed mini-batches and evaluates.

    Iteration t's batch (drawn by (seed, t)) is split into M micro-batches whose gradients are accumulated
    before the one optimiser step; with several processes (``world``) each computes its block of them under
    ``DistributedDataParallel`` (``no_sync`` on all but its last), so W processes compute the same step as
    one process with M micro-batches. BatchNorm statistics are averaged over the processes after every
    stretch of training (timm's ``distribute_bn``), so evaluation and guidance see one learner; guidance
    and evaluation run the unwrapped module, never the DDP wrapper (whose forward is a collective)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        seed: int,
        *,
        input_size: int | None = None,
        device: torch.device | str = "cpu",
        world: World = SINGLE,
    ) -> None:
        """``input_size``: side the model reads (batches of another size are resized); None = as stored."""
        from timm.utils import ModelEmaV3

        self.device = torch.device(device)
        self.layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(self.device)
        self.model.to(memory_format=self.layout)  # type: ignore[call-overload]  # torch stubs lack memory_format
        self.cfg, self.world = cfg, world
        m = micro_batches(cfg, world)
        self.micro_size, self.mine = cfg.batch_size // m, world.block(m)  # this process's micro-batches
        self.ddp = None
        if world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(
                self.model, device_ids=ids, **no_forward_buffer_sync(DistributedDataParallel)
            )
        self.batchnorm = any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in model.modules())
        self.input_size = input_size
        self.iteration = 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.seed = seed  # every random draw of iteration t is keyed by (seed, t): see data.step_seed
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        mixing = cfg.mixup > 0 or cfg.cutmix > 0
        num_classes = cast(int, model.num_classes)  # (every timm model has it)
        self.mixcut = MixCut(cfg.mixup, cfg.cutmix, cfg.label_smoothing, num_classes) if mixing else None

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and guided with: the EMA when ``train.ema_decay`` > 0."""
        return self.ema.module if self.ema is not None else self.model

    def lr_at(self, iteration: int) -> float:
        c = self.cfg
        return c.lr * wsd_factor(iteration, c.iterations, c.warmup_fraction, c.cooldown_fraction)

    def train(self, data: Pool | LabelledImages, steps: int) -> float:
        """``steps`` optimiser steps on uniform mini-batches of ``data`` (the streamed pool, or images in
        memory); returns this process's mean loss. Micro-batch m of batch t is drawn, augmented and dropped
        out by keys (seed, t, m).

        The losses stay on the device (no host synchronisation per step): they are summed there, and whether
        each is finite is read once, at the end, before anything can evaluate or checkpoint the weights."""
        total, bad_t, bad_loss = self._steps(data, steps)
        self._check_finite(int(bad_t), float(bad_loss))
        self._share_batchnorm()
        return float(total) / max(steps, 1)

    def _steps(self, data: Pool | LabelledImages, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The optimiser steps of :meth:`train`, with nothing read back from the device: the summed loss, the
        first iteration whose loss was not finite (-1: none) and that loss, all still on the device."""
        self.model.train()
        start, size, mine = self.iteration, self.micro_size, self.mine
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        bad_t = torch.full((), -1, dtype=torch.int64, device=self.device)  # the first non-finite loss's t (-1: none)
        bad_loss = torch.zeros((), dtype=torch.float64, device=self.device)  # and its value
        rows = slice(mine.start * size, mine.stop * size)  # this process's positions of each batch
        if isinstance(data, Pool):
            source = data.batches(
                self.seed,
                start,
                start + steps,
                self.cfg.batch_size,
                rows,
                num_workers=self.cfg.num_workers,
                pin_memory=self.device.type == "cuda",
            )
        else:
            source = data.batches(self.seed, start, start + steps, self.cfg.batch_size, rows)
        net = self.ddp or self.model
        for images, labels in source:
            t = self.iteration
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(t)
            images = from_uint8(images.to(self.device, non_blocking=True))
            labels = labels.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            for j, m in enumerate(mine):
                x, y = images[j * size : (j + 1) * size], labels[j * size : (j + 1) * size]
                last = j == len(mine) - 1
                with self._dropout_rng(t, m), nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                    loss = self._loss(net, self._augment(x, t, m), y, t, m)
                    (loss / len(mine) if len(mine) > 1 else loss).backward()  # (DDP averages over processes)
                loss = loss.detach().double()
                total += loss / len(mine)
                first = (bad_t < 0) & ~loss.isfinite()
                bad_t, bad_loss = torch.where(first, t, bad_t), torch.where(first, loss, bad_loss)
            self.optimizer.step()
            self.iteration += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.iteration)
        return total, bad_t, bad_loss

    def _check_finite(self, t: int, loss: float) -> None:
        """Stop every rank if any rank's loss was not finite (first at iteration ``t`` with value ``loss``
        here; t < 0: never): the weights are not either now, and must never be evaluated, guided with or
        checkpointed."""
        bad = [(t, loss) for t, loss in self.world.all_gather((t, loss)) if t >= 0]
        if bad:
            t, loss = min(bad, key=lambda b: b[0])
            raise NonFiniteError(
                f"train: the learner's loss at iteration {t} is {loss} (not finite): it diverged; "
                f"lower train.lr (now {self.cfg.lr:g})"
            )

    def _share_batchnorm(self) -> None:
        """Average BatchNorm running statistics over the processes (they saw different micro-batches)."""
        if self.batchnorm and self.world.distributed:
            from timm.utils import distribute_bn

            for module in {id(self.model): self.model, id(self.eval_model): self.eval_model}.values():
                distribute_bn(module, self.world.size, reduce=True)

    def _augment(self, images: torch.Tensor, t: int, m: int) -> torch.Tensor:
        size = self.input_size or images.shape[-1]
        if self.cfg.augment != "none":
            rng = torch.Generator().manual_seed(step_seed(self.seed, t, AUGMENT, m))
            return crop_flip(images, size, rng, crop=self.cfg.augment == "crop_flip", min_scale=self.cfg.crop_min_scale)
        return self._to_input(images)

    def _loss(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, t: int, m: int) -> torch.Tensor:
        """The training loss: the forward pass in ``train.precision`` and layout, the loss in float32."""
        targets = None
        if self.mixcut is not None:
            images, targets = self.mixcut(images, labels, step_seed(self.seed, t, MIX, m))  # (smoothing: in targets)
        with autocast(self.device, self.cfg.precision):
            logits = net(images.contiguous(memory_format=self.layout)).float()
        if targets is None:
            return F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        return soft_target_loss(logits, targets)

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the model reads them: resized to ``input_size`` when stored at another size."""
        return images if self.input_size is None else resize(images, self.input_size)

    @contextmanager
    def _dropout_rng(self, t: int, m: int) -> Iterator[None]:
        # Dropout draws from torch's global RNG (the device's, on CUDA): seed it for this micro-batch inside a
        # fork, so runs are reproducible whatever else touched the global RNG, and resume needs no state.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed(self.seed, t, DROPOUT, m))
            yield

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits on the CPU, in chunks of ``train.eval_batch_size`` (images may live anywhere)."""
        size = self.cfg.eval_batch_size
        return torch.cat([self._chunk_logits(images[i : i + size]).cpu() for i in range(0, len(images), size)])

    def _chunk_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits of one chunk of uint8 images, on the learner's device."""
        return self.eval_model.eval()(self._to_input(from_uint8(images.to(self.device))))

    def accuracy(self, data: LabelledImages) -> float:
        """Correct ÷ total over ``data``, counted in integers: each process scores its block of the chunks
        (or, of a split read in blocks, the block it holds) and the counts are summed, so every process
        gets the same accuracy (and makes the same decisions)."""
        mine, whole = data, data.split_size
        if whole is None:  # every process holds the whole split
            rows, whole = self.world.chunk_rows(len(data), self.cfg.eval_batch_size), len(data)
            mine = LabelledImages(data.images[rows.start : rows.stop], data.labels[rows.start : rows.stop])
        correct = int((self.logits(mine.images).argmax(-1) == mine.labels).sum()) if len(mine) else 0
        correct, total = self.world.all_sum([correct, len(mine)])
        if total != whole:
            raise ValueError(f"the processes hold {total} of the split's {whole} rows: it was read on another world")
        return correct / total

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable logits in eval mode (on the learner's device): what entropy guidance
        back-propagates through."""
        return self.eval_model.eval()(self._to_input(images.to(self.device)))

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimiser, EMA and the iteration: with draws keyed by (seed, iteration), no RNG state."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
