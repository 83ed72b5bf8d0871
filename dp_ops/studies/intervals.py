"""95% intervals for the headline figures, and the one word that says what each settles.

Two kinds of figure, two intervals:

- **a paired difference** (guidance effect, OOD gain: DP minus another arm, seed by seed): a t interval over
  the per-seed differences, mean ± t(0.975, n−1)·sd/√n. Exact for normal noise, and honest at the 3–8 seeds a
  benchmark has: a bootstrap percentile interval over 3 seeds has 10 distinct resamples and is far too narrow.
- **a multiplier** (data, iterations, generation compute): a paired bootstrap over seeds, percentile interval.
  Each draw takes n of the seeds with replacement, every arm at the same drawn seeds, and recomputes the
  figure from that draw's means exactly as the headline does from all seeds. A multiplier is read off
  interpolated curves and may never be reached, so no t interval applies; a draw where the other arm never gets
  there is only known to be above a bound: the interval's low end counts it at that bound, its high end at ∞,
  so the interval says ``[1.60×, ∞)`` instead of NaN.

The word (:func:`verdict`): **resolved** when the interval excludes "no effect" (0 for a difference, 1× for
a multiplier); **bound** when the figure itself is only a bound (the other arm never got there on the means);
**not resolved** otherwise. With fewer than 2 seeds nothing is resolved: the interval is the whole line.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LEVEL = 0.95
DRAWS = 2000  # bootstrap draws; seeded, so a report made twice from the same runs is the same
RESOLVED, NOT_RESOLVED, BOUND = "resolved", "not resolved", "bound"


@dataclass(frozen=True)
class Interval:
    """A 95% interval; an end may be ±∞ (never reached, or too few seeds to say)."""

    low: float
    high: float
    method: str  # "t" over paired differences, "bootstrap" over seeds
    seeds: int  # how many seeds (pairs) it is computed from

    def to_dict(self) -> dict[str, Any]:
        """For JSON, which has no ∞: ``None`` for an infinite end (the word is the headline's ``verdicts``)."""
        ends = [v if math.isfinite(v) else None for v in (self.low, self.high)]
        return {"low": ends[0], "high": ends[1], "method": self.method, "seeds": self.seeds}


def t_interval(differences: Sequence[float]) -> Interval:
    """Mean ± t(0.975, n−1)·sd/√n of paired differences; the whole line with fewer than 2."""
    n = len(differences)
    if n < 2:
        return Interval(-math.inf, math.inf, "t", n)
    from scipy.stats import t

    mean = statistics.fmean(differences)
    half = float(t.ppf(0.5 + LEVEL / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return Interval(mean - half, mean + half, "t", n)


def bootstrap(seeds: Sequence[int], figure: Callable[[Sequence[int]], tuple[float, bool]]) -> Interval:
    """Percentile interval of ``figure`` over :data:`DRAWS` draws of ``seeds`` with replacement.
    ``figure(drawn)`` returns the figure at those seeds and whether it was reached; an unreached value is a
    bound (counted as itself for the low end, ∞ for the high end). Fewer than 2 seeds: ``[0, ∞)``."""
    if len(seeds) < 2:
        return Interval(0.0, math.inf, "bootstrap", len(seeds))
    rng = random.Random(0)
    lows, highs = [], []
    for _ in range(DRAWS):
        value, reached = figure(rng.choices(seeds, k=len(seeds)))
        lows.append(value)
        highs.append(value if reached else math.inf)
    tail = (1 - LEVEL) / 2
    return Interval(nearest_rank(lows, tail), nearest_rank(highs, 1 - tail), "bootstrap", len(seeds))


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank, not interpolated: a value may be ∞, and ∞ − ∞ would make it NaN."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def verdict(low: float, high: float, null: float, *, bound: bool = False) -> str:
    """resolved / bound / not resolved (module docstring) of the interval [low, high]; ``null`` is "no effect"
    (0 or 1×). A NaN end (no interval) resolves nothing."""
    if bound:
        return BOUND
    return RESOLVED if low > null or high < null else NOT_RESOLVED
