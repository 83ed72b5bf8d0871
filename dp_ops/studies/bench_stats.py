"""What a benchmark's runs say: per-arm means and spreads, the headline ratios, the plot.

- **data multiplier** = samples static needs to reach DP's test accuracy, read off the mean accuracies of
  static's size series (interpolated linearly in log n, never extrapolated) ÷ samples DP generated; when
  no static size gets there, the lower bound largest static size ÷ DP's samples;
- **iteration multiplier** = iterations static needs to reach DP's test accuracy at its best size (by
  validation), read off its runs at 1×, 2×, 4× the budget the same way, ÷ DP's iterations; when none gets
  there, the lower bound largest budget ÷ DP's;
- **generation-compute multiplier vs oversample** = model evaluations (and generation seconds) of the
  cheapest oversample ratio that reaches DP's test accuracy ÷ DP's;
- **OOD gain** = out-of-distribution accuracy of DP minus that of static at its best size, paired by seed;
- **guidance effect** = test accuracy of DP at its ω minus DP at ω = 0, paired by seed.

Each comes with its per-seed values (each DP seed read against the other arm's mean, or paired by seed), a
95% interval and a word, resolved / bound / not resolved (:mod:`dp_ops.studies.intervals`: a t interval for
the two differences, a paired bootstrap over seeds for the three multipliers, the arm choices held fixed).
Everything is computed from the runs' summary metrics, so it is the same whether the runs were made now
or read back from the store. Static's best size is chosen on validation accuracy, never on test or OOD.
The headline in words is :func:`dp_ops.render.bench_headline_lines`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from dp_ops.engine.strategies import STRATEGIES
from dp_ops.errors import ConfigError
from dp_ops.files import json_ready
from dp_ops.formats import FORMAT_TAG, Unreadable, declared, upgrade
from dp_ops.studies.intervals import Interval, bootstrap, t_interval, verdict
from dp_ops.studies.scaling import data_multiplier, interpolate_samples_for_accuracy

# the runs' summary metrics that a row averages
FIELDS = (
    "generated_samples",
    "pool_size",
    "iterations",
    "gen_seconds",
    "model_evals",
    "final_val_acc",
    "final_test_acc",
)
# reported where the runs have it (image-folder runs have no OOD set): NaN where none has
OPTIONAL_FIELDS = ("final_ood_acc",)


SERIES = ("scaling", "omega", "oversample", "iterations")  # an arm's series (Arm.series)
HEADLINE = "headline"  # for ``dpops bench --series``: the arms the headline reads, across series


def check_series(series: Sequence[str]) -> tuple[str, ...]:
    """``--series`` names, each one of :data:`SERIES` or ``headline``; none: every series. (Here, light to
    import, so the CLI checks them before loading anything heavy.)"""
    for name in series:
        if name not in (*SERIES, HEADLINE):
            raise ConfigError(f"--series {name}: choose from {', '.join((*SERIES, HEADLINE))} (comma-separated)")
    return tuple(series)


@dataclass(frozen=True)
class Arm:
    """One strategy at one setting, e.g. ``dp ω=0.05``; ``overrides`` are params.yaml keys. (Here, not in
    :mod:`dp_ops.studies.bench`, so that the statistics need nothing of how runs are made.)"""

    strategy: str
    setting: str
    overrides: tuple[str, ...]
    # scaling: a point of its strategy's scaling law (static's sizes, DP's sizes at its ω); omega: DP at
    # another ω; oversample; iterations: static at a multiple of the budget
    series: str = "scaling"

    @property
    def name(self) -> str:
        return f"{self.strategy} {self.setting}"


@dataclass(frozen=True)
class ArmStats:
    """One row of the table: an arm's mean and sample standard deviation over seeds of each field."""

    arm: str
    strategy: str
    setting: str
    series: str
    seeds: int
    mean: dict[str, float]
    sd: dict[str, float]
    per_seed: dict[int, dict[str, float]]


@dataclass(frozen=True)
class Headline:
    dp_arm: str
    dp_test_acc: float
    dp_samples: float
    static_samples_needed: float  # inf: no static size reached DP's accuracy
    data_multiplier: float  # if static never got there: the lower bound largest static size ÷ DP's samples
    static_reached: bool
    data_multiplier_per_seed: dict[int, float]  # each DP seed's accuracy read off static's mean curve
    static_best: str  # static's size of best mean validation accuracy (where the iteration series runs)
    dp_iterations: float
    static_iterations_needed: float | None  # None: no iteration series; inf: it never reached DP's accuracy
    iteration_multiplier: float | None  # if never reached: the lower bound largest budget ÷ DP's iterations
    iterations_reached: bool
    iteration_multiplier_per_seed: dict[int, float]
    guidance_effect: float | None  # mean over seeds of test acc (dp ω) − test acc (dp ω=0), paired by seed
    guidance_effect_sd: float | None
    oversample_arm: str | None  # the cheapest ratio at DP's accuracy or better; if none, the most accurate
    oversample_reached: bool
    compute_multiplier: float | None  # model evaluations of that arm ÷ DP's
    compute_multiplier_per_seed: dict[int, float]  # paired by seed
    seconds_multiplier: float | None  # generation seconds of that arm ÷ DP's
    ood_gain: float | None  # OOD acc of DP − static's best size, paired by seed; None: no OOD set
    ood_gain_sd: float | None
    # the figures' 95% intervals and words, by figure name (FIGURES: those the headline has)
    intervals: dict[str, Interval]
    verdicts: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """For bench.json: an interval's infinite end is ``null`` (JSON has no ∞), its word beside it."""
        return json_ready(asdict(self))


# the headline's figures: (name, its field, "no effect") — the order of the lines, the JSON and the metrics
FIGURES = (
    ("data multiplier", "data_multiplier", 1.0),
    ("iteration multiplier", "iteration_multiplier", 1.0),
    ("generation compute vs oversample", "compute_multiplier", 1.0),
    ("OOD gain", "ood_gain", 0.0),
    ("guidance effect", "guidance_effect", 0.0),
)


def run_metrics(
    run_id: str, tags: Mapping[str, str], params: Mapping[str, str], metrics: Mapping[str, float]
) -> dict[str, float]:
    """A finished run's summary metrics, its format brought forward (:data:`dp_ops.formats.FORMATS`): a run that
    declares none (dp_ops 0.11.0 and earlier) reads as it is, unless an embedded world's run has no
    ``final_ood_acc`` (made before dp_ops 0.7.0 measured it): refused, so no row mixes runs with and without it."""
    where = f"run {run_id}"
    found = declared("run", tags.get(FORMAT_TAG), where)
    return upgrade("run", dict(metrics), found, where, {0: partial(_ood_measured, data=params.get("data.name"))})


def _ood_measured(metrics: dict[str, float], data: str | None) -> dict[str, float]:
    """Format 0 → 1: image-folder runs have no OOD set; an embedded world's run without one is too old."""
    if data != "folder" and "final_ood_acc" not in metrics:
        raise Unreadable("no final_ood_acc: made before dp_ops 0.7.0 measured out-of-distribution accuracy")
    return metrics


def summarise(
    runs: dict[tuple[str, int], dict[str, float]], arms: Sequence[Arm], seeds: Sequence[int]
) -> list[ArmStats]:
    """One row per arm that has finished runs (``runs`` by (arm name, seed)), in the order of ``arms``."""
    rows = []
    for arm in arms:
        per_seed = {seed: _fields(runs[(arm.name, seed)]) for seed in seeds if (arm.name, seed) in runs}
        if not per_seed:
            continue
        values = {f: [m[f] for m in per_seed.values() if f in m] for f in (*FIELDS, *OPTIONAL_FIELDS)}
        rows.append(
            ArmStats(
                arm.name,
                arm.strategy,
                arm.setting,
                arm.series,
                len(per_seed),
                mean={f: statistics.fmean(v) if v else math.nan for f, v in values.items()},
                sd={f: (statistics.stdev(v) if len(v) > 1 else 0.0) if v else math.nan for f, v in values.items()},
                per_seed=per_seed,
            )
        )
    return rows


def _fields(metrics: dict[str, Any]) -> dict[str, float]:
    """A run's averaged fields: every one of :data:`FIELDS`, and the optional ones it has."""
    present = [f for f in OPTIONAL_FIELDS if metrics.get(f) is not None]
    return {f: float(metrics[f]) for f in (*FIELDS, *present)}


def headline(rows: Sequence[ArmStats], dp_arm: str, dp0_arm: str) -> Headline | None:
    """The headline ratios; None without a DP row and >= 2 static sizes (at the budget)."""
    by = {r.arm: r for r in rows}
    static = sorted(
        (r for r in rows if r.strategy == "static" and r.series == "scaling"), key=lambda r: r.mean["generated_samples"]
    )
    dp = by.get(dp_arm)
    if dp is None or len(static) < 2:
        return None
    acc, samples = dp.mean["final_test_acc"], dp.mean["generated_samples"]
    need, data, data_seeds = _multiplier(static, "generated_samples", dp)
    best = max(static, key=lambda r: (r.mean["final_val_acc"], -r.mean["generated_samples"]))
    series = [best, *(r for r in rows if r.series == "iterations" and r.setting.split(" ")[0] == best.setting)]
    iters, iter_mult, iter_seeds = _multiplier(series, "iterations", dp) if len(series) > 1 else (None, None, {})
    effect, effect_sd, effect_ci = _paired_difference(dp, by.get(dp0_arm), "final_test_acc")
    ood, ood_sd, ood_ci = _paired_difference(dp, best, "final_ood_acc")
    over = [r for r in rows if r.strategy == "oversample"]
    over_arm, over_reached, compute, seconds = _versus_oversample(dp, over)
    pick = by[over_arm] if over_arm else None
    compute_seeds = (
        {s: pick.per_seed[s]["model_evals"] / m["model_evals"] for s, m in dp.per_seed.items() if s in pick.per_seed}
        if pick
        else {}
    )
    intervals = {"data multiplier": _curve_interval(static, "generated_samples", dp)}
    if iter_mult is not None:
        intervals["iteration multiplier"] = _curve_interval(series, "iterations", dp)
    if pick is not None:
        intervals["generation compute vs oversample"] = _compute_interval(pick, dp)
    intervals.update({k: ci for k, ci in (("OOD gain", ood_ci), ("guidance effect", effect_ci)) if ci is not None})
    bounds = {
        "data multiplier": not math.isfinite(need),
        "iteration multiplier": iters is not None and not math.isfinite(iters),
        "generation compute vs oversample": not over_reached,
    }
    verdicts = {
        name: verdict(intervals[name].low, intervals[name].high, null, bound=bounds.get(name, False))
        for name, _, null in FIGURES
        if name in intervals
    }
    return Headline(
        dp_arm=dp.arm,
        dp_test_acc=acc,
        dp_samples=samples,
        static_samples_needed=need,
        data_multiplier=data,
        static_reached=math.isfinite(need),
        data_multiplier_per_seed=data_seeds,
        static_best=best.arm,
        dp_iterations=dp.mean["iterations"],
        static_iterations_needed=iters,
        iteration_multiplier=iter_mult,
        iterations_reached=iters is not None and math.isfinite(iters),
        iteration_multiplier_per_seed=iter_seeds,
        guidance_effect=effect,
        guidance_effect_sd=effect_sd,
        oversample_arm=over_arm,
        oversample_reached=over_reached,
        compute_multiplier=compute,
        compute_multiplier_per_seed=compute_seeds,
        seconds_multiplier=seconds,
        ood_gain=ood,
        ood_gain_sd=ood_sd,
        intervals=intervals,
        verdicts=verdicts,
    )


ACC = "final_test_acc"


def _mean(row: ArmStats, drawn: Sequence[int], field: str) -> float:
    return statistics.fmean(row.per_seed[s][field] for s in drawn)


def _shared_seeds(*rows: ArmStats) -> list[int]:
    """The seeds every row has: a bootstrap draws from these, every row at the same drawn seeds (paired)."""
    return sorted(set.intersection(*(set(r.per_seed) for r in rows)))


def _curve_interval(curve_rows: Sequence[ArmStats], x: str, dp: ArmStats) -> Interval:
    """The bootstrap interval of :func:`_multiplier`'s ratio (a draw where the curve never reaches DP's
    accuracy is a bound: the largest x ÷ DP's)."""

    def figure(drawn: Sequence[int]) -> tuple[float, bool]:
        curve = sorted((_mean(r, drawn, x), _mean(r, drawn, ACC)) for r in curve_rows)
        need = interpolate_samples_for_accuracy([n for n, _ in curve], [a for _, a in curve], _mean(dp, drawn, ACC))
        reached = math.isfinite(need)
        return (need if reached else curve[-1][0]) / _mean(dp, drawn, x), reached

    return bootstrap(_shared_seeds(dp, *curve_rows), figure)


def _compute_interval(pick: ArmStats, dp: ArmStats) -> Interval:
    """The bootstrap interval of the oversample arm's model evaluations ÷ DP's (a draw where it does not reach
    DP's accuracy is a bound)."""

    def figure(drawn: Sequence[int]) -> tuple[float, bool]:
        ratio = _mean(pick, drawn, "model_evals") / _mean(dp, drawn, "model_evals")
        return ratio, _mean(pick, drawn, ACC) >= _mean(dp, drawn, ACC)

    return bootstrap(_shared_seeds(dp, pick), figure)


def _multiplier(curve_rows: Sequence[ArmStats], x: str, dp: ArmStats) -> tuple[float, float, dict[int, float]]:
    """How much of ``x`` (samples, iterations) the rows' mean test-accuracy curve needs to reach DP's mean
    (interpolated in log x; inf if never), that ÷ DP's ``x`` (if never: the bound largest x ÷ DP's), and
    each DP seed's own ratio read off the same curve."""
    curve = sorted((r.mean[x], r.mean["final_test_acc"]) for r in curve_rows)
    need = interpolate_samples_for_accuracy([n for n, _ in curve], [a for _, a in curve], dp.mean["final_test_acc"])
    ratio = (need if math.isfinite(need) else curve[-1][0]) / dp.mean[x]
    per_seed = {s: data_multiplier(curve, m[x], m["final_test_acc"]) for s, m in dp.per_seed.items()}
    return need, ratio, per_seed


def _paired_difference(
    dp: ArmStats, other: ArmStats | None, field: str
) -> tuple[float | None, float | None, Interval | None]:
    """Mean, sd and t interval over seeds of ``field`` of DP minus ``other``, paired by seed (None: no pair
    has it)."""
    if other is None:
        return None, None, None
    diffs = [
        m[field] - other.per_seed[s][field]
        for s, m in dp.per_seed.items()
        if s in other.per_seed and field in m and field in other.per_seed[s]
    ]
    if not diffs:
        return None, None, None
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0), t_interval(diffs)


def oversample_pick(rows: Sequence[ArmStats], dp_arm: str) -> str | None:
    """The oversample arm the headline compares DP with (the cheapest ratio at DP's test accuracy or better,
    else the most accurate); None without a DP row or oversample rows."""
    dp = next((r for r in rows if r.arm == dp_arm), None)
    return _versus_oversample(dp, [r for r in rows if r.strategy == "oversample"])[0] if dp else None


def _versus_oversample(dp: ArmStats, over: Sequence[ArmStats]) -> tuple[str | None, bool, float | None, float | None]:
    if not over:
        return None, False, None, None
    reaching = [r for r in over if r.mean["final_test_acc"] >= dp.mean["final_test_acc"]]
    pick = (
        min(reaching, key=lambda r: r.mean["model_evals"])
        if reaching
        else max(over, key=lambda r: r.mean["final_test_acc"])
    )
    return (
        pick.arm,
        bool(reaching),
        pick.mean["model_evals"] / dp.mean["model_evals"],
        pick.mean["gen_seconds"] / dp.mean["gen_seconds"],
    )


def plot(rows: Sequence[ArmStats], path: Path) -> None:
    """Held-out test accuracy (left) and OOD accuracy (right, where the runs have it) vs generated samples
    (log x), mean ± sd over seeds; static's and DP's size series joined by lines, other arms labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fields = [("final_test_acc", "held-out test accuracy")]
    if any(not math.isnan(r.mean.get("final_ood_acc", math.nan)) for r in rows):
        fields.append(("final_ood_acc", "out-of-distribution accuracy"))
    fig = Figure(figsize=(6.4 * len(fields), 4.8), dpi=120)
    FigureCanvasAgg(fig)
    annotated: list[tuple[Any, list[tuple[str, float, float]]]] = []
    for k, (field, label) in enumerate(fields):
        ax = fig.add_subplot(1, len(fields), k + 1)
        labels: list[tuple[str, float, float]] = []
        for strategy, style in ((s.name, st) for s in STRATEGIES.values() for st in s.bench_series):
            colour, drawn = style.colour, (r for r in rows if (r.strategy, r.series) == (strategy, style.series))
            rs = sorted(
                (r for r in drawn if not math.isnan(r.mean[field])),
                key=lambda r: r.mean["generated_samples"],
            )
            for i, r in enumerate(rs):
                x = [m["generated_samples"] for m in r.per_seed.values() if field in m]
                ax.scatter(x, [m[field] for m in r.per_seed.values() if field in m], s=9, color=colour, alpha=0.3, lw=0)
                ax.errorbar(
                    r.mean["generated_samples"],
                    r.mean[field],
                    yerr=r.sd[field],
                    fmt=style.marker,
                    color=colour,
                    capsize=3,
                    ms=5,
                    mfc="white" if style.hollow else colour,
                    label=style.label if i == 0 else None,
                )
                if style.annotated:
                    labels.append((r.setting, r.mean["generated_samples"], r.mean[field]))
            if style.joined and len(rs) > 1:
                ax.plot([r.mean["generated_samples"] for r in rs], [r.mean[field] for r in rs], "-", color=colour, lw=1)
        ax.set_xscale("log")
        ax.margins(x=0.08)
        ax.set_xlabel("generated samples")
        ax.set_ylabel(label)
        ax.set_title("mean ± sd over seeds (faint: single seeds)", fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
        annotated.append((ax, labels))
        if ax.get_legend_handles_labels()[0]:  # (no finished run: an empty plot, no legend)
            ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    for ax, labels in annotated:  # (placed once the axes' limits and sizes are final)
        _annotate(ax, labels)
    fig.savefig(path, format="png")


LABEL_PT = 7  # a label's height in points (fontsize 6 and a little air)


def _annotate(ax: Any, labels: Sequence[tuple[str, float, float]]) -> None:
    """Each ``(text, x, y)`` beside its point; a label that would overlap one already placed near the same x
    (two budgets of one static size, two ω at one pool size) is moved up until it does not."""
    ax.get_xlim(), ax.get_ylim()  # (brings the autoscaled limits up to date: transData reads them)
    points_per_pixel = 72 / ax.figure.dpi
    placed: list[tuple[float, float]] = []  # (x, y) in points of each label's lower left corner
    for text, x, y in sorted(labels, key=lambda label: label[2]):
        px, py = (v * points_per_pixel for v in ax.transData.transform((x, y)))
        up = 4.0
        while any(abs(px - qx) < 40 and abs(py + up - qy) < LABEL_PT for qx, qy in placed):
            up += LABEL_PT / 2
        placed.append((px, py + up))
        ax.annotate(text, (x, y), fontsize=6, xytext=(5, up), textcoords="offset points")
