"""Corrupted inputs are one clear line, never silently wrong data: damaged
checkpoints and generator folders, generators and learners whose numbers are NaN."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dp_ops.config import build_config, load_config
from dp_ops.engine.backends.pixel import PixelDiffusion
from dp_ops.engine.learner import Trainer, build_learner
from dp_ops.engine.loop import DPLoop, Observer
from dp_ops.engine.saved import META_FILE, WEIGHTS
from dp_ops.errors import DataError, GeneratorError, NonFiniteError
from dp_ops.records.checkpoint import Checkpointer, checkpoint_path, load_checkpoint

from conftest import outputs_in, tiny_tree


def _flip(path, size=4096, at=0.5):
    """XOR ``size`` bytes of ``path`` with 0xFF, starting at fraction ``at`` of the file (what a bad disk,
    a bad copy or a bad RAM stick does)."""
    data = bytearray(path.read_bytes())
    assert len(data) > size, f"{path} is only {len(data)} bytes"
    start = min(int(len(data) * at), len(data) - size)
    data[start : start + size] = bytes(b ^ 0xFF for b in data[start : start + size])
    path.write_bytes(bytes(data))


def _one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---- checkpoints -----------------------------------------------------------------------------------------
@pytest.fixture
def saved_state(tiny_cfg, tiny_generator, real, tmp_path):
    loop = DPLoop(tiny_cfg, tiny_generator, real, shards=tmp_path / "runs")
    loop.trainer.train(real.val, 2)  # (an optimiser state too)
    state = loop.state_dict()
    path = checkpoint_path(tmp_path / "checkpoints", "run1")
    Checkpointer(path).on_checkpoint(state)
    return path, state


def test_a_checkpoint_loads_back_exactly(saved_state):
    path, state = saved_state
    loaded = load_checkpoint(path)
    assert loaded.keys() == state.keys() and loaded["plateau"] == state["plateau"]
    assert loaded["trainer"]["iteration"] == 2 and loaded["trainer"]["optimizer"]["state"]
    weights = state["trainer"]["model"]
    assert all(torch.equal(loaded["trainer"]["model"][k], v) for k, v in weights.items())


@pytest.mark.parametrize("at", [0.3, 0.5, 0.8])
def test_a_checkpoint_with_4kb_of_flipped_bytes_is_refused(saved_state, at):
    path, _ = saved_state
    _flip(path, at=at)
    with pytest.raises(DataError) as info:
        load_checkpoint(path)
    message = _one_line(info)
    assert message.startswith(f"{path}: damaged checkpoint") and "start a new run" in message, message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty checkpoint (0 bytes)"),
        (b"not a torch file at all\n" * 10, "damaged checkpoint, torch cannot read it"),
    ],
)
def test_an_empty_or_garbage_checkpoint_is_one_line(saved_state, content, expected):
    path, _ = saved_state
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_checkpoint(path)
    assert _one_line(info).startswith(f"{path}: {expected}"), str(info.value)


def test_a_torch_file_that_is_not_a_checkpoint_is_refused(saved_state):
    path, _ = saved_state
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(DataError, match=r": not a dp_ops checkpoint \(expected the keys records, curve"):
        load_checkpoint(path)


def test_a_checkpoint_from_before_checksums_still_loads(saved_state):
    path, state = saved_state
    torch.save(state, path)  # the bare state, as checkpoints were written before
    assert load_checkpoint(path)["plateau"] == state["plateau"]


@pytest.mark.parametrize("content", [b"", b"garbage" * 1000])
def test_resume_from_an_empty_or_corrupt_state_pt_is_one_line(
    tmp_path, mlflow_store, tiny_generator, tiny_params, content
):
    """Through the CLI, an empty or a corrupt state.pt is one line (not a bare `Aborted.`, nor a traceback)."""
    from mlflow import MlflowClient

    from dp_ops.cli import app
    from dp_ops.records.tracking import MlflowTracker, TrackingStore

    params = tiny_params(
        tmp_path,
        generator={"path": str(tmp_path / "gen")},
        tracking={"uri": mlflow_store(tmp_path), "experiment": "t"},
        output=outputs_in(tmp_path / "out"),
    )
    cfg = load_config(params)
    tiny_generator.save(cfg.generator.path)
    tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg)  # a run that crashed after its first round
    with pytest.raises(RuntimeError), tracker.lifecycle():
        raise RuntimeError("crash")
    state = checkpoint_path(cfg.output.checkpoints, tracker.run_id)
    state.parent.mkdir(parents=True)
    state.write_bytes(content)
    result = CliRunner().invoke(app, ["run", "--params", str(params), "--resume", tracker.run_id])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output and "Aborted" not in result.output, result.output
    error = next(line for line in lines if line.startswith("error:"))
    assert f"{state}: " in error and "start a new run" in error, result.output
    assert MlflowClient(cfg.tracking.uri).get_run(tracker.run_id).info.status != "RUNNING"


# ---- generator folders -----------------------------------------------------------------------------------
@pytest.fixture
def gen_cfg(tmp_path):
    return build_config(tiny_tree(generator={"path": str(tmp_path / "gen")}))


@pytest.fixture
def saved_generator(tiny_generator, gen_cfg):
    tiny_generator.save(gen_cfg.generator.path)
    return gen_cfg.generator.path


def _preflight(cfg):
    from dp_ops.runner import preflight

    preflight(cfg)


def test_a_saved_generator_records_checksums_and_loads(saved_generator, gen_cfg, tiny_generator):
    from pathlib import Path

    meta = json.loads((Path(saved_generator) / META_FILE).read_text())
    assert set(meta["sha256"]) == {WEIGHTS, "unet/config.json", "scheduler/scheduler_config.json"}
    _preflight(gen_cfg)
    loaded = PixelDiffusion.load(saved_generator)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.unet.parameters(), tiny_generator.unet.parameters(), strict=True)
    )


def test_generator_weights_with_4kb_of_flipped_bytes_are_refused(saved_generator, gen_cfg):
    from pathlib import Path

    weights = Path(saved_generator) / WEIGHTS
    _flip(weights)
    for check in (lambda: _preflight(gen_cfg), lambda: PixelDiffusion.load(saved_generator)):
        with pytest.raises(GeneratorError) as info:
            check()
        message = _one_line(info)
        assert message.startswith(f"{weights}: damaged (its sha256 is not the one recorded at save)"), message
        assert "dpops generator train" in message


def _garbage_config(g):
    (g / "unet" / "config.json").write_text("{ this is not json")


def _garbage_meta(g):
    (g / META_FILE).write_bytes(b"\x00\xff garbage")


def _meta_missing_key(g):
    meta = json.loads((g / META_FILE).read_text())
    del meta["num_classes"]
    (g / META_FILE).write_text(json.dumps(meta))


def _meta_a_list(g):
    (g / META_FILE).write_text("[1, 2]")


def _truncated_weights(g):
    data = (g / WEIGHTS).read_bytes()
    (g / WEIGHTS).write_bytes(data[: len(data) // 2])


def _empty_weights(g):
    (g / WEIGHTS).write_bytes(b"")


def _missing_weights(g):
    (g / WEIGHTS).unlink()


def _missing_scheduler(g):
    shutil.rmtree(g / "scheduler")


@pytest.mark.parametrize(
    ("damage", "file", "expected"),
    [
        (_garbage_config, "unet/config.json", "not valid JSON"),
        (_garbage_meta, META_FILE, "not valid JSON"),
        (_meta_missing_key, META_FILE, "missing key 'num_classes'"),
        (_meta_a_list, META_FILE, "not a JSON object of keys"),
        (_truncated_weights, WEIGHTS, "damaged (its sha256"),
        (_empty_weights, WEIGHTS, "empty file (0 bytes)"),
        (_missing_weights, WEIGHTS, "missing from the generator folder"),
        (_missing_scheduler, "scheduler/scheduler_config.json", "missing from the generator folder"),
    ],
)
def test_a_damaged_generator_folder_is_one_line_at_preflight(saved_generator, gen_cfg, damage, file, expected):
    from pathlib import Path

    folder = Path(saved_generator)
    damage(folder)
    with pytest.raises(GeneratorError) as info:
        _preflight(gen_cfg)  # before any work: no data loaded, nothing trained or written
    message = _one_line(info)
    assert message.startswith(f"{folder / file}: {expected}"), message
    with pytest.raises(GeneratorError, match="dpops generator train"):
        PixelDiffusion.load(folder)


def test_a_generator_saved_before_checksums_still_loads(saved_generator, gen_cfg):
    from pathlib import Path

    meta_file = Path(saved_generator) / META_FILE
    meta = json.loads(meta_file.read_text())
    del meta["sha256"], meta["format"]  # (a folder saved before checksums declared no format)
    meta_file.write_text(json.dumps(meta))
    _preflight(gen_cfg)
    PixelDiffusion.load(saved_generator)
    _truncated_weights(Path(saved_generator))  # without checksums, diffusers' own error is still one line
    with pytest.raises(GeneratorError, match=r"diffusers cannot load the generator \("):
        PixelDiffusion.load(saved_generator)


def test_an_empty_generator_folder_is_trained_into(gen_cfg, tmp_path):
    from dp_ops.errors import ConfigError

    (tmp_path / "gen").mkdir()
    _preflight(gen_cfg)  # "use an empty or new folder": an empty one is accepted
    (tmp_path / "gen" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="use an empty or new folder"):
        _preflight(gen_cfg)


# ---- non-finite numbers stop the run before anything is versioned ----------------------------------------
class _Rounds(Observer):
    def __init__(self):
        self.rounds = []

    def on_round(self, record, round_parts):
        self.rounds.append(record.round)


def test_a_generator_with_nan_weights_stops_the_run_before_versioning(tiny_generator, real, tmp_path, mlflow_uri):
    """The checksum of such a generator is valid (it was saved so), its samples are NaN: the run stops at
    round 0 with one line, and no round is versioned, logged or written."""
    from mlflow import MlflowClient

    from dp_ops.runner import load_pixel, run_tracked

    unet = copy.deepcopy(tiny_generator.unet)
    with torch.no_grad():
        next(unet.parameters()).fill_(float("nan"))
    cfg = build_config(
        tiny_tree(
            generator={"path": str(tmp_path / "gen")},
            tracking={"uri": mlflow_uri, "experiment": "t"},
            output={
                "metrics": str(tmp_path / "metrics.json"),
                "rounds": str(tmp_path / "rounds.json"),
                "shards": str(tmp_path / "runs"),
                "checkpoints": str(tmp_path / "checkpoints"),
            },
        )
    )
    PixelDiffusion(unet, tiny_generator.scheduler, tiny_generator.meta).save(cfg.generator.path)
    generator = load_pixel(cfg)  # checksums match: the file is what was saved
    seen = _Rounds()
    with pytest.raises(GeneratorError) as info:
        run_tracked(cfg, generator, real, [seen])
    message = _one_line(info)
    assert message.startswith("round 0, samples 0-39: the generator's samples are not finite (NaN or inf)"), message
    assert seen.rounds == []  # no round reached the observers: nothing versioned or logged
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])  # the parent only
    assert run.info.status == "FAILED"
    assert not list((tmp_path / "runs").rglob("*.safetensors")) and not list(tmp_path.rglob("state.pt"))
    assert not (tmp_path / "metrics.json").exists()


def _nan_trainer(tiny_cfg, real):
    model = build_learner(tiny_cfg.learner, real.num_classes, 1, seed=0)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    return Trainer(model, tiny_cfg.train, seed=0)


def test_a_nan_loss_stops_training(tiny_cfg, real):
    trainer = _nan_trainer(tiny_cfg, real)
    with pytest.raises(NonFiniteError) as info:
        trainer.train(real.val, 3)
    assert _one_line(info).startswith("train: the learner's loss at iteration 0 is nan (not finite)")
    assert trainer.iteration == 3  # (checked once per train(), on the device: before any evaluation or checkpoint)


def test_a_nan_entropy_stops_the_round_before_its_parts_are_written(tiny_cfg, tiny_generator, real, tmp_path):
    from dp_ops.engine.rounds import Sampling, generate_round

    trainer = _nan_trainer(tiny_cfg, real)
    how = Sampling(steps=2, cfg_scale=2.0, guide_every=1, batch_size=8, learner=trainer.classify)
    with pytest.raises(NonFiniteError) as info:
        generate_round(
            tiny_generator,
            torch.arange(16) % 10,
            np.arange(16),
            tmp_path / "round_00",
            how,
            round_index=3,
            omega=0.0,
            part_size=8,
            fmt="raw",
        )
    assert (
        _one_line(info)
        == "round 3, samples 0-7: the learner's entropy is not finite (NaN or inf): the learner diverged"
    )
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_round_of_saturated_images_stops_before_its_parts_are_written(tiny_cfg, tiny_generator, real, tmp_path):
    """An ω far past the config's bound (generate_round does not read the config) makes
    every pixel ±1 after the clamp (the default generator: ~10 levels): finite, and no images. The round stops
    with one line before any part is written; at the config's bound (ω = 1) the same round is made."""
    from dp_ops.engine.rounds import Sampling, generate_round

    trainer = Trainer(build_learner(tiny_cfg.learner, real.num_classes, 1, seed=0), tiny_cfg.train, seed=0)
    trainer.train(real.val, 20)
    how = Sampling(steps=4, cfg_scale=2.0, guide_every=1, batch_size=8, learner=trainer.classify)

    def round_at(omega, folder):
        return generate_round(
            tiny_generator,
            torch.arange(16) % 10,
            np.arange(16),
            folder,
            how,
            round_index=2,
            omega=omega,
            part_size=8,
            fmt="raw",
        )

    with pytest.raises(GeneratorError) as info:
        round_at(1e39, tmp_path / "huge")
    assert _one_line(info).startswith(
        "round 2, samples 0-7: the generator's samples saturate (a median of 2 distinct pixel values per image; "
        "images take over 16)"
    ), info.value
    assert "at ω=1e+39 the guided steps overshoot" in str(info.value)
    assert not (tmp_path / "huge").exists() or not list((tmp_path / "huge").iterdir())
    made = round_at(1.0, tmp_path / "bound")
    assert len(made) == 16 and len(made.parts) == 2


# ---- the largest values a config accepts -----------------------------------------------------------------
@pytest.mark.slow
def test_runs_at_the_largest_accepted_values_finish_or_stop_in_one_line(dvc_workspace):
    """The bounds of dp_ops/config/bounds.py are where a run still works: the largest seeds (torch.manual_seed takes
    < 2**64, scikit-learn's split < 2**32; seed >= 2**64 and split_seed >= 2**32 used to stop a started run with
    a traceback), and at once the largest lr, weight decay, ω, CFG scale and Mixup/CutMix α. Each run finishes
    (exit 0), or stops in one line if a runtime check refuses what it made; never a traceback."""
    import subprocess
    import sys

    ws, env = dvc_workspace()
    runs = {
        "seeds": ["seed=18446744073709551615", "data.split_seed=4294967295", "generator.path=models/gen-max"],
        "recipe": [
            "train.lr=1",
            "train.weight_decay=1",
            "dp.omega=1",
            "generator.cfg_scale=30",
            "train.mixup=100",
            "train.cutmix=100",
        ],
    }
    for name, overrides in runs.items():
        args = [a for o in [*overrides, "tracking.log_model=true"] for a in ("-S", o)]
        done = subprocess.run(
            [sys.executable, "-m", "dp_ops", "run", *args], cwd=ws, env=env, capture_output=True, text=True
        )
        out = done.stdout + done.stderr
        assert "Traceback" not in out, (name, out[-3000:])
        if done.returncode:
            errors = [line for line in out.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, (name, out[-3000:])
        else:
            assert "final val acc" in out, (name, out[-3000:])
