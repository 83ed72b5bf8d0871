import pytest
from pydantic import ValidationError

from dp_ops.config import flatten, load_config
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
