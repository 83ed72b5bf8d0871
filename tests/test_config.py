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


# ---- corrupted or slipped inputs -------------------------------------------------------------------------
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


@pytest.mark.parametrize("name", ["job 7", "job;rm", "-job", "a/b", "$SLURM_JOB_NAME", "\u00e9t\u00e9", "x" * 251])
def test_a_run_name_mlflow_or_a_shell_would_mangle_is_one_line(name):
    with pytest.raises(ConfigError) as info:
        build_config({"tracking": {"run_name": name}})
    message = str(info.value)
    assert message.startswith("tracking.run_name=") and "\n" not in message
    assert build_config({"tracking": {"run_name": "dp-sweep_3.a-12"}}).tracking.run_name == "dp-sweep_3.a-12"


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


_SD = {"data": {"name": "folder", "val_root": "v", "test_root": "t"}, "generator": {"backend": "sd", "model": "m"}}


def test_sd_weights_default_to_auto_and_gpu_memory_options_are_sd_only():
    """auto: bfloat16 weights on CUDA, float32 on the CPU (resolved where the device is)."""
    assert build_config(_SD).generator.dtype == "auto" and not build_config(_SD).generator.gradient_checkpointing
    assert build_config({}).generator.dtype == "float32"  # the pixel generator has no dtype of its own
    refused = {
        "generator.gradient_checkpointing=true": "generator.gradient_checkpointing=True: only for a pretrained",
        "generator.dtype=auto": "generator.dtype='auto': only for a pretrained pipeline",
    }
    for override, expected in refused.items():
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert str(info.value).startswith(expected), str(info.value)
    with pytest.raises(ConfigError, match=r"generator\.precision='bfloat16': the pipeline's weights are already auto"):
        build_config({**_SD, "generator": {**_SD["generator"], "precision": "bfloat16"}})


def test_attention_slicing_is_refused_where_guidance_back_propagates_through_the_unet():
    """Sliced attention keeps every slice's probability matrix for the backward pass that SDPA recomputes:
    more memory, not less, in a guided round with the full gradient; the message names what saves memory."""
    sliced = {**_SD, "generator": {**_SD["generator"], "attention_slicing": True}}
    with pytest.raises(ConfigError) as info:
        build_config(sliced)  # dp.strategy=dp, dp.omega=0.05, sd's guidance_gradient=full
    message = str(info.value)
    assert message.startswith("generator.attention_slicing=True: ") and "\n" not in message, message
    for remedy in ("generator.gradient_checkpointing=true", "generator.guidance_gradient=x0", "generator.batch_size"):
        assert remedy in message, message
    for allowed in ({"dp": {"omega": 0.0}}, {"dp": {"strategy": "static"}}, {"dp": {"strategy": "oversample"}}):
        build_config({**sliced, **allowed})  # unguided: slicing saves memory there
    build_config({**sliced, "generator": {**sliced["generator"], "guidance_gradient": "x0"}})  # no UNet backward


# ---- hostile params files and values that overflow -------------------------------------------------------
def _refused(params=None, overrides=(), limit=200):
    """The one line a params file or override is refused with, checked short."""
    with pytest.raises(ConfigError) as info:
        load_config(params, list(overrides))
    message = str(info.value)
    assert "\n" not in message and len(message) <= limit, message[:500]
    return message


def _alias_bomb(levels):
    """Billion laughs: each level a list of 10 aliases of the level below (10**levels strings in all)."""
    lines = ['l0: &l0 "lol"']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nseed: *l{levels}\n"


@pytest.mark.parametrize("levels", [7, 9])
def test_an_alias_bomb_is_refused_in_milliseconds_in_one_short_line(tmp_path, levels):
    """7 levels: 10**7 strings, whose repr in the error line took seconds and 70 MB; 9 levels took 7 minutes
    and 13.8 GB to a MemoryError. Counting what aliases expand to stops it before anything is built."""
    import time

    params = tmp_path / "params.yaml"
    params.write_text(_alias_bomb(levels))
    start = time.perf_counter()
    message = _refused(params)
    assert time.perf_counter() - start < 1.0
    assert message == f"--params {params}: more than 10000 values by line 5 (an alias counts as all it repeats)", (
        message
    )
    with pytest.raises(ConfigError, match=r"^-S seed: the value has more than 10000 values by line 1 \(an alias"):
        load_config(None, [f"seed={{{_alias_bomb(levels).replace(chr(10), ', ')}}}"])


def test_a_small_alias_is_still_fine(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("sizes: &n 40\ndp: {initial_size: *n, round_size: *n}\n")
    with pytest.raises(ConfigError, match=r"^sizes: unknown key"):  # (read; then a foreign key refused)
        load_config(params)
    params.write_text("dp: &d {initial_size: 40}\n")
    assert load_config(params).dp.initial_size == 40


def test_deep_nesting_is_refused_in_one_line_not_a_recursion_error(tmp_path):
    """10,000 levels used to end in a 1,100-line RecursionError from PyYAML's composer."""
    params = tmp_path / "params.yaml"
    params.write_text("seed: " + "[" * 10_000 + "]" * 10_000 + "\n")
    assert _refused(params) == f"--params {params}: nested deeper than 20 levels (line 1)"
    params.write_text("a: &a " + "[" * 15 + "]" * 15 + "\nseed: " + "[" * 10 + "*a" + "]" * 10 + "\n")
    assert _refused(params) == f"--params {params}: nested deeper than 20 levels once aliases are expanded (line 2)"
    _refused(None, ["seed=" + "[" * 5_000 + "]" * 5_000])


def test_a_huge_params_file_is_refused_before_it_is_read(tmp_path):
    """A 50 MB value came back as a 50 MB error line; a 3M-key file took 152 s and 4.9 GB."""
    import time

    params = tmp_path / "params.yaml"
    params.write_text("generator:\n  prompt: " + "x" * (2 << 20) + "\n")
    assert (
        _refused(params) == f"--params {params}: {(2 << 20) + 22} bytes; a params file may be at most 1048576 (1 MiB)"
    )
    params.write_text("".join(f"k{i}: {i}\n" for i in range(70_000)))  # (just under 1 MiB)
    start = time.perf_counter()
    assert _refused(params).endswith(": more than 10000 values by line 5000 (an alias counts as all it repeats)")
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed=" + "9" * 100_000, "-S seed: the value has an integer of more than 4300 digits"),
        ("seed=" + "9" * 1000, "seed=999999999999999999...9999999999999999999: input should be less than or equal to"),
        (
            "seed=" + "x" * 100_000,
            "seed='xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxxxxxxxxxx': input should be a valid",
        ),
        ("generator.channels=[" + "8, " * 50_000 + "8]", "-S generator.channels: the value has more than 10000 values"),
        (
            "generator.channels=[" + "8, " * 5_000 + "8]",
            "generator.channels=[8, 8, 8, 8, 8, 8, 8, 8, ...]: tuple should",
        ),
        (
            "generator.prompt=" + "a{name}" * 10_000,
            "generator.prompt='a{name}a{name}a{name}a{name...a{name}a{name}a{name}a{name}': 70000 characters as an "
            "MLflow param, which holds at most 6000",
        ),
        (
            "x" * 100_000 + "=1",
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxx: unknown",
        ),
    ],
)
def test_a_huge_value_or_key_is_echoed_abbreviated(override, expected):
    assert _refused(None, [override], limit=400).startswith(expected)


def test_shown_abbreviates_any_value_without_building_its_repr():
    from dp_ops.config import shown

    assert shown("greedy") == "'greedy'" and shown([8, 12]) == "[8, 12]" and shown(1e308) == "1e+308"
    assert shown(2**70) == "1180591620717411303424"
    bomb: list = ["lol"]
    for _ in range(30):  # 2**30 strings if expanded
        bomb = [bomb, bomb]
    assert len(shown(bomb)) < 100 and len(shown("x" * 10**8)) < 100 and len(shown(10**5000)) < 100


def test_a_stored_mlflow_param_is_bounded_like_a_params_file():
    from dp_ops.config import from_flat

    with pytest.raises(ConfigError, match=r"^MLflow param seed: the value has more than 10000 values"):
        from_flat({"seed": "{" + _alias_bomb(7).replace("\n", ", ") + "}"})


def _walked_keys():
    from dp_ops.config import Config, SweepConfig

    keys = [(k, "") for k in flatten(Config())]
    keys += [(f"sweep.{k}", "sweep.") for k in flatten(SweepConfig())]  # type: ignore[arg-type]
    return keys


@pytest.mark.parametrize("value", [0, -1, 1e308, 2**70, [1, 2]])
def test_every_key_gives_one_short_line_or_a_valid_config(value):
    """Every key of `dpops config show` (and of the sweep section) with 0, -1, 1e308, 2**70 and a list: one
    ConfigError line naming the key, or a valid config. Only 0 is ever valid here, and where it is, it means
    what it says (a seed, ω = 0 unguided, an option off): every large value is refused by a bound."""
    from dp_ops.config import SweepConfig, sweep_config
    from dp_ops.config.load import _set_dotted

    accepted = []
    for key, prefix in _walked_keys():
        tree: dict = {"sweep": SweepConfig().model_dump()} if prefix else {}  # (a range needs both its ends)
        _set_dotted(tree, key, value)
        try:
            sweep_config(tree) if prefix else build_config(tree)
        except ConfigError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) < 300 and key in message, (key, message)
        else:
            accepted.append(key)
    if value == [1, 2]:
        assert accepted == ["sweep.static_sizes"]  # (a list of sizes: valid)
    elif value != 0:
        assert accepted == [], accepted
    else:
        assert set(accepted) == {
            "seed", "deterministic", "threads", "data.split_seed", "data.shard_resolution", "generator.resolution",
            "generator.vae_slicing", "generator.attention_slicing", "generator.channels_last", "dp.omega",
            "dp.incremental_patience", "dp.max_rounds", "learner.drop_rate", "train.weight_decay",
            "train.label_smoothing", "train.warmup_fraction", "train.mixup", "train.cutmix", "train.ema_decay",
            "train.num_workers", "train.micro_batches", "train.channels_last", "tracking.log_model",
            "train.cooldown_fraction", "generator.label_dropout", "generator.gradient_checkpointing",
            "sweep.prune", "sweep.sampler_seed", "sweep.omega.log",
        }, sorted(accepted)  # (booleans: 0 reads as false)  # fmt: skip


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed=18446744073709551616", "seed=18446744073709551616: input should be less than or equal to 1844674"),
        ("data.split_seed=4294967296", "data.split_seed=4294967296: input should be less than or equal to 4294967295"),
        ("sweep.sampler_seed=4294967296", "sweep.sampler_seed=4294967296: input should be less than or equal to"),
        ("train.lr=1e308", "train.lr='1e308': input should be less than or equal to 1"),
        ("generator.train_lr=2", "generator.train_lr=2: input should be less than or equal to 1"),
        ("train.weight_decay=1.0e+308", "train.weight_decay=1e+308: input should be less than or equal to 1"),
        ("dp.omega=1.0e+39", "dp.omega=1e+39: input should be less than or equal to 1"),
        ("generator.cfg_scale=1.0e+308", "generator.cfg_scale=1e+308: input should be less than or equal to 30"),
        (
            "generator.cfg_scale=0",
            "generator.cfg_scale=0: must be >= 1: 1 is the conditional model alone, below it mixes in the "
            "unconditional one (0: samples ignore their class label)",
        ),
        ("train.mixup=1.0e+308", "train.mixup=1e+308: input should be less than or equal to 100"),
        ("sweep.omega.high=2", "sweep.omega.high=2.0: must be <= 1 (dp.omega's bound)"),
        ("sweep.stale_after=1.0e+308", "sweep.stale_after=1e+308: input should be less than or equal to 86400"),
        (
            "tracking.experiment=" + "e" * 501,
            "tracking.experiment='eeeeeeeeeeeeeeeeeeeeeeeeeee...eeeeeeeeeeeeeeeeeeeeeeeeeeee': string should have at "
            "most 500 characters",
        ),
        ("tracking.register_model=a/b", "tracking.register_model='a/b': an MLflow model name cannot hold '/' or ':'"),
        (
            "output.shards=runs/" + "d" * 256,
            "output.shards='runs/dddddddddddddddddddddd...dddddddddddddddddddddddddddd': a file or folder name may "
            "be at most 255 bytes",
        ),
        (
            "output.metrics=" + "d/" * 2100,
            "output.metrics='d/d/d/d/d/d/d/d/d/d/d/d/d/d...d/d/d/d/d/d/d/d/d/d/d/d/d/d/': a path may be at most "
            "4096 bytes",
        ),
        ("data.classes=[" + ", ".join(f"c{i}" for i in range(2000)) + "]", "data.classes=['c0', 'c1', 'c2'"),
    ],
)
def test_values_that_would_crash_a_run_at_its_start_are_refused(override, expected):
    """seed >= 2**64 (torch.manual_seed), split_seed >= 2**32 (scikit-learn's RandomState), lr 1e308, an
    experiment name over MLflow's 500 characters: each used to start work and stop with a traceback, leaving a
    FAILED run; a param over MLflow's 6000 characters was cut (a resume rebuilds the config from it). A path
    the file system cannot hold is refused here too, before any check tries to write it."""
    from dp_ops.config import load_tree, sweep_config

    check = sweep_config if override.startswith("sweep.") else build_config
    with pytest.raises(ConfigError) as info:
        check(load_tree(None, [override]))
    message = str(info.value)
    assert message.startswith(expected) and "\n" not in message and len(message) < 300, message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-1", "threads=-1: must be 0 (auto: the CPUs this process may use) or 1 to 1024 threads"),
        ("1025", "threads=1025: must be 0 (auto: the CPUs this process may use) or 1 to 1024 threads"),
        ("true", "threads=True: must be a number, not true"),
        ("two", "threads='two': input should be a valid integer"),
        ("1.5", "threads=1.5: input should be a valid integer"),
    ],
)
def test_threads_is_auto_or_a_count_and_anything_else_is_one_line(value, expected):
    assert load_config(None, []).threads == 0  # (auto: the default)
    assert load_config(None, ["threads=1024"]).threads == 1024
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"threads={value}"])
    assert str(info.value).startswith(expected) and "\n" not in str(info.value), str(info.value)


def test_the_largest_accepted_values_are_valid():
    """The borderline values a slow test runs for real (tests/test_robust_inputs.py)."""
    cfg = load_config(None, ["seed=18446744073709551615", "data.split_seed=4294967295", "train.lr=1", "dp.omega=1"])
    assert (cfg.seed, cfg.data.split_seed, cfg.train.lr, cfg.dp.omega) == (2**64 - 1, 2**32 - 1, 1.0, 1.0)
    assert load_config(None, ["generator.cfg_scale=1"]).generator.cfg_scale == 1.0  # conditional only


def test_the_limits_are_mlflows_own():
    from mlflow.utils import validation

    from dp_ops.config import bounds

    assert bounds.MLFLOW_PARAM_CHARS == validation.MAX_PARAM_VAL_LENGTH
    assert bounds.MLFLOW_EXPERIMENT_CHARS == validation.MAX_EXPERIMENT_NAME_LENGTH
    assert bounds.MAX_OMEGA == 1.0 and bounds.MIN_CFG_SCALE == 1.0
