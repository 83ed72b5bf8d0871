"""The one table of acquisition strategies, :data:`STRATEGIES`: per ``dp.strategy`` name, everything that
differs between strategies, so that the loop, tracking, the run summary, the scaling report and the
benchmark read it and nothing dispatches on the name.

Notation (Algorithm 1): N samples up front (``dp.initial_size``), P per round (``dp.round_size``), ω the
entropy-guidance strength (``dp.omega``), r the oversampling ratio (``dp.oversample_ratio``).

Strategies differ only in step 3, what a round is (:class:`Acquisition`): ``dp`` generates P samples
entropy-guided by the current learner; ``oversample`` generates r·P unguided and keeps the P of highest
learner entropy; ``static`` adds no round (all N are generated up front). Everything else a strategy has
is how it is described: a run's name and note, the run summary's words, what it leaves unused (for the
scaling report), and how the benchmark orders and draws its arms.

The names are the config's ``Literal`` (:class:`dp_ops.config.DPConfig`, the validated source);
``tests/engine/test_strategies.py`` checks that this table has exactly those keys and walks every entry
through a tiny run, the benchmark's plan and each description. Standard library and the config only, so
that the CLI and the benchmark's statistics can read it without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dp_ops.config import DPConfig


@dataclass(frozen=True)
class Acquisition:
    """One round of step 3: ``n`` samples generated with guidance strength ``omega`` (0: unguided), of which
    the ``keep`` of highest learner entropy become the round (``keep`` = ``n``: all of them)."""

    n: int
    omega: float
    keep: int


@dataclass(frozen=True)
class SeriesStyle:
    """How the benchmark's plot draws a strategy's arms of one series (the ``dpops.series`` tag)."""

    series: str
    label: str  # in the legend
    colour: str  # a matplotlib colour; a strategy's series share it
    marker: str
    hollow: bool  # drawn hollow: not the strategy's main series
    joined: bool  # points joined by a line (a size series, one scaling law)
    annotated: bool = True  # each point labelled with its arm's setting (not where x says it: static's sizes)


@dataclass(frozen=True)
class Strategy:
    """One acquisition strategy; every field is read somewhere, and the walking test reaches each."""

    name: str
    # step 3 at a plateau: the round to make, or None when the strategy adds no rounds after round 0
    acquire: Callable[[DPConfig], Acquisition | None]
    run_detail: Callable[[DPConfig], str]  # the middle of a run's default name: ``dp-ω0.05-seed0``
    note: Callable[[DPConfig], str]  # what ran, at the head of a run's MLflow description
    setting: Callable[[DPConfig], str]  # what its rounds were made with, in the run summary ("" for none)
    unused: tuple[str, ...]  # config keys (or prefixes, ending in ".") its runs do not read
    bench_order: int  # the benchmark starts the strategies with the lowest first (the most generation)
    bench_series: tuple[SeriesStyle, ...]  # every series the benchmark runs it in


def _dp_note(dp: DPConfig) -> str:
    return (
        f"Deliberate Practice: N={dp.initial_size} samples, then rounds of P={dp.round_size} "
        f"entropy-guided (ω={dp.omega:g}) samples at each plateau"
    )


def _oversample_note(dp: DPConfig) -> str:
    return (
        f"oversample: N={dp.initial_size} samples, then at each plateau the top P={dp.round_size} "
        f"of {dp.oversample_ratio}×P unguided samples by learner entropy"
    )


# in the order the benchmark's plot draws them and lists them in its legend
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            name="static",
            acquire=lambda dp: None,
            run_detail=lambda dp: f"N{dp.initial_size}",
            note=lambda dp: f"static baseline: N={dp.initial_size} unguided samples, no rounds",
            setting=lambda dp: "",
            unused=("dp.", "generator.guide_every"),  # no rounds, no guidance
            bench_order=1,
            bench_series=(
                SeriesStyle("scaling", "static", "C0", "o", hollow=False, joined=True, annotated=False),
                SeriesStyle("iterations", "static, more iterations", "C0", "^", hollow=True, joined=False),
            ),
        ),
        Strategy(
            name="dp",
            acquire=lambda dp: Acquisition(dp.round_size, dp.omega, dp.round_size),
            run_detail=lambda dp: f"ω{dp.omega:g}",
            note=_dp_note,
            setting=lambda dp: f"ω={dp.omega:g}",
            unused=(),
            bench_order=2,
            bench_series=(
                SeriesStyle("scaling", "dp", "C1", "D", hollow=False, joined=True),
                SeriesStyle("omega", "dp, other ω", "C1", "D", hollow=True, joined=False),
            ),
        ),
        Strategy(
            name="oversample",
            acquire=lambda dp: Acquisition(dp.round_size * dp.oversample_ratio, 0.0, dp.round_size),
            run_detail=lambda dp: f"r{dp.oversample_ratio}",
            note=_oversample_note,
            setting=lambda dp: f"keeps {dp.round_size} of {dp.round_size * dp.oversample_ratio} unguided per round",
            unused=("dp.omega", "generator.guide_every"),  # no guidance
            bench_order=0,
            bench_series=(SeriesStyle("oversample", "oversample", "C2", "s", hollow=False, joined=False),),
        ),
    )
}
