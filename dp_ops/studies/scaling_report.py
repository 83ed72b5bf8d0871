"""Scaling laws from the MLflow store: read finished experiments, fit, report, log the report.

Points come from MLflow (finished runs tagged ``dpops.role=experiment``, filtered by experiment, study,
strategy or any MLflow filter string) or from the ``metrics.json`` files of DVC stages (the pipeline's
``scaling`` stage, which must not depend on a database's history). The fitting itself is
:mod:`dp_ops.studies.scaling`; this module chooses the points and writes ``scaling.json`` and ``scaling.png``.

A law is fitted over runs that differ in their size only (and in their seed, and in how and where they ran): a
300-iteration run and a 2,000-iteration run are no two points of one curve. A strategy's runs that differ in
anything else are grouped, one law per group, labelled by what differs (``static (train.iterations=300)``), and
DP's best run is read against the static runs that share its settings, strategy aside.

Headline numbers, both read against ``static``:

* **data multiplier** = samples static needs to reach the accuracy of DP's best run (best by validation
  accuracy) ÷ samples that DP run used
  (static's need from its fitted law, and from its points interpolated without a fit);
* **data multiplier from the two laws** = samples static's fitted law needs for that accuracy ÷ samples
  DP's fitted law needs (with a 95% interval from the two bootstraps, paired draw by draw);
* **iteration multiplier** = iterations the first static run to get there needed to reach that DP run's
  final validation accuracy ÷ iterations DP needed (from the validation curves; ∞ if no static run
  got there within its budget).

In ``scaling.json`` (the one JSON convention, :func:`dp_ops.files.write_json`) every non-finite number
is ``null``: an unreachable target, a multiplier static never reaches.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dp_ops.config import RUN_FILES
from dp_ops.engine.strategies import STRATEGIES
from dp_ops.errors import ConfigError, DataError, FitError
from dp_ops.files import json_ready, write_json
from dp_ops.studies.intervals import nearest_rank, verdict
from dp_ops.studies.scaling import (
    MIN_POINTS,
    PowerLawFit,
    data_multiplier,
    fit_power_law,
    plot_scaling,
    samples_for_accuracy,
)

if TYPE_CHECKING:
    from dp_ops.records.tracking import TrackingStore

Metric = Literal["final_test_acc", "final_val_acc"]
Axis = Literal["pool_size", "generated_samples"]


@dataclass(frozen=True)
class RunPoint:
    """One finished experiment as the scaling report sees it."""

    source: str  # MLflow run id or metrics file
    strategy: str
    pool_size: int
    generated_samples: int
    iterations: int
    final_val_acc: float
    final_test_acc: float
    curve: tuple[tuple[int, float], ...] = field(default=(), repr=False)  # (iteration, val acc)
    # the settings that define what the run measured (:func:`measured`): flat config keys, values as text
    config: dict[str, str] = field(default_factory=dict, repr=False, compare=False)


# Flat config keys that say how or where a run ran, not what it measured (a seed is a replicate), and the keys
# that set its size: runs that differ in these only are points of one law.
UNMEASURED = (
    "seed",
    "device",
    "deterministic",
    "threads",
    "train.num_workers",
    "train.micro_batches",
    "train.eval_batch_size",
)
UNMEASURED_PREFIXES = ("tracking.", "output.")
SIZE_KEYS = ("dp.initial_size", "dp.round_size", "dp.max_rounds")
STRATEGY_OWN = ("dp.", "generator.guide_every")  # what DP's runs may differ in from static's and still compare


def measured(strategy: str, config: dict[str, str]) -> dict[str, str]:
    """The settings of a ``strategy`` run that define what it measured, less its size and the keys its
    strategy does not read (:attr:`~dp_ops.engine.strategies.Strategy.unused`): what two points of one law share."""
    entry = STRATEGIES.get(strategy)  # (none for a run of a strategy this version does not know)
    skip = (*UNMEASURED_PREFIXES, *SIZE_KEYS, *(entry.unused if entry else ()), "dp.strategy")
    return {k: v for k, v in config.items() if k not in UNMEASURED and not k.startswith(skip)}


@dataclass(frozen=True, kw_only=True)
class ScalingHeadline:
    """DP's best run (by validation accuracy) against the static runs that share its settings: the data and
    iteration multipliers. A field that does not apply is None and absent from :meth:`to_dict`."""

    dp_run: str  # where DP's best run came from (an MLflow run id or a metrics.json)
    dp_accuracy: float  # its accuracy (the report's metric)
    dp_samples: float  # its n (the report's x)
    # the group labels (see group_runs), set when either is not the plain strategy's: runs of other settings
    dp_group: str | None = None
    static_group: str | None = None
    data_multiplier_points: float  # static's points interpolated without a fit; inf: static never got there
    static_samples_needed_fit: float | None = None  # None (and the next two): static has no fitted law
    data_multiplier_fit: float | None = None
    fit_extrapolated: bool | None = None  # the fitted need lies beyond static's largest size
    static_samples_needed_law: float | None = None  # None (and the next three): DP has no fitted law either
    dp_samples_needed_law: float | None = None
    data_multiplier_laws: float | None = None
    data_multiplier_laws_ci: list[float] | None = None  # [low, high], 95%, from the paired bootstraps
    data_multiplier_laws_verdict: str | None = None  # resolved / bound / not resolved (studies.intervals)
    dp_val_acc: float  # DP's final validation accuracy, the target of the iteration multiplier
    dp_iterations_to_val: float
    static_iterations_to_val: float  # inf: no static run got there
    iteration_multiplier: float

    def to_dict(self) -> dict[str, Any]:
        """The ``headline`` of ``scaling.json`` before :func:`dp_ops.files.json_ready`: the fields that apply,
        in this order, non-finite numbers as they are (the MLflow metrics are logged from it too)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class ScalingReport:
    metric: str
    x: str
    points: dict[str, list[tuple[float, float]]]  # group label -> (n, accuracy) points
    fits: dict[str, PowerLawFit]
    unfitted: dict[str, str]  # group label (see group_runs) -> why it has no fit
    targets: dict[str, dict[str, float]]  # group label -> {target accuracy: samples needed (fit)}
    headline: ScalingHeadline | None  # data/iteration multipliers against static; None without dp and static
    # label -> the strategy and the settings that set its runs apart from the strategy's other groups
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    no_headline: str = ""  # why there is no headline

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers as ``None``)."""
        return json_ready(
            {
                "metric": self.metric,
                "x": self.x,
                "groups": self.groups,
                "points": {k: [list(p) for p in v] for k, v in self.points.items()},
                "fits": {k: f.to_dict() for k, f in self.fits.items()},
                "unfitted": self.unfitted,
                "samples_for_target": self.targets,
                "headline": self.headline.to_dict() if self.headline else {},
            }
        )


# ---- sources -------------------------------------------------------------------------------------
def points_from_mlflow(
    store: TrackingStore,
    experiments: Sequence[str],
    *,
    study: str | None = None,
    strategies: Sequence[str] = (),
    filter_string: str = "",
    with_curves: bool = True,
) -> list[RunPoint]:
    """Finished experiment runs (not round runs, not earlier reports) of the named MLflow experiments.
    ``study`` is matched exactly (quoted for MLflow); a ``filter_string`` MLflow refuses is one line naming
    ``--filter``."""
    from dp_ops.records.tracking import config_params, filter_equals

    ids = []
    for name in experiments:
        exp_id = store.find_experiment(name)
        if exp_id is None:
            raise DataError(f"--experiment {name}: no such MLflow experiment in {store.uri}")
        ids.append(exp_id)
    query = ["tags.`dpops.role` = 'experiment'", "attributes.status = 'FINISHED'"]
    if study:
        try:
            query.append(filter_equals("tags.`dpops.study`", study))
        except ConfigError:
            raise ConfigError(f"--study {study!r}: may hold ' or \" but not both") from None
    if filter_string:
        store.search(ids, filter_string, max_results=1, error_prefix="--filter")
        query.append(filter_string)
    out = []
    for run in store.search(ids, " and ".join(query)):
        m, strategy = run.metrics, run.tags.get("dpops.strategy", "?")
        if (strategies and strategy not in strategies) or "final_test_acc" not in m:
            continue
        curve = store.history(run.run_id, "val_acc") if with_curves else ()
        out.append(
            RunPoint(
                run.run_id,
                strategy,
                int(m["pool_size"]),
                int(m["generated_samples"]),
                int(m["iterations"]),
                m["final_val_acc"],
                m["final_test_acc"],
                curve,
                measured(strategy, config_params(run.params)),
            )
        )
    return out


def points_from_files(paths: Sequence[str | Path]) -> list[RunPoint]:
    """``metrics.json`` files of runs, each with the ``rounds.json`` beside it (the run's strategy) and
    the ``curve.json`` beside it if there is one (the validation curve); a folder stands for every
    ``metrics.json`` below it."""
    out = []
    name = RUN_FILES["metrics"]
    files = []
    for given in map(Path, paths):
        found = sorted(given.rglob(name)) if given.is_dir() else [given]
        if not found:  # (a folder with none: the wrong folder, or its runs have not finished)
            raise DataError(f"--metrics {given}: no {name} files found in this folder or below it")
        files += found
    for path in files:
        try:
            m = _json(path, dict)
            header = _json(path.with_name(RUN_FILES["rounds"]), dict, f"{RUN_FILES['rounds']} beside it ")
            curve_file = path.with_name(RUN_FILES["curve"])
            curve = _json(curve_file, list, f"{RUN_FILES['curve']} beside it ") if curve_file.is_file() else []
            out.append(
                RunPoint(
                    str(path),
                    str(header["strategy"]),
                    int(m["pool_size"]),
                    int(m["generated_samples"]),
                    int(m["iterations"]),
                    float(m["final_val_acc"]),
                    float(m["final_test_acc"]),
                    tuple((int(c["iteration"]), float(c["val_acc"])) for c in curve),
                    {"train.iterations": str(int(m["iterations"]))},  # (all of its config a metrics file tells)
                )
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"--metrics {path}: not a dp_ops {name} ({type(exc).__name__}: {exc})") from None
    return out


def _json(path: Path, kind: type[dict] | type[list], label: str = "") -> Any:
    """A JSON file that must hold an object (``dict``) or a list."""
    value = json.loads(path.read_text())
    if not isinstance(value, kind):
        wanted = "an object" if kind is dict else "a list"
        raise ValueError(f"{label}holds a JSON {type(value).__name__}, not {wanted}")
    return value


# ---- the report ----------------------------------------------------------------------------------
def scaling_report(
    runs: Sequence[RunPoint],
    *,
    metric: Metric = "final_test_acc",
    x: Axis = "pool_size",
    targets: Sequence[float] = (),
    n_boot: int = 200,
    seed: int = 0,
) -> ScalingReport:
    """Fit error = a·n^(−α) + c per group of runs that differ in size only (one per strategy unless its runs
    differ in more, see :func:`group_runs`); refuse when no group has enough points to fit."""
    grouped, groups = group_runs(runs)
    points = {
        label: [(float(getattr(r, x)), float(getattr(r, metric))) for r in sorted(rs, key=lambda r: getattr(r, x))]
        for label, rs in grouped.items()
    }
    fits, unfitted = {}, {}
    for label, pts in points.items():
        try:
            fits[label] = fit_power_law(
                [p[0] for p in pts], [1 - p[1] for p in pts], n_boot=n_boot, seed=seed, label=label
            )
        except FitError as exc:
            unfitted[label] = str(exc)
    if not fits:
        counts = ", ".join(f"{s}: {len(p)}" for s, p in points.items()) or "no finished experiment runs"
        raise FitError(
            f"too few points to fit a scaling law (need >= {MIN_POINTS} per strategy at >= 3 "
            f"distinct sizes; have {counts})"
        )
    need = {s: {f"{t:g}": f.samples_for_accuracy(t) for t in targets} for s, f in fits.items()}
    headline, why = _headline(grouped, points, fits, metric, x)
    return ScalingReport(metric, x, points, fits, unfitted, need, headline, groups, why)


def group_runs(runs: Sequence[RunPoint]) -> tuple[dict[str, list[RunPoint]], dict[str, dict[str, Any]]]:
    """The runs by strategy and, within one, by the settings they share but size (:attr:`RunPoint.config`).

    A strategy whose runs all share them is one group labelled by the strategy; otherwise each group is
    labelled by the settings that set it apart, ``static (train.iterations=300)``. Returns the groups (strategy
    order, then by label) and, per label, its strategy and those settings."""
    by_strategy: dict[str, dict[tuple, list[RunPoint]]] = {}
    for r in sorted(runs, key=lambda r: r.strategy):
        by_strategy.setdefault(r.strategy, {}).setdefault(tuple(sorted(r.config.items())), []).append(r)
    grouped: dict[str, list[RunPoint]] = {}
    about: dict[str, dict[str, Any]] = {}
    for strategy, found in by_strategy.items():
        configs = [dict(key) for key in found]
        differ = sorted({k for c in configs for k in c if any(o.get(k) != c[k] for o in configs)})
        labelled = {}
        for config, members in zip(configs, found.values(), strict=True):
            settings = {k: config.get(k, "(unset)") for k in differ}
            shown = ", ".join(f"{k}={v}" for k, v in settings.items())
            labelled[f"{strategy} ({shown})" if shown else strategy] = (members, settings)
        for label in sorted(labelled):
            grouped[label] = labelled[label][0]
            about[label] = {"strategy": strategy, "settings": labelled[label][1]}
    return grouped, about


def _shared(config: dict[str, str]) -> dict[str, str]:
    """The settings a DP run and a static run must share to be compared (all but each strategy's own)."""
    return {k: v for k, v in config.items() if not k.startswith(STRATEGY_OWN)}


def _headline(grouped: dict, points: dict, fits: dict, metric: str, x: str) -> tuple[ScalingHeadline | None, str]:
    """DP's best run against the static runs that share its settings (strategy aside): the multipliers, or
    no headline and why there is none."""
    dp = [r for rs in grouped.values() for r in rs if r.strategy == "dp"]
    statics = [label for label, rs in grouped.items() if rs[0].strategy == "static"]
    if not dp or not statics:
        return None, "it needs both dp and static runs"
    # DP's best run is chosen on validation accuracy (then fewer samples), never on the test split
    best = max(dp, key=lambda r: (r.final_val_acc, -getattr(r, x)))
    dp_label = next(label for label, rs in grouped.items() if any(r is best for r in rs))
    static_label = next((s for s in statics if _shared(grouped[s][0].config) == _shared(best.config)), None)
    if static_label is None:
        mine = _shared(best.config)
        theirs = [_shared(grouped[s][0].config) for s in statics]
        keys = sorted({k for t in theirs for k in {*t, *mine} if t.get(k) != mine.get(k)})
        shown = "; ".join(f"{k}: dp {mine.get(k, '(unset)')}, static {_values(theirs, k)}" for k in keys)
        return None, f"no static runs share the settings of DP's best run {best.source} ({shown})"
    static = grouped[static_label]
    acc, used = float(getattr(best, metric)), float(getattr(best, x))
    out: dict[str, Any] = {}
    if static_label != "static" or dp_label != "dp":
        out.update(dp_group=dp_label, static_group=static_label)
    if static_label in fits:
        out["static_samples_needed_fit"] = fits[static_label].samples_for_accuracy(acc)
        out["data_multiplier_fit"] = data_multiplier(fits[static_label], used, acc)
        out["fit_extrapolated"] = out["static_samples_needed_fit"] > max(n for n, _ in points[static_label])
    if static_label in fits and dp_label in fits:
        out.update(_laws_multiplier(fits[static_label], fits[dp_label], acc))
    target = best.final_val_acc
    dp_iters = _first_reaching(best.curve, target)
    static_iters = min((_first_reaching(r.curve, target) for r in static), default=math.inf)
    return ScalingHeadline(
        dp_run=best.source,
        dp_accuracy=acc,
        dp_samples=used,
        data_multiplier_points=data_multiplier(points[static_label], used, acc),
        dp_val_acc=target,
        dp_iterations_to_val=dp_iters,
        static_iterations_to_val=static_iters,
        iteration_multiplier=static_iters / dp_iters if math.isfinite(dp_iters) and dp_iters > 0 else math.nan,
        **out,
    ), ""


def _values(configs: list[dict[str, str]], key: str) -> str:
    return " or ".join(sorted({c.get(key, "(unset)") for c in configs}))


def _laws_multiplier(static: PowerLawFit, dp: PowerLawFit, acc: float) -> dict[str, Any]:
    """Samples static's fitted law needs for ``acc`` ÷ samples DP's law needs, with a 95% interval from the
    two bootstraps paired draw by draw (a draw where static never gets there counts as ∞; one where DP's
    own law does not is left out; see :func:`_need_ratio`)."""
    n_static, n_dp = static.samples_for_accuracy(acc), dp.samples_for_accuracy(acc)
    ratios = []
    for s_draw, d_draw in zip(static.boot, dp.boot, strict=False):
        ratio = _need_ratio(*(samples_for_accuracy(*draw, acc) for draw in (s_draw, d_draw)))
        if not math.isnan(ratio):
            ratios.append(ratio)
    lo, hi = (nearest_rank(ratios, q) for q in (0.025, 0.975)) if ratios else (math.nan,) * 2
    return {
        "static_samples_needed_law": n_static,
        "dp_samples_needed_law": n_dp,
        "data_multiplier_laws": _need_ratio(n_static, n_dp),
        "data_multiplier_laws_ci": [lo, hi],
        # (static's law never reaching DP's accuracy: the multiplier is only known to be above any finite one)
        "data_multiplier_laws_verdict": verdict(lo, hi, 1.0, bound=not math.isfinite(n_static)),
    }


def _need_ratio(need_static: float, need_dp: float) -> float:
    """``need_static ÷ need_dp`` for two laws' sample needs, which may be 0 (a law with α near 0 already below
    the error it must reach: any size does) or ∞ (it never gets there): ∞ where only DP's is 0; NaN, saying
    nothing, where DP's is ∞ or both are 0."""
    if not math.isfinite(need_dp) or (need_dp <= 0 and need_static <= 0):
        return math.nan
    return math.inf if need_dp <= 0 else need_static / need_dp


_X_LABELS = {"pool_size": "pool size n (samples)", "generated_samples": "generated samples"}


def _first_reaching(curve: Sequence[tuple[int, float]], target: float) -> float:
    return next((float(i) for i, a in curve if a >= target), math.inf)


def write_report(report: ScalingReport, out_dir: str | Path, title: str | None = None) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    write_json(out_dir / "scaling.json", report.to_dict())
    dp_acc = report.headline.dp_accuracy if report.headline else None
    png = plot_scaling(
        report.points,
        report.fits,
        out_dir / "scaling.png",
        targets=[dp_acc] if dp_acc is not None else None,
        title=title,
        xlabel=_X_LABELS[report.x],
    )
    return out_dir / "scaling.json", png


def log_report(
    report: ScalingReport, files: Sequence[Path], store: TrackingStore, experiment: str, params: dict[str, str]
) -> str:
    """One MLflow run tagged ``dpops.role=scaling`` with the fits as metrics and the files as artifacts. It
    replaces the report an earlier call logged from the same inputs (``params`` less the run count): the
    same command run again keeps one report run, the latest, instead of piling up one per call."""
    metrics = {f"{_metric_prefix(report, s)}.{k}": getattr(f, k) for s, f in report.fits.items() for k in FIT_METRICS}
    headline = report.headline.to_dict() if report.headline else {}
    metrics.update({k: v for k, v in headline.items() if isinstance(v, float)})
    if ci := headline.get("data_multiplier_laws_ci"):
        metrics.update(data_multiplier_laws_ci_low=ci[0], data_multiplier_laws_ci_high=ci[1])
    words = {k: v for k, v in headline.items() if k.endswith("_verdict")}
    inputs = json.dumps({k: v for k, v in params.items() if k != "runs"}, sort_keys=True)
    return store.log_report_run(
        experiment,
        role="scaling",
        run_name="scaling-report",
        metrics=metrics,
        params={**params, **words},
        files=files,
        key=hashlib.sha256(inputs.encode()).hexdigest()[:16],
    )


FIT_METRICS = ("a", "alpha", "c", "rmse")


def _metric_prefix(report: ScalingReport, label: str) -> str:
    """A group's label as MLflow takes it in a metric name (letters, digits, ``_ - . : /`` and spaces):
    ``static train.iterations:300``."""
    about = report.groups.get(label, {"strategy": label, "settings": {}})
    name = " ".join([about["strategy"], *(f"{k}:{v}" for k, v in about["settings"].items())])
    return re.sub(r"[^\w.\-:/ ]", "_", name)
