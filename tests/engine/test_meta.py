"""The device tier: the learner with every model on torch's ``meta`` device (every backend's sampler: the backend
contract suite, tests/engine/backends/test_contract.py).

``meta`` tensors have shapes and dtypes but no data, and like CUDA tensors they refuse to mix with CPU
tensors in an op (0-d CPU scalars excepted). A CPU tensor left where a model runs (timesteps, labels,
noise, a schedule table) fails here as it would on the first GPU, in milliseconds and without one.
What a meta run cannot check is numbers: values, determinism and speed need a real device
(``bench/gpu_check.py``).
"""

import pytest
import torch

from dp_ops.config import LearnerConfig, TrainConfig
from dp_ops.engine.learner import Trainer, build_learner

META = torch.device("meta")


@pytest.mark.parametrize(
    "recipe",
    # (not train.ema_decay: timm's ModelEmaV3 makes a torch.Generator on the weights' device, which meta has not)
    [{}, {"augment": "crop_flip", "mixup": 0.5, "cutmix": 1.0, "precision": "float32"}],
    ids=["default", "paper-extras"],
)
def test_learner_trains_and_evaluates_on_a_non_cpu_device(real, recipe):
    """The training step as :meth:`Trainer.train` runs it up to its one read of the device, at the end, and
    the evaluation of a chunk of real images as :meth:`Trainer.logits` runs it up to its copy to the CPU."""
    cfg = TrainConfig(iterations=10, eval_every=5, batch_size=8, **recipe)
    model = build_learner(LearnerConfig(model="dpops_convnet_tiny"), real.num_classes, 1, seed=0)
    trainer = Trainer(model, cfg, seed=0, input_size=6, device=META)
    total, bad_t, bad_loss = trainer._steps(real.val, 2)
    assert trainer.iteration == 2 and {total.device, bad_t.device, bad_loss.device} == {META}
    assert {p.device for p in trainer.model.parameters()} == {META}
    logits = trainer._chunk_logits(real.val.images[:5])
    assert logits.device == META and logits.shape == (5, real.num_classes)
