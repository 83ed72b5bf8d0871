import pytest
from pydantic import ValidationError

from dp_ops.config import build_config, flatten, load_config
from dp_ops.errors import ConfigError


def test_params_file_and_overrides(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\ndp:\n  omega: 0.02\n  strategy: static\nsweep:\n  n_trials: 3\n")
    cfg = load_config(params, ["dp.omega=0.1", "seed=3", "generator.channels=[16, 32]"])
    assert cfg.seed == 3 and cfg.dp.omega == 0.1 and cfg.dp.strategy == "static"
    assert cfg.generator.channels == (16, 32)
    assert cfg.dp.round_size == 250  # untouched default


def test_config_is_frozen():
    cfg = load_config(None, [])
    # pydantic refuses the assignment itself (not a ConfigError: no user input is being validated)
    with pytest.raises(ValidationError, match=r"omega\n  Instance is frozen"):
        cfg.dp.omega = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match=r"seed\n  Instance is frozen"):
        cfg.seed = 3  # type: ignore[misc]
    assert cfg.dp.omega == load_config(None, []).dp.omega and cfg.seed == load_config(None, []).seed


def test_flatten_uses_dotted_params_names():
    flat = flatten(load_config(None, ["dp.omega=0.2"]))
    assert flat["dp.omega"] == 0.2
    assert flat["train.eval_every"] == 50
    assert flat["generator.channels"] == [32, 64, 64]
    assert all(not isinstance(v, dict) for v in flat.values())


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("dp.omega=-0.5", "dp.omega=-0.5: input should be greater than or equal to 0"),
        ("dp.round_size=0", "dp.round_size=0: input should be greater than or equal to 1"),
        ("train.iterations=0", "train.iterations=0: input should be greater than or equal to 1"),
        ("dp.strategy=greedy", "dp.strategy='greedy': input should be 'dp', 'static' or 'oversample'"),
        ("train.iterations=lots", "train.iterations='lots': input should be a valid integer"),
        ("generator.path=", "generator.path='': string should have at least 1 character"),
        ("dp.omegaa=1", "dp.omegaa: unknown key (allowed here: incremental_patience, initial_size"),
        ("train.eval_every=5000", "train.eval_every=5000: must be <= train.iterations (2000)"),
        ("generator.channels=[8, 12]", "generator.channels=[8, 12]: every channel count must be a positive multiple"),
        ("omega", "-S 'omega': expected KEY=VALUE"),
        ("seed.x=1", "-S seed.x: 'seed' is a value, not a section"),
    ],
)
def test_bad_values_give_one_line_naming_key_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_bad_params_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dp: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)


# ---- corrupted or slipped inputs (issue 17) ------------------------------------------------------------
def _float_keys(model, prefix=""):
    """Every float key of a section tree, dotted from the top of params.yaml."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _float_keys(kind, f"{prefix}{name}.")
        elif kind is float or kind == float | None:
            yield f"{prefix}{name}"


@pytest.mark.parametrize("value", ["inf", ".inf", "-.inf", "1e309", "nan", ".nan", ".NaN"])
def test_non_finite_omega_is_refused(value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"dp.omega={value}"])
    assert str(info.value).startswith("dp.omega=") and "finite number" in str(info.value)


def test_every_float_key_refuses_infinity():
    from dp_ops.config import Config, SweepConfig, load_tree, sweep_config

    keys = list(_float_keys(Config))
    assert {"dp.omega", "train.lr", "generator.cfg_scale", "data.val_fraction"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigError, match=rf"^{key}=inf: input should be a finite number$"):
            load_config(None, [f"{key}=.inf"])
    sweep_keys = list(_float_keys(SweepConfig, "sweep."))
    assert "sweep.omega.high" in sweep_keys and "sweep.stale_after" in sweep_keys
    for key in sweep_keys:
        with pytest.raises(ConfigError, match=rf"^{key}=nan: input should be a finite number$"):
            sweep_config(load_tree(None, [f"{key}=.nan"]))


@pytest.mark.parametrize("override", ["seed=true", "dp.round_size=false", "dp.omega=true", "sweep.sampler_seed=true"])
def test_booleans_are_not_numbers(override):
    from dp_ops.config import build_config, load_tree, sweep_config

    key, _, raw = override.partition("=")
    tree = load_tree(None, [override])
    check = sweep_config if key.startswith("sweep.") else build_config
    with pytest.raises(ConfigError, match=rf"^{key}={raw.title()}: must be a number, not {raw}$"):
        check(tree)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.iterations=1000000000000", "train.iterations=1000000000000: input should be less than or equal to"),
        ("train.iterations=1.0e+12", "train.iterations=1000000000000.0: input should be less than or equal to"),
        ("dp.round_size=100000000", "dp.round_size=100000000: input should be less than or equal to 10000000"),
        ("dp.initial_size=1.0e+8", "dp.initial_size=100000000.0: input should be less than or equal to 10000000"),
        ("generator.batch_size=10000000", "generator.batch_size=10000000: input should be less than or equal to"),
    ],
)
def test_absurd_sizes_are_refused(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(expected), str(info.value)


def test_oversample_candidates_are_bounded():
    with pytest.raises(ConfigError, match=r"^dp.round_size \* dp.oversample_ratio = 50000000: oversample would"):
        load_config(None, ["dp.strategy=oversample", "dp.round_size=5000000", "dp.oversample_ratio=10"])


def test_a_section_given_as_a_value_is_the_params_files_fault(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\ndp: 5\n")
    for overrides in ([], ["dp.omega=0.1"]):
        with pytest.raises(ConfigError) as info:
            load_config(params, overrides)
        assert str(info.value).startswith(f"--params {params}: dp=5: must be a section of keys ("), str(info.value)
    params.write_text("sweep:\n  omega: 0.3\n")
    with pytest.raises(ConfigError, match=r": sweep.omega=0.3: must be a section of keys \(high, log, low\)$"):
        load_config(params, ["sweep.omega.high=0.5"])


def test_duplicate_keys_in_a_params_file_are_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\ndp:\n  omega: 0.1\n  round_size: 100\n  omega: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(params)
    assert str(info.value) == f"--params {params}: key 'omega' appears twice (lines 3 and 5); keep one"
    params.write_text("dp: {omega: 0.1}\ndp: {omega: 0.2}\n")
    with pytest.raises(ConfigError, match=r"key 'dp' appears twice \(lines 1 and 2\)"):
        load_config(params)
    params.write_text("base: &b {omega: 0.1}\n")  # anchors still work (a foreign key is refused after reading)
    with pytest.raises(ConfigError, match=r"^base: unknown key"):
        load_config(params)


def test_a_params_file_that_is_not_utf8_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes("seed: 1\n# café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(params)
    assert str(info.value) == f"--params {params}: not UTF-8 text (byte 0xe9 at offset 13); save it as UTF-8"


def test_the_experiment_is_the_configs_else_mlflow_experiment_name_else_dp_ops(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert build_config({}).tracking.experiment_name == "dp-ops"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert build_config({}).tracking.experiment_name == "from-env"
    assert build_config({"tracking": {"experiment": "mine"}}).tracking.experiment_name == "mine"


def test_the_mnist_world_runs_the_pixel_generator_and_refuses_what_it_cannot():
    cfg = load_config(None, ["data.name=mnist", "data.resolution=20"])
    assert cfg.data.name == "mnist" and cfg.generator.backend == "pixel"
    refused = {
        "data.name=mnist data.resolution=65": "data.resolution=65: must be <= 64 for data.name='mnist' (28x28 images)",
        "data.name=mnist generator.backend=sd generator.model=m": "generator.backend='sd': needs real images from "
        "folders, set data.name=folder (not 'mnist')",
        "data.name=mnist data.shard_resolution=32": "data.shard_resolution=32: the pixel generator samples at",
        "data.name=cifar": "data.name='cifar': input should be 'digits', 'mnist' or 'folder'",
    }
    for overrides, expected in refused.items():
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides.split())
        message = str(info.value)
        assert message.startswith(expected) and "\n" not in message, message


def test_the_mnist_example_is_params_yaml_in_the_mnist_world():
    from pathlib import Path

    root = Path(__file__).parents[1]
    example, default = (flatten(load_config(root / p)) for p in ("examples/params-mnist.yaml", "params.yaml"))
    changed = {k: (default[k], v) for k, v in example.items() if default[k] != v}
    assert changed == {
        "data.name": ("digits", "mnist"),
        "generator.path": ("models/generator", "models/generator-mnist"),
    }
    assert example["data.resolution"] == 16  # chosen by measurement (README, "The MNIST world")
