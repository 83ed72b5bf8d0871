"""The pieces every backend shares: the model-evaluation count, the one resize (the sampler itself: the backend
contract suite, tests/engine/backends/test_contract.py)."""

import torch
import torch.nn.functional as F

from dp_ops.engine.data import resize
from dp_ops.engine.sampling import Generator


def test_model_evals_count_one_pass_per_step_two_with_cfg():
    assert Generator.evals_per_step(None, 1.0) == 1  # type: ignore[arg-type]
    assert Generator.evals_per_step(None, 2.0) == 2  # type: ignore[arg-type]


def test_resize_is_antialiased_differentiable_and_identity_at_size():
    x = torch.rand(2, 3, 8, 8)
    assert resize(x, 8) is x
    aa = F.interpolate(x, size=(3, 3), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(resize(x, 3), aa)  # what the learner and the SD backend always did
    y = x.clone().requires_grad_(True)
    resize(y, 5).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert resize(x, 16, antialias=False).shape == (2, 3, 16, 16)
