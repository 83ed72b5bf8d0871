"""What every config key is bounded by, and how a refused value is echoed back.

The bounds are those of what uses a value (torch, NumPy, AdamW, float32, MLflow's columns, a file system), so
that a slip of the keyboard is refused before any work starts rather than failing, overflowing or being cut
midway. :class:`_Section`, the base of every section, makes each model frozen, strict about unknown keys and
about ``true`` for a number; :func:`shown` abbreviates any value an error line echoes.
"""

from __future__ import annotations

import re
import reprlib
from typing import Annotated, Any, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator

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
