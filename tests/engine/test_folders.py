"""Image-folder datasets (data.name=folder): layout, class order, resizing, and one-line errors that
come before any work."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from dp_ops.cli import app
from dp_ops.config import build_config, load_config
from dp_ops.engine.folders import load_folder_data, read_image
from dp_ops.errors import ConfigError, DataError
from dp_ops.runner import load_real_data, preflight

from conftest import make_image_folder


def _data_cfg(tmp_path, **data):
    tree = {
        "name": "folder",
        "val_root": str(tmp_path / "val"),
        "test_root": str(tmp_path / "test"),
        "resolution": 16,
        **data,
    }
    return build_config({"generator": {"backend": "sd", "model": "unused"}, "data": tree}).data


@pytest.fixture
def folders(tmp_path):
    make_image_folder(tmp_path / "val", per_class=3)
    make_image_folder(tmp_path / "test", per_class=2, seed=1)
    return tmp_path


def test_classes_from_sorted_folders_labels_and_resolution(folders):
    real = load_folder_data(_data_cfg(folders))
    assert real.num_classes == 3 and real.class_names == ("cat", "dog", "red fox")  # '_' -> ' ' for prompts
    assert real.val.images.shape == (9, 3, 16, 16) and real.test.images.shape == (6, 3, 16, 16)
    assert real.val.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert real.val.images.dtype == torch.uint8  # held as bytes; floats only per evaluated chunk
    # class k is bright in channel k: the labels really follow the folders
    means = torch.stack([real.val.images[real.val.labels == k].float().mean(dim=(0, 2, 3)) for k in range(3)])
    assert means.argmax(dim=1).tolist() == [0, 1, 2]
    assert len(real.gen_train) == 0  # nothing to train a generator on: sd is pretrained


def test_explicit_class_list_sets_order_and_ignores_other_folders(folders):
    make_image_folder(folders / "val", classes=("zebra",))  # only in val: ignored when classes are listed
    cfg = _data_cfg(folders, classes=["red_fox", "cat"], class_names=["a red fox", "a cat"])
    real = load_folder_data(cfg)
    assert real.num_classes == 2 and real.class_names == ("a red fox", "a cat")
    assert real.val.labels.tolist() == [0, 0, 0, 1, 1, 1]
    red = real.val.images[real.val.labels == 0].float().mean(dim=(0, 2, 3))
    assert red.argmax() == 2  # red_fox (third folder) is label 0 now


def test_images_become_rgb_squares_at_the_resolution(tmp_path):
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255  # a white centre third
    Image.fromarray(wide).save(tmp_path / "wide.jpg")
    Image.fromarray(np.full((10, 10), 128, dtype=np.uint8)).save(tmp_path / "grey.png")
    out = read_image(tmp_path / "wide.jpg", 8)
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8
    assert out.min() > 200  # centre crop of the resized image: only the white part
    assert read_image(tmp_path / "grey.png", 8).shape == (3, 8, 8)


def _expect(exc_type, fn, *fragments):
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_empty_class_is_named(folders):
    for f in (folders / "test" / "dog").iterdir():
        f.unlink()
    _expect(DataError, lambda: load_folder_data(_data_cfg(folders)), "test/dog: empty class folder (data.test_root)")


def test_unreadable_file_is_named(folders):
    (folders / "val" / "cat" / "broken.png").write_bytes(b"not a png at all")
    _expect(
        DataError, lambda: load_folder_data(_data_cfg(folders)), "val/cat/broken.png: unreadable image (data.val_root)"
    )


def test_mismatched_class_sets_between_splits(folders):
    make_image_folder(folders / "test", classes=("zebra",))
    _expect(
        DataError,
        lambda: load_folder_data(_data_cfg(folders)),
        "data.val_root and data.test_root have different class folders",
        "only in test: ['zebra']",
    )


def test_listed_class_missing_and_missing_root(folders, tmp_path):
    _expect(
        DataError,
        lambda: load_folder_data(_data_cfg(folders, classes=["cat", "owl"])),
        "data.classes: 'owl' has no folder in data.val_root=",
    )
    _expect(
        DataError,
        lambda: load_folder_data(_data_cfg(folders, test_root=str(tmp_path / "nope"))),
        "data.test_root=",
        "no such folder",
    )
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    _expect(
        DataError,
        lambda: load_folder_data(_data_cfg(folders, val_root=str(tmp_path / "flat"))),
        "no class folders in it",
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.name=folder"], "data.val_root='': data.name='folder' needs it"),
        (
            ["data.name=folder", "data.val_root=a", "data.test_root=b"],
            "data.name='folder': needs a pretrained pipeline",
        ),
        (
            [
                "data.name=folder",
                "data.val_root=a",
                "data.test_root=b",
                "generator.backend=sd",
                "generator.model=m",
                "data.classes=[a, b]",
                "data.class_names=[x]",
            ],
            "data.class_names has 1 names for 2 data.classes",
        ),
        (["data.resolution=128"], "data.resolution=128: must be <= 64 for data.name='digits'"),
    ],
)
def test_folder_config_errors_are_one_line(tmp_path, overrides, expected):
    (tmp_path / "p.yaml").write_text("{}\n")
    message = _expect(ConfigError, lambda: load_config(tmp_path / "p.yaml", overrides))
    assert message.startswith(expected), message


def test_cli_reports_a_broken_dataset_before_any_work(folders, tmp_path):
    (folders / "val" / "dog" / "1.png").write_bytes(b"\x89PNG garbage")
    tree = {
        "device": "cpu",
        "data": {"name": "folder", "val_root": str(folders / "val"), "test_root": str(folders / "test")},
        "generator": {"backend": "sd", "model": str(tmp_path / "no-sd")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "output": {"shards": str(tmp_path / "runs")},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="not a complete StableDiffusionPipeline folder"):
        preflight(cfg)  # the model folder is checked first ...
    (tmp_path / "no-sd").mkdir()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "no-sd" / sub).mkdir()
    preflight(cfg)  # ... and the layout passes; the broken file surfaces when reading, still before any work:
    with pytest.raises(DataError):
        load_real_data(cfg)
    result = CliRunner().invoke(app, ["run", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "dog/1.png: unreadable image (data.val_root)" in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # nothing was started
