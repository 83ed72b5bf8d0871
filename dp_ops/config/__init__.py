"""The one typed, frozen configuration tree, and the schema of the ``sweep:`` section beside it.

Its single source is ``params.yaml`` (the file DVC tracks); the CLI overrides single values with the
same dotted names DVC uses (``-S dp.omega=0.1``). Everything is validated before any work starts and
any problem becomes one :class:`~dp_ops.errors.ConfigError` line naming the key, the value (abbreviated by
:func:`shown`) and what is allowed. Every number is bounded by what its use can take, every string by what
MLflow or a file system stores, and a params file (or ``-S`` value) by its size, node count and depth before
YAML builds it. :func:`flatten` gives the dotted ``key -> value`` view that trackers log as params.

The ``sweep:`` section (:class:`SweepConfig`, read with :func:`sweep_config`) is not part of a run's
config: sweeps and the benchmark read it, and it lives here so that they can without importing Optuna.

One module a job, each importing only those before it: ``bounds`` (the limits, :func:`shown`, the base of
every section), ``reading`` (YAML text read within bounds), ``sections`` (the run's tree, :class:`Config`),
``sweep_section`` (:class:`SweepConfig`), ``load`` (file and overrides to a validated config, and back).
Import from ``dp_ops.config``: these are its names.
"""

from dp_ops.config.bounds import shown
from dp_ops.config.load import (
    DEFAULT_PARAMS,
    FOREIGN_SECTIONS,
    apply_overrides,
    build_config,
    from_flat,
    load_config,
    load_tree,
    sweep_config,
    to_tree,
    validate,
)
from dp_ops.config.sections import (
    RUN_FILES,
    Config,
    DataConfig,
    DPConfig,
    GeneratorConfig,
    LearnerConfig,
    OutputConfig,
    TrackingConfig,
    TrainConfig,
    flatten,
    run_files,
)
from dp_ops.config.sweep_section import FloatRange, IntRange, SweepConfig

__all__ = [
    "DEFAULT_PARAMS",
    "FOREIGN_SECTIONS",
    "RUN_FILES",
    "Config",
    "DPConfig",
    "DataConfig",
    "FloatRange",
    "GeneratorConfig",
    "IntRange",
    "LearnerConfig",
    "OutputConfig",
    "SweepConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "flatten",
    "from_flat",
    "load_config",
    "load_tree",
    "run_files",
    "shown",
    "sweep_config",
    "to_tree",
    "validate",
]
