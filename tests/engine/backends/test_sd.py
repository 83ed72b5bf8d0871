"""The text-to-image world on tiny random Stable Diffusion components (built, saved with save_pretrained,
loaded back with from_pretrained), an image folder made here, and a timm learner; all on the CPU."""

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from mlflow import MlflowClient
from transformers import CLIPTextModel
from typer.testing import CliRunner

from dp_ops.cli import app
from dp_ops.config import LearnerConfig, TrainConfig, build_config, flatten, from_flat, load_config
from dp_ops.engine import sampling
from dp_ops.engine.backends.latent import PipelineSettings, pipeline_configs
from dp_ops.engine.backends.sd import StableDiffusion
from dp_ops.engine.backends.sd_random import random_components, save_pipeline
from dp_ops.engine.data import LabelledImages, quantize
from dp_ops.engine.devices import resolve_dtype
from dp_ops.engine.guidance import StepScalars, entropy_guidance, predict_x0
from dp_ops.engine.learner import Trainer, build_learner
from dp_ops.engine.shards import PartReader, scan_round
from dp_ops.errors import ConfigError, GeneratorError
from dp_ops.paths import CONFIG_FILES, check_generator, check_pipeline
from dp_ops.records.tracking import config_params, round_runs
from dp_ops.records.versioning import dir_md5, md5_file
from dp_ops.resume import restore_run_data
from dp_ops.runner import generator_facts, load_pipeline, preflight
from helpers import learner_entropy

from conftest import make_image_folder

NAMES = ("cat", "dog", "red fox")


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    save_pipeline(random_components("tiny", seed=0), path)
    return path


@pytest.fixture(scope="module")
def sd(sd_path):
    return StableDiffusion.load(str(sd_path), NAMES, PipelineSettings(output_resolution=24, learner_resolution=16))


def _fixed_learner(x):
    """Logits that depend on the image (so guidance has a gradient), no training needed."""
    return x.flatten(1)[:, : len(NAMES)] * 5


def test_pipeline_round_trips_through_save_pretrained(sd_path, sd):
    assert sorted(p.name for p in sd_path.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    assert sd.resolution == 32 and sd.vae_factor == 2  # 16² latents, the model's own size
    assert sd.cond.shape == (3, 77, 16) and sd.uncond.shape == (1, 77, 16)
    assert not torch.allclose(sd.cond[0], sd.cond[2])  # prompts differ by class
    templated = StableDiffusion.load(str(sd_path), NAMES, PipelineSettings(prompt="a photo of a {name}"))
    assert templated.prompts[2] == "a photo of a red fox" and not torch.allclose(templated.cond, sd.cond)
    with pytest.raises(GeneratorError, match=r"generator\.resolution=18: must be a multiple of 4"):
        StableDiffusion.load(str(sd_path), NAMES, PipelineSettings(resolution=18))
    with pytest.raises(GeneratorError, match="cannot load a Stable Diffusion pipeline"):
        StableDiffusion.load(str(sd_path / "unet"), NAMES, PipelineSettings())


def test_guidance_is_the_shared_function_every_kth_step(sd, monkeypatch):
    calls = []
    real = sampling.entropy_guidance

    def spy(*args, **kwargs):
        calls.append(args[5] if len(args) > 5 else kwargs["to_learner"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "entropy_guidance", spy)
    out = sd.sample(
        torch.tensor([0, 1, 2]),
        np.arange(3),
        steps=6,
        cfg_scale=4.0,
        learner=_fixed_learner,
        omega=0.05,
        guide_every=2,
        batch_size=2,
    )
    assert len(calls) == 2 * 3  # two batches, steps 0, 2, 4 each
    assert all(fn == sd.to_learner for fn in calls)  # x̂0 -> VAE decode -> the learner's input size
    assert out.images.shape == (3, 3, 24, 24) and out.model_evals == 6 * 3 * 2  # CFG: two UNet halves per step


@pytest.mark.slow
def test_guided_samples_have_higher_learner_entropy(sd):
    """The current learner (trained on unguided samples) finds guided samples harder than unguided ones
    drawn from the same seeds."""
    labels = torch.arange(90) % 3
    pool_samples = sd.sample(labels, np.arange(90), steps=4, cfg_scale=4.0, learner=_fixed_learner, batch_size=90)
    recipe = TrainConfig(iterations=200, eval_every=200, batch_size=16, lr=0.01, warmup_fraction=0, cooldown_fraction=0)
    trainer = Trainer(
        build_learner(LearnerConfig(model="dpops_convnet_tiny", drop_rate=0.0), 3, 3, 0), recipe, 0, input_size=16
    )
    pool = LabelledImages(quantize(pool_samples.images), labels)
    trainer.train(pool, recipe.iterations)
    new_labels, new_seeds = torch.arange(24) % 3, np.arange(1000, 1024)
    kw = dict(steps=4, cfg_scale=4.0, learner=trainer.classify, guide_every=1, batch_size=24)
    unguided = sd.sample(new_labels, new_seeds, omega=0.0, **kw)
    guided = sd.sample(new_labels, new_seeds, omega=0.1, **kw)
    assert guided.entropy.mean() > unguided.entropy.mean() + 0.1, (guided.entropy.mean(), unguided.entropy.mean())
    # scored as trained on:
    assert torch.allclose(unguided.entropy, learner_entropy(trainer, unguided.images), atol=1e-5)


def test_paper_recipe_trains_reproducibly_and_resumes_exactly():
    """Random-resized-crop/flip, Mixup/CutMix and EMA: same seed, same weights; a checkpoint continues
    exactly; the EMA is what is evaluated; stored images larger than the input are cropped to it."""
    recipe = TrainConfig(
        iterations=8,
        eval_every=8,
        batch_size=8,
        augment="crop_flip",
        mixup=0.5,
        cutmix=1.0,
        ema_decay=0.5,
        label_smoothing=0.11,
    )
    gen = torch.Generator().manual_seed(0)
    pool = LabelledImages(quantize(torch.rand(32, 3, 24, 24, generator=gen) * 2 - 1), torch.arange(32) % 3)

    def trainer():
        model = build_learner(LearnerConfig(model="dpops_convnet_tiny", drop_rate=0.1), 3, 3, 0)
        return Trainer(model, recipe, 0, input_size=16)

    a, b = trainer(), trainer()
    np.random.seed(123)  # the Mixup stream is private: the global NumPy state must not matter ...
    a.train(pool, 4)
    np.random.seed(456)
    b.train(pool, 4)
    assert np.random.randint(1000) == np.random.RandomState(456).randint(1000)  # ... nor be consumed
    state = copy.deepcopy(a.state_dict())  # (a checkpoint is a copy: torch.save)
    a.train(pool, 4)
    c = trainer()
    c.load_state_dict(state)
    c.train(pool, 4)
    b.train(pool, 4)
    for x, y, z in zip(a.model.parameters(), b.model.parameters(), c.model.parameters(), strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert a.eval_model is a.ema.module and not torch.equal(a.eval_model.head.weight, a.model.head.weight)
    assert a.classify(pool.images[:2]).shape == (2, 3)  # 24² stored -> 16² input


# ---- dpops run, end to end ------------------------------------------------------------------------------
def _sh(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)


def _sd_tree(tmp_path, sd_path):
    make_image_folder(tmp_path / "images" / "val", per_class=6)
    make_image_folder(tmp_path / "images" / "test", per_class=4, seed=1)
    return {
        "seed": 0,
        "device": "cpu",
        "data": {
            "name": "folder",
            "val_root": str(tmp_path / "images" / "val"),
            "test_root": str(tmp_path / "images" / "test"),
            "resolution": 16,
            "shard_resolution": 24,
        },
        "generator": {"backend": "sd", "model": str(sd_path), "steps": 4, "guide_every": 2, "batch_size": 32},
        "dp": {
            "initial_size": 30,
            "round_size": 12,
            "patience": 1,
            "incremental_patience": False,
            "omega": 0.05,
            "max_rounds": 2,
        },
        "learner": {"model": "dpops_convnet_tiny", "drop_rate": 0.0},
        "train": {
            "iterations": 60,
            "eval_every": 10,
            "batch_size": 16,
            "augment": "crop_flip",
            "mixup": 0.5,
            "cutmix": 1.0,
            "ema_decay": 0.9,
            "label_smoothing": 0.11,
        },
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "output": {
            "metrics": "out/metrics.json",
            "rounds": "out/rounds.json",
            "shards": "data/runs",
            "checkpoints": "out/checkpoints",
        },
    }


@pytest.mark.slow
def test_dpops_run_with_the_sd_backend_end_to_end(tmp_path, sd_path, monkeypatch, mlflow_store):
    mlflow_store(tmp_path)  # the store _sd_tree names, already migrated
    ws = tmp_path / "ws"
    ws.mkdir()
    _sh("git", "init", "-q", cwd=ws)
    _sh(sys.executable, "-m", "dvc", "init", "-q", cwd=ws)
    monkeypatch.chdir(ws)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    tree = _sd_tree(tmp_path, sd_path)
    (ws / "params.yaml").write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["run", "-S", "generator.backend=sd", "-S", f"generator.model={sd_path}"])
    assert result.exit_code == 0, result.output
    assert "MLflow run" in result.output and "each round added to DVC" in result.output
    rounds = json.loads((ws / "out" / "rounds.json").read_text())["rounds"]
    assert len(rounds) >= 2 and rounds[1]["val_acc_at_trigger"] is not None  # a round was triggered

    client = MlflowClient(tree["tracking"]["uri"])
    experiment_id = client.get_experiment_by_name("dp-ops").experiment_id
    (run,) = client.search_runs([experiment_id], "tags.`dpops.role` = 'experiment'")
    assert run.info.status == "FINISHED" and run.data.params["generator.backend"] == "sd"
    assert run.data.params["train.mixup"] == "0.5" and run.data.params["data.shard_resolution"] == "24"
    children = round_runs(client, run.info.run_id)
    assert len(children) == len(rounds)
    for child, record in zip(children, rounds, strict=True):
        folder, digest = ws / child.data.tags["dpops.shard_path"], child.data.tags["dpops.shard_md5"]
        parts = scan_round(folder)
        assert parts and all(p.fmt == "png" for p in parts)  # encoded, not a float/uint8 array
        images = np.concatenate([PartReader(p.path).images() for p in parts])
        assert images.shape == (record["n_new"], 3, 24, 24)  # the configured resolution
        listing = json.loads(
            Path(client.download_artifacts(child.info.run_id, "parts.json", str(tmp_path))).read_text()
        )
        assert digest == dir_md5(listing) and len(digest) == 36  # DVC's .dir digest: fits MLflow's column
        assert [md5_file(folder / e["relpath"]) for e in listing] == [e["md5"] for e in listing]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert f"samples_round{record['round']}.png" in artifacts

    # every round comes back byte for byte from the DVC cache with only the store
    restored = restore_run_data(run.info.run_id, tmp_path / "restored", tracking_uri=tree["tracking"]["uri"])
    originals = sorted(p for p in (ws / "data" / "runs").rglob("part_*.safetensors"))
    assert [md5_file(p) for p in restored] == [md5_file(p) for p in originals]
    for path in restored:
        data = PartReader(path).images()
        assert data.shape[1:] == (3, 24, 24) and data.dtype == np.uint8
    recorded = {**tree, "train": {**tree.get("train", {}), "micro_batches": 1}}  # (0, one per process, resolved)
    assert from_flat(config_params(run.data.params)) == build_config(recorded)  # rebuilt (resumed) from MLflow


def test_part_bytes_do_not_depend_on_the_metadata_order(tmp_path):
    """safetensors writes metadata from a hash map whose order changes between processes; parts sort it
    so that the same part always has the same md5 (and deduplicates in the DVC cache)."""
    from dp_ops.engine.shards import _canonical_header, write_part

    path = tmp_path / "part_00000.safetensors"
    images = np.zeros((2, 3, 8, 8), np.uint8)
    write_part(
        path, images, np.arange(2), np.zeros(2), np.arange(2), round_index=3, index=0, start=0, omega=0.05, fmt="png"
    )
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    shuffled = {"__metadata__": dict(sorted(header.pop("__metadata__").items(), reverse=True)), **header}
    text = json.dumps(shuffled, separators=(",", ":")).encode().ljust(size, b" ")
    path.write_bytes(raw[:8] + text + raw[8 + size :])  # what another process may have written
    assert path.read_bytes() != raw
    _canonical_header(path)
    assert path.read_bytes() == raw
    assert PartReader(path).images().shape == (2, 3, 8, 8)


def test_cuda_only_options_fail_in_one_line_before_work(tmp_path, sd_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tree = _sd_tree(tmp_path, sd_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    for override, expected in (
        ("device=cuda", "device='cuda': no CUDA device on this machine; use device=auto or cpu"),
        ("generator.dtype=bfloat16", "generator.dtype='bfloat16': needs a CUDA device, but device='cpu'"),
    ):
        result = CliRunner().invoke(app, ["run", "--params", str(params), "-S", override])
        assert result.exit_code == 1 and expected in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started
    auto = build_config({**tree, "device": "auto", "generator": {**tree["generator"], "dtype": "float16"}})
    with pytest.raises(ConfigError, match=r"generator\.dtype='float16': needs a CUDA device, but device='auto'"):
        preflight(auto)
    with pytest.raises(ConfigError, match="device='gpu': must be auto, cpu, cuda or cuda:N"):
        build_config({**tree, "device": "gpu"})


def test_sd_defaults_and_config_checks():
    base = {"data": {"name": "folder", "val_root": "v", "test_root": "t"}}
    g = build_config({**base, "generator": {"backend": "sd", "model": "m"}}).generator
    assert (g.steps, g.cfg_scale, g.guide_every, g.batch_size, g.prompt) == (30, 4.0, 5, 8, "{name}")  # paper
    assert build_config({}).generator.steps == 6  # the pixel world's defaults are untouched
    example = load_config(Path(__file__).parents[3] / "examples" / "params-sd.yaml")
    assert (example.generator.backend, example.data.stored_resolution, example.train.mixup) == ("sd", 256, 0.5)
    assert example.train.channels_last and example.generator.gradient_checkpointing  # what a GPU wants
    assert example.generator.dtype == "auto"  # bfloat16 on CUDA; the file also loads (and runs) on a CPU
    flat = flatten(build_config({**base, "generator": {"backend": "sd", "model": "m", "prompt": "{name}"}}))
    assert from_flat({k: str(v) for k, v in flat.items()}).generator.prompt == "{name}"  # survives YAML
    for tree, expected in (
        ({"generator": {"backend": "sd", "model": "m"}}, "generator.backend='sd': needs real images from folders"),
        ({**base, "generator": {"backend": "sd"}}, "generator.model='': generator.backend='sd' needs"),
        (
            {"generator": {"dtype": "float16"}},
            "generator.dtype='float16': only for a pretrained pipeline (generator.backend: sd, sdxl",
        ),
        ({**base, "generator": {"backend": "sd", "model": "m", "prompt": "a {label}"}}, "generator.prompt='a {label}'"),
        ({"train": {"mixup": 0.5, "batch_size": 15}}, "train.batch_size=15: must be even"),
    ):
        with pytest.raises(ConfigError) as info:
            build_config(tree)
        assert str(info.value).startswith(expected), str(info.value)


# ---- GPU-facing loading: dtype, VAE upcast, gradient checkpointing, what the backend can drive --------------
def _spy_loads(monkeypatch):
    """The dtype of each component's parameters right after its from_pretrained returned."""
    seen = {}
    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel):

        def spy(*args, _real=cls.from_pretrained, _name=cls.__name__, **kwargs):
            model = _real(*args, **kwargs)
            seen[_name] = {p.dtype for p in model.parameters()}
            return model

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return seen


def test_weights_are_read_in_the_pipelines_dtype(sd_path, monkeypatch):
    seen = _spy_loads(monkeypatch)
    sd = StableDiffusion.load(str(sd_path), NAMES, PipelineSettings(dtype=torch.bfloat16))
    assert seen == {name: {torch.bfloat16} for name in ("UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel")}
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {torch.bfloat16}


def test_a_float16_pipeline_keeps_a_force_upcast_vae_in_float32(sd_path, tmp_path, monkeypatch):
    """SDXL's VAE (and any whose config says force_upcast, AutoencoderKL's default) overflows float16."""
    seen = _spy_loads(monkeypatch)
    sd = StableDiffusion.load(str(sd_path), NAMES, PipelineSettings(dtype=torch.float16))
    assert seen["AutoencoderKL"] == {torch.float32} and seen["UNet2DConditionModel"] == {torch.float16}
    assert sd.vae.dtype == torch.float32 and sd.unet.dtype == torch.float16
    images = sd.to_images(_noise(sd, [1, 2]))
    assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32) and images.isfinite().all()
    kept = tmp_path / "no-upcast"
    shutil.copytree(sd_path, kept)
    _edit_json(kept / "vae" / "config.json", force_upcast=False)
    assert StableDiffusion.load(str(kept), NAMES, PipelineSettings(dtype=torch.float16)).vae.dtype == torch.float16
    parts = random_components("tiny", seed=0)  # (built in code: cast by the constructor, the same rule)
    built = StableDiffusion.from_components(parts, NAMES, PipelineSettings(dtype=torch.float16))
    assert built.vae.dtype == torch.float32 and built.text_encoder.dtype == torch.float16


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_the_cpu(tmp_path, sd_path):
    assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "meta") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16
    cfg = build_config(_sd_tree(tmp_path, sd_path))
    assert cfg.generator.dtype == "auto"  # the sd default
    assert load_pipeline(cfg, NAMES).dtype == torch.float32  # on this CPU
    assert generator_facts(cfg).meta["dtype"] == "float32"  # what the run records (generator_meta.dtype)


def _noise(sd, seeds):
    """x_T of ``seeds`` as the sampler draws it."""
    return torch.stack([torch.randn(sd.noise_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _guided_step(sd, through_eps):
    """One entropy-guided step of two latents, and the bytes autograd saved for its backward pass."""
    saved = []
    t = torch.tensor(500)

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step = entropy_guidance(
            _noise(sd, [1, 2]),
            lambda x: sd.model_output(x, t, torch.tensor([0, 2]), 4.0),
            lambda x, out: predict_x0(x, out, "vp:epsilon", StepScalars(alpha_bar=sd.scheduler.alphas_cumprod[t])),
            _fixed_learner,
            0.1,
            sd.to_learner,
            through_eps=through_eps,
        )
    return step.x_t, sum(saved)


@pytest.mark.parametrize("gradient", ["full", "x0"])
def test_gradient_checkpointing_keeps_the_guidance_step_and_saves_memory(gradient):
    """Frozen weights, eval mode, a gradient with respect to x_t only: checkpointing must be the non-reentrant
    kind (the reentrant one refuses autograd.grad) and active outside training mode."""

    def build(checkpointing):
        parts = random_components("tiny", seed=0)
        settings = PipelineSettings(learner_resolution=16, gradient_checkpointing=checkpointing)
        return StableDiffusion.from_components(parts, NAMES, settings)

    plain, kept = _guided_step(build(False), gradient == "full")
    checkpointed, kept_checkpointed = _guided_step(build(True), gradient == "full")
    start = _noise(build(False), [1, 2])
    assert not torch.equal(plain, start)  # guidance moved x_t ...
    assert torch.equal(checkpointed, plain)  # ... the same way with checkpointing
    assert kept_checkpointed < kept / 3, (kept_checkpointed, kept)


def test_attention_slicing_costs_memory_when_guidance_back_propagates_through_the_unet():
    """Why the config refuses attention_slicing with guidance_gradient=full: sliced attention keeps every
    probability matrix for the backward pass, which SDPA does not."""

    def build(slicing):
        parts = random_components("tiny", seed=0)
        settings = PipelineSettings(learner_resolution=16, attention_slicing=slicing)
        return StableDiffusion.from_components(parts, NAMES, settings)

    (sdpa, sliced) = build(False), build(True)
    assert _guided_step(sliced, True)[1] > _guided_step(sdpa, True)[1]  # full: more, not less
    assert _guided_step(sliced, False)[1] == _guided_step(sdpa, False)[1]  # x0: no UNet backward, no cost


def _edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _unsupported(path, case):
    """A copy of the tiny pipeline's configs, changed into something the backend cannot drive."""
    shutil.copytree(path, case, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return case


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        (
            {
                "model_index.json": {"_class_name": "StableDiffusionXLPipeline"},
                "unet/config.json": {"addition_embed_type": "text_time"},
            },
            "a StableDiffusionXLPipeline, which generator.backend=sd does not drive (use generator.backend=sdxl or "
            "diffusers)",
        ),
        (
            {"model_index.json": {"_class_name": "FluxPipeline"}, "unet": None},
            "a FluxPipeline, which generator.backend=sd does not drive (backends drive:",
        ),
        (
            {"unet/config.json": {"addition_embed_type": "text_time"}},
            "its UNet takes extra conditioning (addition_embed_type='text_time', as SDXL's does), which "
            "generator.backend=sd does not drive",
        ),
        ({"unet/config.json": {"class_embed_type": "timestep"}}, "extra conditioning (class_embed_type='timestep'"),
        (
            {"unet/config.json": {"cross_attention_dim": 32}},
            "its UNet attends to text embeddings of width 32 but its text encoder gives 16",
        ),
        (
            {"scheduler/scheduler_config.json": {"prediction_type": "flow"}},
            "its scheduler's prediction_type='flow' is not one dp_ops can invert for x̂0 "
            "(epsilon, v_prediction, sample, flow_prediction)",
        ),
    ],
)
def test_a_pipeline_the_backend_cannot_drive_is_refused_before_any_weight_is_read(
    tmp_path, sd_path, monkeypatch, edits, expected
):
    folder = _unsupported(sd_path, tmp_path / "unsupported")
    for name, change in edits.items():
        if change is None:
            shutil.rmtree(folder / name)
        else:
            _edit_json(folder / name, **change)
    cfg = build_config({**_sd_tree(tmp_path, sd_path), "generator": {"backend": "sd", "model": str(folder)}})
    with pytest.raises(ConfigError) as early:
        check_generator(cfg)  # the CLI's check, before torch or diffusers is imported
    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", _no_weights)
    with pytest.raises(ConfigError) as at_load:
        load_pipeline(cfg, NAMES)  # what a hub id gets: its configs checked before any weight is read
    for info in (early, at_load):
        message = str(info.value)
        assert message.startswith(f"generator.model={str(folder)!r}: ") and expected in message, message
        assert "\n" not in message


def _no_weights(*args, **kwargs):
    raise AssertionError("weights were read")


def test_the_configs_the_backend_drives_pass(tmp_path, sd_path):
    """SD-1.x/2.x configs, v-prediction included (the shared sampler computes x̂0 for it)."""
    folder = _unsupported(sd_path, tmp_path / "v")
    _edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    assert check_pipeline(str(folder), "sd", pipeline_configs(str(folder), CONFIG_FILES)) == "sd"
    check_generator(build_config({**_sd_tree(tmp_path, sd_path), "generator": {"backend": "sd", "model": str(folder)}}))
