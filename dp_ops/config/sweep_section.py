"""The schema of the ``sweep:`` section of params.yaml: the Optuna study, its space and the static sizes.

It is not part of a run's config: sweeps and the benchmark read it (with
:func:`dp_ops.config.sweep_config`), and it lives here so that they can without importing Optuna. A
range's values become a trial's ``dp.*`` keys, so they are bounded like those keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dp_ops.config.bounds import (
    MAX_ITERATIONS,
    MAX_OMEGA,
    MAX_SAMPLES,
    MAX_SEED_32,
    MLFLOW_EXPERIMENT_CHARS,
    PathText,
    _Section,
    shown,
)


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
