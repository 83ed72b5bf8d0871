"""The DiT adapter on tiny random DiT components (built, saved with save_pretrained, loaded back with
from_pretrained): class ids for classes, the null class for CFG, learned σ, guidance; all on the CPU."""

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import json
import shutil

import numpy as np
import pytest
import torch

from dp_ops.engine import sampling
from dp_ops.engine.backends.dit import DiT, class_ids_for, label_ids
from dp_ops.engine.backends.dit_random import TINY_CLASSES, imagenet_id2label, random_components, save_pipeline
from dp_ops.engine.backends.latent import PipelineSettings
from dp_ops.errors import GeneratorError

# a label name with '_' and another case, a WordNet id, a label name as the pipeline has it
NAMES = ("Great_White_Shark", "n01443537", "German shepherd")
IDS = (2, 1, 235)
SETTINGS = PipelineSettings(learner_resolution=16)


@pytest.fixture(scope="module")
def parts():
    return random_components("tiny", seed=0)


@pytest.fixture(scope="module")
def dit(parts):
    return DiT.from_components(parts, NAMES, SETTINGS)


@pytest.fixture(scope="module")
def dit_path(parts, tmp_path_factory):
    return save_pipeline(parts, tmp_path_factory.mktemp("dit") / "tiny-dit")


def _learner(x):
    """Logits that depend on the image (so guidance has a gradient), no training needed."""
    return x.flatten(1)[:, : len(NAMES)] * 5


def _sample(gen, labels=(0, 1, 2, 0), seeds=(11, 12, 13, 14), **kw):
    kw = {"steps": 3, "cfg_scale": 4.0, "learner": _learner, **kw}
    return gen.sample(torch.tensor(labels), np.array(seeds), **kw)


def test_samples_have_the_shape_and_range_and_do_not_depend_on_their_batch(dit):
    assert dit.class_ids.tolist() == list(IDS) and dit.null_class == 1000
    assert dit.resolution == 32 and dit.noise_shape == (4, 16, 16)  # 16² latents, the model's own size
    s = _sample(dit)
    assert s.images.shape == (4, 3, 32, 32) and s.images.min() >= -1 and s.images.max() <= 1
    assert s.images.std() > 0.01  # not a constant image
    assert s.model_evals == 3 * 4 * 2  # CFG: a conditional and an unconditional evaluation per step
    assert torch.equal(s.images, _sample(dit).images)  # same seeds, same bytes
    alone = _sample(dit, labels=(2,), seeds=(13,))
    assert torch.allclose(alone.images[0], s.images[2], atol=1e-5)  # a sample does not depend on its batch
    assert not torch.allclose(s.images[0], s.images[3], atol=1e-2)  # another seed, another image
    assert _sample(dit, cfg_scale=1.0).model_evals == 3 * 4
    with pytest.raises(GeneratorError, match=r"generator\.resolution=18: must be a multiple of 4"):
        DiT.from_components(random_components("tiny"), NAMES, PipelineSettings(resolution=18))


def test_cfg_is_one_batched_call_with_the_null_class_and_learned_sigma_dropped(dit):
    calls = []

    def spy(module, args, kwargs, output):
        calls.append((args[0].shape, kwargs["timestep"].clone(), kwargs["class_labels"].clone(), output.sample))

    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    labels, t = torch.tensor([2, 0, 1]), torch.tensor(501)
    handle = dit.transformer.register_forward_hook(spy, with_kwargs=True)
    try:
        guided = dit.model_output(z, t, labels, 4.0)
        plain = dit.model_output(z, t, labels, 1.0)
    finally:
        handle.remove()
    (shape, timestep, y, out), (shape1, _, y1, out1) = calls
    assert shape == (6, 4, 16, 16) and timestep.tolist() == [501] * 6  # both halves, t expanded to the batch
    assert y.tolist() == [235, 2, 1, 1000, 1000, 1000]  # class ids, then the null class
    assert out.shape[1] == 8 and guided.shape == plain.shape == z.shape  # learned σ: 2C out, C kept
    eps_c, eps_u = out[:3, :4], out[3:, :4]
    assert torch.allclose(guided, eps_u + 4.0 * (eps_c - eps_u), atol=1e-6)  # CFG on the ε channels only
    assert shape1 == (3, 4, 16, 16) and y1.tolist() == [235, 2, 1]  # s = 1: the conditional half alone
    assert torch.equal(plain, out1[:, :4]) and torch.allclose(plain, eps_c, atol=1e-5)
    assert not torch.allclose(eps_c, eps_u, atol=1e-3)  # the null class is a different condition


@pytest.mark.parametrize("gradient", ["full", "x0"])
def test_entropy_guidance_runs_and_moves_the_samples(dit, gradient):
    kw = dict(guide_every=1, gradient=gradient)
    plain = sampling.denoise(dit, torch.tensor([0, 1]), np.array([5, 6]), steps=3, cfg_scale=4.0, learner=_learner)
    guided = sampling.denoise(
        dit, torch.tensor([0, 1]), np.array([5, 6]), steps=3, cfg_scale=4.0, learner=_learner, omega=0.1, **kw
    )
    assert guided.shape == plain.shape == (2, 4, 16, 16) and torch.isfinite(guided).all()
    assert ((guided - plain).flatten(1).norm(dim=1) > 1e-2 * plain.flatten(1).norm(dim=1)).all()


def test_classes_map_by_label_name_wordnet_id_or_class_ids():
    id2label = imagenet_id2label(TINY_CLASSES)
    assert label_ids(id2label)["white shark"] == {2} and label_ids(id2label)["crane"] == {134, 517}
    by = lambda *names, ids=(): class_ids_for(names, 1000, id2label, ids)
    assert by("goldfish", "great_white_shark", "Carassius auratus", "german_shepherd_dog") == (1, 2, 1, 235)
    assert by("n01440764", "n03126707", "n02012849") == (0, 517, 134)  # WordNet ids: any ImageNet-1k class
    assert by("goldfish", "unicorn", ids=(7, 999)) == (7, 999)  # data.class_ids win over names
    assert class_ids_for(["n01443537"], 1000) == (1,)  # no labels needed for a WordNet id


@pytest.mark.parametrize(
    ("names", "ids", "expected"),
    [
        (
            ("goldfish", "unicorn"),
            (),
            "class 'unicorn': no single DiT class id; name each class folder by one of the "
            "pipeline's label names (e.g. 'goldfish' or 'great_white_shark'), by its ImageNet WordNet id (e.g. "
            "'n01443537'), or set data.class_ids (one id in 0..999 per class)",
        ),
        (("crane",), (), "class 'crane' (label of classes 134, 517): no single DiT class id"),
        (("n99999999",), (), "class 'n99999999': no single DiT class id"),
        (tuple(f"x{k}" for k in range(7)), (), "classes 'x0', 'x1', 'x2', 'x3', 'x4' and 2 more: no single DiT"),
        (("goldfish", "tench"), (1,), "data.class_ids has 1 ids for 2 classes: give one per class"),
        (("goldfish",), (1000,), "data.class_ids=[1000]: 1000 is not a class of this model (ids 0..999)"),
    ],
)
def test_a_class_it_cannot_map_is_one_line_before_any_sampling(parts, names, ids, expected, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(sampling, "denoise", no_sampling)
    with pytest.raises(GeneratorError) as info:
        DiT.from_components(parts, names, PipelineSettings(class_ids=ids))
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_save_pipeline_round_trips_through_load(dit_path, dit):
    assert sorted(p.name for p in dit_path.iterdir()) == ["model_index.json", "scheduler", "transformer", "vae"]
    index = json.loads((dit_path / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["id2label"]["2"].startswith("great white shark, ")
    loaded = DiT.load(str(dit_path), NAMES, SETTINGS)
    assert loaded.class_ids.tolist() == list(IDS)  # by the labels model_index.json carries
    assert torch.equal(_sample(loaded).images, _sample(dit).images)
    swapped = DiT.load(str(dit_path), NAMES, PipelineSettings(learner_resolution=16, scheduler="dpm_solver"))
    assert type(swapped.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert not torch.allclose(_sample(swapped).images, _sample(dit).images, atol=1e-3)


def test_a_hub_style_folder_loads_and_a_bad_one_is_one_line(dit_path, tmp_path):
    """facebook/DiT-XL-2-256's transformer config still names the class Transformer2DModel, with its keys."""
    hub = shutil.copytree(dit_path, tmp_path / "hub")
    config = hub / "transformer" / "config.json"
    hub_keys = {"_class_name": "Transformer2DModel", "cross_attention_dim": None, "use_linear_projection": False}
    config.write_text(json.dumps({**json.loads(config.read_text()), **hub_keys}))
    assert DiT.load(str(hub), ("goldfish",), SETTINGS).class_ids.tolist() == [1]
    for folder in (tmp_path / "missing", dit_path / "transformer"):
        with pytest.raises(GeneratorError) as info:
            DiT.load(str(folder), NAMES, SETTINGS)
        message = str(info.value)
        assert (
            message.startswith(f"generator.model={str(folder)!r}: cannot load a DiT pipeline") and "\n" not in message
        )
    shutil.rmtree(hub / "vae")
    with pytest.raises(GeneratorError, match="cannot load a DiT pipeline"):
        DiT.load(str(hub), NAMES, SETTINGS)


def test_the_dit_xl_2_256_shapes_build_on_the_meta_device():
    with torch.device("meta"):
        parts = random_components("dit-xl-2-256")
    t = parts["transformer"]
    assert (t.config.num_layers, t.config.num_attention_heads, t.config.attention_head_dim) == (28, 16, 72)
    assert (t.config.patch_size, t.config.sample_size, t.config.out_channels) == (2, 32, 8)
    # DiT-XL/2's 675M parameters, plus diffusers' copy of the timestep/label embedder in each of the 28 blocks
    assert sum(p.numel() for p in t.parameters()) == 749_826_464
    assert next(t.parameters()).is_meta and len(parts["id2label"]) == 1000
