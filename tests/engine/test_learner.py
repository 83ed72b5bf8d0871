"""The Trainer's device discipline: DDP's buffer keyword on every supported torch, no host reads per step,
a non-finite loss named by its first iteration, and real splits scored where they were read."""

import sys
from pathlib import Path

import pytest
import torch

from dp_ops.config import build_config
from dp_ops.engine import learner
from dp_ops.engine.data import LabelledImages
from dp_ops.engine.dist import World
from dp_ops.engine.learner import Trainer, build_learner, no_forward_buffer_sync
from dp_ops.errors import NonFiniteError

from conftest import tiny_tree


def test_ddp_buffer_keyword_on_torch_with_and_before_forward_sync_buffers():
    ddp = torch.nn.parallel.DistributedDataParallel
    assert no_forward_buffer_sync(ddp) == {"forward_sync_buffers": False}  # torch >= 2.13 (no deprecation warning)

    def ddp_before_2_13(module, device_ids=None, broadcast_buffers=True, init_sync=True): ...

    assert no_forward_buffer_sync(ddp_before_2_13) == {"broadcast_buffers": False}


def test_a_trainer_on_several_processes_builds_ddp_with_the_keyword_its_torch_has(tiny_cfg, monkeypatch):
    built = []

    class OldDDP:  # torch 2.4's signature, and no process group needed
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            built.append({"device_ids": device_ids, "broadcast_buffers": broadcast_buffers})

    monkeypatch.setattr(learner, "DistributedDataParallel", OldDDP)
    model = build_learner(tiny_cfg.learner, 10, 1, seed=0)
    Trainer(model, tiny_cfg.train.model_copy(update={"micro_batches": 2}), seed=0, world=World(size=2))
    assert built[0]["broadcast_buffers"] is False and built[0]["device_ids"] is None


def _host_reads(monkeypatch):
    """Counts dp_ops' reads of a tensor's value by the host (on a GPU each waits for the device; torch's
    optimisers read their step counter, a CPU tensor by design)."""
    count = [0]
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, original=original):
            count[0] += "dp_ops" in Path(sys._getframe(1).f_code.co_filename).parts
            return original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, read)
    return count


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_training_reads_nothing_from_the_device_per_step(tiny_cfg, real, monkeypatch, micro_batches):
    cfg = tiny_cfg.train.model_copy(update={"micro_batches": micro_batches})
    reads = []
    for steps in (1, 6):
        trainer = Trainer(build_learner(tiny_cfg.learner, 10, 1, seed=0), cfg, seed=0)
        with monkeypatch.context() as m:
            count = _host_reads(m)
            loss = trainer.train(real.val, steps)
        reads.append(count[0])
        assert loss > 0 and trainer.iteration == steps
    assert reads[0] == reads[1]  # the same few at the end of train(), however many steps


def test_a_loss_that_turns_nan_names_its_first_iteration(real):
    cfg = build_config(tiny_tree(train={"ema_decay": 0.5}))
    trainer = Trainer(build_learner(cfg.learner, 10, 1, seed=0), cfg.train, seed=0)
    poison = lambda module, inputs, out: out * float("nan") if trainer.iteration >= 3 else out
    trainer.model.register_forward_hook(poison)
    with pytest.raises(NonFiniteError) as info:
        trainer.train(real.val, 6)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("train: the learner's loss at iteration 3 is nan (not finite): it diverged; lower")


def test_a_split_read_in_blocks_is_not_scored_on_a_world_that_did_not_read_it(tiny_cfg, real):
    trainer = Trainer(build_learner(tiny_cfg.learner, 10, 1, seed=0), tiny_cfg.train, seed=0)
    block = LabelledImages(real.val.images[:64], real.val.labels[:64], split_size=len(real.val))
    with pytest.raises(ValueError, match=f"hold 64 of the split's {len(real.val)} rows"):
        trainer.accuracy(block)  # (one process holding a block of two: not the split's accuracy)
    whole = LabelledImages(real.val.images, real.val.labels, split_size=len(real.val))
    assert trainer.accuracy(whole) == trainer.accuracy(real.val)


def test_a_learner_that_diverges_is_never_checkpointed(tiny_cfg, tiny_generator, real, tmp_path):
    from dp_ops.engine.loop import DPLoop
    from dp_ops.records.checkpoint import Checkpointer, load_checkpoint

    path = tmp_path / "state.pt"
    loop = DPLoop(tiny_cfg, tiny_generator, real, [Checkpointer(path)], shards=tmp_path / "runs")
    poison = lambda module, inputs, out: out * float("nan") if loop.trainer.iteration >= 2 else out
    loop.trainer.model.register_forward_hook(poison)
    with pytest.raises(NonFiniteError, match="loss at iteration 2 is nan"):
        loop.run()
    saved = load_checkpoint(path)["trainer"]  # round 0's, before any training: the last one written
    assert saved["iteration"] == 0 and all(w.isfinite().all() for w in saved["model"].values())
