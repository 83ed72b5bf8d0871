"""One exception hierarchy for dp_ops.

Every error a user can cause derives from :class:`DpOpsError`; the CLI turns it into one line on
stderr and a non-zero exit code, without a traceback.
"""


class DpOpsError(Exception):
    """Base class of every error dp_ops raises on purpose."""


class ConfigError(DpOpsError):
    """A configuration key has a value that is not allowed (raised before any work starts)."""


class DataError(DpOpsError):
    """Input data is missing, unreadable or inconsistent."""


class GeneratorError(DpOpsError):
    """The generator cannot be loaded or does not match the configuration."""


class NonFiniteError(DpOpsError):
    """A number the run computed is NaN or infinite (a learner's loss or entropy): the run stops at once,
    before the value is trained on, written or versioned. (Non-finite samples are the generator's:
    :class:`GeneratorError`.)"""


class FitError(DpOpsError):
    """A scaling-law fit cannot be made (too few points, degenerate data)."""


class RunAborted(BaseException):
    """A run of a multi-process study (a sweep trial, a benchmark arm under torchrun) failed on rank 0.
    The other processes may be waiting in one of the run's collectives, so the study cannot go on to its
    next run: it stops (torchrun ends the others), the run ends FAILED in MLflow, and a resumable one can
    be resumed. A ``BaseException``, like Ctrl-C, so that no "a failed run is a result" handler carries
    on past it; the CLI prints it as one line."""
