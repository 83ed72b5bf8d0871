"""The pieces every backend shares: seeded noise, the UNet-evaluation count, the one resize."""

import numpy as np
import torch
import torch.nn.functional as F

from dp_ops.engine.data import resize
from dp_ops.engine.sampling import seeded_noise, unet_evals


def test_seeded_noise_is_per_sample():
    both = seeded_noise(np.array([3, 7]), (2, 4, 4), "cpu")
    assert both.shape == (2, 2, 4, 4)
    assert torch.equal(both[1], seeded_noise(np.array([7]), (2, 4, 4), "cpu")[0])  # whatever the batch
    assert not torch.equal(both[0], both[1])


def test_unet_evals_count_one_pass_per_step_two_with_cfg():
    assert unet_evals(12, 4, 1.0) == 48
    assert unet_evals(12, 4, 2.0) == 96


def test_resize_is_antialiased_differentiable_and_identity_at_size():
    x = torch.rand(2, 3, 8, 8)
    assert resize(x, 8) is x
    aa = F.interpolate(x, size=(3, 3), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(resize(x, 3), aa)  # what the learner and the SD backend always did
    y = x.clone().requires_grad_(True)
    resize(y, 5).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert resize(x, 16, antialias=False).shape == (2, 3, 16, 16)
