"""What a benchmark's runs say: per-arm means and spreads, the headline ratios, the plot.

- **data multiplier** = samples static needs to reach DP's test accuracy, read off static's mean
  accuracies (interpolated linearly in log n, never extrapolated) ÷ samples DP generated; when no static
  size gets there, the lower bound largest static size ÷ DP's samples;
- **generation-compute multiplier vs oversample** = UNet evaluations (and generation seconds) of the
  cheapest oversample ratio that reaches DP's test accuracy ÷ DP's;
- **guidance effect** = test accuracy of DP at its ω minus DP at ω = 0, paired by seed.

Everything is computed from the runs' summary metrics, so it is the same whether the runs were made now
or read back from the registry.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dp_ops.files import json_ready
from dp_ops.studies.scaling import data_multiplier, interpolate_samples_for_accuracy

# the runs' summary metrics that a row averages
FIELDS = (
    "generated_samples",
    "pool_size",
    "iterations",
    "gen_seconds",
    "unet_evals",
    "final_val_acc",
    "final_test_acc",
)
# reported where the runs have it (not image-folder runs, nor runs made before it existed): NaN where none has
OPTIONAL_FIELDS = ("final_ood_acc",)


@dataclass(frozen=True)
class Arm:
    """One strategy at one setting, e.g. ``dp ω=0.05``; ``overrides`` are params.yaml keys. (Here, not in
    :mod:`dp_ops.studies.bench`, so that the statistics need nothing of how runs are made.)"""

    strategy: str
    setting: str
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.strategy} {self.setting}"


@dataclass(frozen=True)
class ArmStats:
    """One row of the table: an arm's mean and sample standard deviation over seeds of each field."""

    arm: str
    strategy: str
    setting: str
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
    guidance_effect: float | None  # mean over seeds of test acc (dp ω) − test acc (dp ω=0), paired by seed
    guidance_effect_sd: float | None
    oversample_arm: str | None  # the cheapest ratio at DP's accuracy or better; if none, the most accurate
    oversample_reached: bool
    compute_multiplier: float | None  # UNet evaluations of that arm ÷ DP's
    seconds_multiplier: float | None  # generation seconds of that arm ÷ DP's

    def to_dict(self) -> dict[str, Any]:
        return json_ready(asdict(self))


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
    """The two headline ratios (and the guidance effect); None without a DP row and >= 2 static sizes."""
    by = {r.arm: r for r in rows}
    static = sorted((r for r in rows if r.strategy == "static"), key=lambda r: r.mean["generated_samples"])
    dp = by.get(dp_arm)
    if dp is None or len(static) < 2:
        return None
    curve = [(r.mean["generated_samples"], r.mean["final_test_acc"]) for r in static]
    acc, samples = dp.mean["final_test_acc"], dp.mean["generated_samples"]
    need = interpolate_samples_for_accuracy([n for n, _ in curve], [a for _, a in curve], acc)
    reached = math.isfinite(need)
    effect, effect_sd = _paired_difference(dp, by.get(dp0_arm))
    over_arm, over_reached, compute, seconds = _versus_oversample(dp, [r for r in rows if r.strategy == "oversample"])
    return Headline(
        dp_arm=dp.arm,
        dp_test_acc=acc,
        dp_samples=samples,
        static_samples_needed=need,
        data_multiplier=(need if reached else curve[-1][0]) / samples,
        static_reached=reached,
        data_multiplier_per_seed={
            s: data_multiplier(curve, m["generated_samples"], m["final_test_acc"]) for s, m in dp.per_seed.items()
        },
        guidance_effect=effect,
        guidance_effect_sd=effect_sd,
        oversample_arm=over_arm,
        oversample_reached=over_reached,
        compute_multiplier=compute,
        seconds_multiplier=seconds,
    )


def _paired_difference(dp: ArmStats, dp0: ArmStats | None) -> tuple[float | None, float | None]:
    if dp0 is None:
        return None, None
    diffs = [
        dp.per_seed[s]["final_test_acc"] - dp0.per_seed[s]["final_test_acc"] for s in dp.per_seed if s in dp0.per_seed
    ]
    if not diffs:
        return None, None
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)


def _versus_oversample(dp: ArmStats, over: Sequence[ArmStats]) -> tuple[str | None, bool, float | None, float | None]:
    if not over:
        return None, False, None, None
    reaching = [r for r in over if r.mean["final_test_acc"] >= dp.mean["final_test_acc"]]
    pick = (
        min(reaching, key=lambda r: r.mean["unet_evals"])
        if reaching
        else max(over, key=lambda r: r.mean["final_test_acc"])
    )
    return (
        pick.arm,
        bool(reaching),
        pick.mean["unet_evals"] / dp.mean["unet_evals"],
        pick.mean["gen_seconds"] / dp.mean["gen_seconds"],
    )


def headline_lines(h: Headline) -> list[str]:
    """The headline in words, one sentence per ratio."""
    seeds = ", ".join(_times(v) for _, v in sorted(h.data_multiplier_per_seed.items()))
    if h.static_reached:
        data = (
            f"data multiplier: static needs {_times(h.data_multiplier)} the samples {h.dp_arm} generated to reach "
            f"its test accuracy {h.dp_test_acc:.4f} ({h.static_samples_needed:,.0f} vs {h.dp_samples:,.0f}; "
            f"static's mean accuracies interpolated in log n; per DP seed: {seeds})"
        )
    else:
        data = (
            f"data multiplier: more than {h.data_multiplier:.2f}× — no static size reached {h.dp_arm}'s test "
            f"accuracy {h.dp_test_acc:.4f} with {h.dp_samples:,.0f} samples (per DP seed: {seeds})"
        )
    lines = [data]
    if h.guidance_effect is not None:
        lines.append(
            f"guidance effect: {h.dp_arm} − dp ω=0 = {h.guidance_effect:+.4f} test accuracy "
            f"(sd {h.guidance_effect_sd:.4f} over paired seeds)"
        )
    if h.oversample_arm is not None:
        if h.oversample_reached:
            lines.append(
                f"generation compute vs oversample: {h.oversample_arm}, the cheapest ratio at DP's test "
                f"accuracy or better, uses {_times(h.compute_multiplier)} DP's UNet evaluations and "
                f"{_times(h.seconds_multiplier)} its generation seconds"
            )
        else:
            lines.append(
                f"generation compute vs oversample: no ratio reached DP's test accuracy; the most accurate, "
                f"{h.oversample_arm}, used {_times(h.compute_multiplier)} DP's UNet evaluations and "
                f"{_times(h.seconds_multiplier)} its generation seconds"
            )
    return lines


def plot(rows: Sequence[ArmStats], path: Path) -> None:
    """Held-out test accuracy vs generated samples (log x), mean ± sd over seeds, one colour per strategy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = {"dp": "D", "oversample": "s"}
    labelled = set()
    for i, strategy in enumerate(("static", "dp", "oversample")):
        rs = sorted((r for r in rows if r.strategy == strategy), key=lambda r: r.mean["generated_samples"])
        for r in rs:
            ax.scatter(
                [m["generated_samples"] for m in r.per_seed.values()],
                [m["final_test_acc"] for m in r.per_seed.values()],
                s=9,
                color=f"C{i}",
                alpha=0.3,
                lw=0,
            )
            unguided = strategy == "dp" and r.setting == "ω=0"  # hollow: DP's schedule without guidance
            label = "dp, ω=0" if unguided else strategy
            ax.errorbar(
                r.mean["generated_samples"],
                r.mean["final_test_acc"],
                yerr=r.sd["final_test_acc"],
                fmt=markers.get(strategy, "o"),
                color=f"C{i}",
                capsize=3,
                ms=5,
                mfc="white" if unguided else f"C{i}",
                label=None if label in labelled else label,
            )
            labelled.add(label)
            if strategy != "static":
                ax.annotate(
                    r.setting,
                    (r.mean["generated_samples"], r.mean["final_test_acc"]),
                    fontsize=7,
                    xytext=(5, -10 if r.setting.endswith("=0") else 5),
                    textcoords="offset points",
                )
        if strategy == "static" and rs:
            ax.plot(
                [r.mean["generated_samples"] for r in rs],
                [r.mean["final_test_acc"] for r in rs],
                "-",
                color=f"C{i}",
                lw=1,
            )
    ax.set_xscale("log")
    ax.margins(x=0.08)
    ax.set_xlabel("generated samples")
    ax.set_ylabel("held-out test accuracy")
    ax.set_title("mean ± sd over seeds (faint: single seeds)", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _times(v: float | None) -> str:
    return "—" if v is None else ("∞×" if math.isinf(v) else f"{v:.2f}×")
