"""Every stored thing declares its format: one written the old way is brought forward on read or refused in one
line naming its format, the one this dp_ops reads and how to re-make it; one written now reads back as it was."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import optuna
import pytest
import torch

from dp_ops import __version__
from dp_ops.config import SweepConfig
from dp_ops.engine.saved import CHECKSUMS, FORMAT_KEY, META_FILE, WEIGHTS, check_saved, read_meta
from dp_ops.errors import ConfigError, DataError, GeneratorError
from dp_ops.formats import FORMAT_TAG, FORMATS, Unreadable, declared, upgrade
from dp_ops.records.checkpoint import Checkpointer, load_checkpoint, state_digest
from dp_ops.records.versioning import DvcVersioner, _dvc_add
from dp_ops.studies.sweep import open_study


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---- the mechanism ---------------------------------------------------------------------------------------
def test_no_version_is_format_0_and_a_tag_string_is_a_number():
    assert declared("run", None, "run r1") == 0
    assert declared("run", "1", "run r1") == 1  # (an MLflow tag is a string)
    with pytest.raises(DataError) as info:
        declared("run", "one", "run r1")
    assert _one_line(info) == (
        f"run r1: the run's dpops.format MLflow tag is 'one', not a format number; {FORMATS['run'].remake}"
    )


def test_a_format_newer_than_this_dp_ops_reads_is_one_line_saying_upgrade_dp_ops():
    newer = FORMATS["study"].current + 1
    with pytest.raises(ConfigError) as info:
        declared("study", newer, "--study-name s")
    assert _one_line(info) == (
        f"--study-name s is format {newer} of sweep study, newer than dp_ops {__version__} reads "
        f"(format {FORMATS['study'].current}): upgrade dp_ops"
    )


def test_upgrade_takes_one_step_per_format_and_refuses_a_format_without_one():
    steps = {0: lambda t: [*t, "0->1"], 1: lambda t: [*t, "1->2"]}
    assert upgrade("checkpoint", [], 0, "x", steps) == ["0->1", "1->2"]
    assert upgrade("checkpoint", [], 1, "x", steps) == ["1->2"]
    assert upgrade("checkpoint", [], 2, "x", {}) == []  # the current format: as it is
    with pytest.raises(DataError) as info:
        upgrade("checkpoint", [], 0, "x", {1: steps[1]})
    assert _one_line(info) == (
        f"x is format 0 of checkpoint; dp_ops {__version__} reads format 2 and cannot bring it forward: "
        "it cannot be resumed from: start a new run"
    )

    def unreadable(thing: list) -> list:
        raise Unreadable("why not")

    with pytest.raises(DataError, match=r"^x is format 1 of checkpoint \(why not\); dp_ops"):
        upgrade("checkpoint", [], 1, "x", {1: unreadable})


# ---- checkpoints -----------------------------------------------------------------------------------------
def _state(**record: object) -> dict:
    r = {"round": 0, "pool_size": 4, "n_new": 4, "omega": 0.0, "model_evals": 8, **record}
    return {"records": [r], "curve": [[0, 0.5]], "plateau": {"best": 0.5}, "trainer": {"w": torch.arange(3.0)}}


def test_a_checkpoint_written_now_declares_the_current_format_and_loads_back(tmp_path):
    path = tmp_path / "state.pt"
    Checkpointer(path).on_checkpoint(_state())
    assert torch.load(path, weights_only=True)["dpops_checkpoint"] == FORMATS["checkpoint"].current == 2
    loaded = load_checkpoint(path)
    assert loaded["records"] == _state()["records"] and torch.equal(loaded["trainer"]["w"], torch.arange(3.0))


def test_a_format_1_checkpoint_names_model_evaluations_as_now(tmp_path):
    path, old = tmp_path / "state.pt", _state()
    old["records"][0]["unet_evals"] = old["records"][0].pop("model_evals")  # as dp_ops before 0.10.0 named them
    torch.save({"dpops_checkpoint": 1, "sha256": state_digest(old), "state": old}, path)
    (record,) = load_checkpoint(path)["records"]
    assert record["model_evals"] == 8 and "unet_evals" not in record


def test_a_format_0_checkpoint_the_bare_state_loads_unchecked(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(_state(), path)  # the bare state, as dp_ops before 0.5.0 wrote it
    assert load_checkpoint(path)["records"] == _state()["records"]


def test_a_format_0_checkpoint_whose_rounds_have_no_omega_is_one_line(tmp_path):
    path, old = tmp_path / "state.pt", _state()
    del old["records"][0]["omega"]  # as dp_ops 0.1 wrote round records
    torch.save(old, path)
    with pytest.raises(DataError) as info:
        load_checkpoint(path)
    assert _one_line(info) == (
        f"{path} is format 0 of checkpoint (its round records have no ω: written by dp_ops 0.1, before rounds "
        f"were stored as parts); dp_ops {__version__} reads format 2 and cannot bring it forward: it cannot be "
        "resumed from: start a new run"
    )


def test_a_checkpoint_of_a_newer_format_is_one_line(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"dpops_checkpoint": 3, "sha256": state_digest(_state()), "state": _state()}, path)
    with pytest.raises(DataError, match=r"state\.pt is format 3 of checkpoint, newer than dp_ops .* upgrade dp_ops$"):
        load_checkpoint(path)


# ---- generator folders -----------------------------------------------------------------------------------
@pytest.fixture
def folder(tiny_generator, tmp_path) -> Path:
    path = tmp_path / "gen"
    tiny_generator.save(path)
    return path


def _rewrite_meta(folder: Path, change) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    change(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def test_a_generator_saved_now_declares_its_format_and_checks_back(folder, tiny_generator):
    assert json.loads((folder / META_FILE).read_text())[FORMAT_KEY] == FORMATS["generator"].current == 1
    assert asdict(check_saved(folder)) == json.loads(json.dumps(asdict(tiny_generator.meta)))


def test_a_format_0_generator_with_checksums_keeps_them_checked(folder):
    _rewrite_meta(folder, lambda meta: meta.pop(FORMAT_KEY))  # as dp_ops 0.5.0 to 0.11.0 saved one
    assert read_meta(folder)[CHECKSUMS] == json.loads((folder / META_FILE).read_text())[CHECKSUMS]
    (folder / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(GeneratorError, match=r"damaged \(its sha256 is not the one recorded at save\)"):
        check_saved(folder)


def test_a_format_0_generator_without_checksums_or_settings_gets_empty_ones(folder, tiny_generator):
    for key in (FORMAT_KEY, CHECKSUMS, "training"):  # as dp_ops before 0.5.0 saved one
        _rewrite_meta(folder, lambda meta, key=key: meta.pop(key))
    assert read_meta(folder)[CHECKSUMS] == {}
    expected = {**json.loads(json.dumps(asdict(tiny_generator.meta))), "training": {}}
    assert asdict(check_saved(folder)) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (CHECKSUMS, "sha256 must map file names to checksums; retrain"),
        ("training", "missing key 'training' (it needs resolution"),
    ],
)
def test_a_format_1_generator_must_have_its_checksums_and_settings(folder, key, expected):
    _rewrite_meta(folder, lambda meta: meta.pop(key))
    with pytest.raises(GeneratorError) as info:
        check_saved(folder)
    assert _one_line(info).startswith(f"{folder / META_FILE}: {expected}")


def test_a_generator_of_a_newer_format_is_one_line(folder):
    _rewrite_meta(folder, lambda meta: meta.update({FORMAT_KEY: 2}))
    with pytest.raises(GeneratorError) as info:
        check_saved(folder)
    assert _one_line(info).startswith(f"{folder / META_FILE} is format 2 of generator folder, newer than dp_ops")


# ---- sweep studies ---------------------------------------------------------------------------------------
def _journal(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def test_a_study_made_now_declares_its_format(tmp_path):
    study = open_study(SweepConfig(storage=str(tmp_path / "s.journal")), "s", "dp")
    assert study.user_attrs[FORMAT_TAG] == FORMATS["study"].current == 1
    assert study.metric_names == ["final_val_acc"]


def test_a_format_0_study_gets_its_metric_names_and_its_format_written(tmp_path):
    journal = tmp_path / "old.journal"
    old = optuna.create_study(study_name="old", storage=_journal(journal), directions=["maximize"])
    for key, value in {"dpops.strategy": "dp", "dpops.objective": ["final_val_acc"], "dpops.ready": True}.items():
        old.set_user_attr(key, value)  # as dp_ops before 0.6.0 made a study: no metric names, no format
    open_study(SweepConfig(storage=str(journal)), "old", "dp")
    again = optuna.load_study(study_name="old", storage=_journal(journal))
    assert again.metric_names == ["final_val_acc"] and again.user_attrs[FORMAT_TAG] == 1


def test_a_study_of_a_newer_format_is_one_line(tmp_path):
    journal = tmp_path / "new.journal"
    open_study(SweepConfig(storage=str(journal)), "s", "dp").set_user_attr(FORMAT_TAG, 2)
    with pytest.raises(ConfigError) as info:
        open_study(SweepConfig(storage=str(journal)), "s", "dp")
    assert _one_line(info).startswith("--study-name s is format 2 of sweep study, newer than dp_ops")


# ---- runs' DVC layout ------------------------------------------------------------------------------------
def test_a_run_versioned_with_one_dvc_file_per_round_is_one_line(tmp_path):
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    run = tmp_path / "runs" / "old"
    (run / "round_000").mkdir(parents=True)
    (run / "round_000" / "part_00000.safetensors").write_bytes(b"\x00" * 64)
    _dvc_add(tmp_path, run / "round_000")  # as dp_ops before 0.6.0 versioned each round
    with pytest.raises(DataError) as info:
        DvcVersioner(run)
    assert _one_line(info) == (
        f"{run} is format 0 of dp_ops run (one round_<k>.dvc per round, as dp_ops before 0.6.0 versioned runs); "
        f"dp_ops {__version__} reads format 1 and cannot bring it forward: {FORMATS['run'].remake}"
    )
    shutil.rmtree(run)
    assert DvcVersioner(run).data_dir == run  # a new run's folder: nothing to refuse


def test_a_run_without_ood_from_an_embedded_world_is_refused_and_folder_and_current_runs_read_as_they_are():
    from dp_ops.studies.bench_stats import run_metrics

    metrics = {"final_test_acc": 0.9}
    with pytest.raises(DataError, match=r"run r1 is format 0 of dp_ops run .*no final_ood_acc"):
        run_metrics("r1", {}, {"data.name": "digits"}, metrics)
    assert run_metrics("r2", {}, {"data.name": "folder"}, metrics) == metrics  # image folders have no OOD set
    assert run_metrics("r3", {FORMAT_TAG: "1"}, {"data.name": "digits"}, metrics) == metrics  # (a current run)
    with pytest.raises(DataError, match="upgrade dp_ops"):
        run_metrics("r4", {FORMAT_TAG: "2"}, {}, metrics)
