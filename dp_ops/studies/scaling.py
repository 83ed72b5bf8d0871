"""Scaling laws for data-acquisition strategies: error(n) = a·n^(−α) + c.

Each strategy ("dp", "static", "oversample") yields points (pool size n, accuracy). Comparing
strategies at one pool size hides how fast each one improves; a fitted power law lets us ask the
question the paper asks instead: how many samples does ``static`` need to match what ``dp`` reached
(the *data multiplier*)? Error is ``1 − accuracy``; ``c`` is the irreducible error, so an accuracy
at or above ``1 − c`` is unreachable and maps to ``math.inf``.

Everything here is pure: no I/O except :func:`plot_scaling` writing its PNG, no logging, and all
randomness (the bootstrap) comes from an explicit ``seed`` or :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from dp_ops.errors import FitError
from dp_ops.files import json_ready

__all__ = [
    "PowerLawFit",
    "data_multiplier",
    "fit_power_law",
    "fit_strategies",
    "interpolate_samples_for_accuracy",
    "plot_scaling",
]

MIN_POINTS = 4
MIN_DISTINCT_N = 3

# Parameter box in the fitting parametrisation θ = (b, α, c), see _model. α beyond 5 or an amplitude
# beyond e^5 at the geometric-mean pool size is not a scaling law but a failed fit.
_LOWER = np.array([-30.0, 1e-6, 0.0])
_UPPER = np.array([5.0, 5.0, float(np.nextafter(1.0, 0.0))])
_ALPHA_RANGE = (0.05, 3.0)  # where multi-start α values are spread (log-uniformly)
_C_MAX_FRACTION = 0.95  # multi-start c values lie in [0, 0.95·min(err)]
_BOOT_EXTRA_STARTS = 2  # bootstrap refits: best solution + this many grid starts
# least_squares (trf) keeps its iterates strictly inside the box, so a parameter at a bound comes back a hair
# off it, by an amount that varies from fit to fit (c = 3e-19 here, 5e-17 in a refit): within this (relative
# to the bound's scale) it is the bound
_AT_BOUND = 1e-9


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted error(n) = a·n^(−α) + c with 95% percentile-bootstrap intervals (each holds its estimate,
    see :func:`_interval`).

    ``boot`` holds the bootstrap parameter samples ``(a, α, c)`` so that plots can draw a band by
    evaluating them; :meth:`to_dict` summarises it by its size only.
    """

    a: float
    alpha: float
    c: float
    a_ci: tuple[float, float]
    alpha_ci: tuple[float, float]
    c_ci: tuple[float, float]
    n_points: int
    rmse: float
    boot: tuple[tuple[float, float, float], ...] = field(default=(), repr=False, compare=False)
    label: str | None = None

    def error(self, n: Any) -> Any:
        """Predicted error at pool size ``n`` (scalar or array)."""
        out = self.c + self.a * np.power(np.asarray(n, dtype=float), -self.alpha)
        return float(out) if np.ndim(out) == 0 else out

    def accuracy(self, n: Any) -> Any:
        """Predicted accuracy ``1 − error(n)`` at pool size ``n`` (scalar or array)."""
        out = 1.0 - np.asarray(self.error(n), dtype=float)
        return float(out) if np.ndim(out) == 0 else out

    def samples_for_accuracy(self, acc: float) -> float:
        """Pool size at which the law reaches ``acc``; ``math.inf`` when ``acc ≥ 1 − c``.

        Inverse of :meth:`accuracy`: n = (a / (1 − acc − c))^(1/α).
        """
        return samples_for_accuracy(self.a, self.alpha, self.c, acc)

    def band(self, n: Any, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise ``level`` interval of the bootstrap accuracy curves at ``n`` (lower, upper)."""
        n = np.atleast_1d(np.asarray(n, dtype=float))
        if not self.boot:
            acc = np.asarray(self.accuracy(n), dtype=float)
            return acc, acc
        p = np.asarray(self.boot, dtype=float)
        curves = 1.0 - (p[:, 2:3] + p[:, 0:1] * np.power(n[None, :], -p[:, 1:2]))
        tail = 50.0 * (1.0 - level)
        lo, hi = np.percentile(curves, [tail, 100.0 - tail], axis=0)
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (non-finite numbers become ``None``; ``boot`` only by its size)."""
        return {
            "label": self.label,
            "a": json_ready(self.a),
            "alpha": json_ready(self.alpha),
            "c": json_ready(self.c),
            "a_ci": json_ready(self.a_ci),
            "alpha_ci": json_ready(self.alpha_ci),
            "c_ci": json_ready(self.c_ci),
            "n_points": int(self.n_points),
            "rmse": json_ready(self.rmse),
            "n_boot": len(self.boot),
        }


def samples_for_accuracy(a: float, alpha: float, c: float, acc: float) -> float:
    """n at which a·n^(−α) + c falls to 1 − ``acc``; ``math.inf`` when ``acc ≥ 1 − c``."""
    if math.isnan(acc):
        raise ValueError("target accuracy is NaN")
    gap = (1.0 - acc) - c
    if acc >= 1.0 - c or gap <= 0.0:
        return math.inf
    if a <= 0.0:  # (a flat law at c, already below 1 − acc: any n)
        return 0.0
    try:
        return float(math.exp((math.log(a) - math.log(gap)) / alpha))
    except OverflowError:
        return math.inf


def fit_power_law(
    n: Sequence[float] | np.ndarray,
    err: Sequence[float] | np.ndarray,
    *,
    n_starts: int = 16,
    n_boot: int = 200,
    seed: int | np.random.Generator = 0,
    f_scale: float = 0.01,
    label: str | None = None,
) -> PowerLawFit:
    """Fit error(n) = a·n^(−α) + c robustly, with bootstrap 95% intervals for a, α and c.

    Why this shape: the loss is ``soft_l1`` (one bad run should not bend the law; residuals much
    larger than ``f_scale`` error units count linearly, not quadratically), the law is non-convex
    in (α, c) so ``n_starts`` deterministic, well-spread starts are tried, and it is fitted as
    c + exp(b − α·(log n − mean log n)) so that the amplitude is estimated where the data are and
    a > 0 holds by construction. Intervals come from resampling points with replacement
    (``n_boot`` times) and refitting from the best solution plus a couple of grid starts.
    """
    n_arr, err_arr = _validate(n, err, label)
    if n_starts < 1:
        raise ValueError(f"n_starts must be >= 1, got {n_starts}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    x = np.log(n_arr)
    x0 = float(np.mean(x))
    dx = x - x0
    grid = _start_grid(n_starts, float(np.min(err_arr)))

    theta = _best_fit(dx, err_arr, [_initial_b(dx, err_arr, s) for s in grid], f_scale)
    if theta is None:
        raise FitError(f"{_prefix(label)}scaling-law fit did not converge from any of {n_starts} starts")
    a, alpha, c = _to_natural(theta, x0)
    resid = _model(theta, dx) - err_arr
    rmse = float(np.sqrt(np.mean(resid**2)))

    boot = _bootstrap(dx, err_arr, theta, grid, n_boot, f_scale, rng, x0)
    if len(boot) >= 2:
        draws = np.asarray(boot)
        a_ci, alpha_ci, c_ci = (_interval(draws[:, j], v) for j, v in enumerate((a, alpha, c)))
    else:
        a_ci = alpha_ci = c_ci = (math.nan, math.nan)

    return PowerLawFit(
        a=a,
        alpha=alpha,
        c=c,
        a_ci=a_ci,
        alpha_ci=alpha_ci,
        c_ci=c_ci,
        n_points=int(n_arr.size),
        rmse=rmse,
        boot=tuple(boot),
        label=label,
    )


def fit_strategies(points: Mapping[str, Sequence[tuple[float, float]]], **kw: Any) -> dict[str, PowerLawFit]:
    """Fit one law per strategy from its ``(n, accuracy)`` points; ``kw`` goes to :func:`fit_power_law`."""
    fits: dict[str, PowerLawFit] = {}
    for label, pts in points.items():
        n, acc = _as_columns(pts, label)
        fits[label] = fit_power_law(n, 1.0 - acc, label=label, **kw)
    return fits


def interpolate_samples_for_accuracy(
    n: Sequence[float] | np.ndarray, acc: Sequence[float] | np.ndarray, target: float
) -> float:
    """Samples needed to reach ``target`` accuracy, read off the observed points without a fit.

    Accuracy is made monotone with a running maximum over increasing n (a pool that once reached
    an accuracy has reached it), then interpolated linearly in log n. Returns the smallest observed
    n if that already reaches ``target`` (nothing is extrapolated) and ``math.inf`` if no point does.
    """
    n_arr = np.asarray(n, dtype=float).ravel()
    acc_arr = np.asarray(acc, dtype=float).ravel()
    if n_arr.size != acc_arr.size:
        raise FitError(f"got {n_arr.size} pool sizes but {acc_arr.size} accuracies")
    if n_arr.size == 0:
        raise FitError("interpolation needs at least 1 point; got 0 points")
    if not (np.all(np.isfinite(n_arr)) and np.all(n_arr > 0)):
        raise FitError(f"pool sizes must be positive and finite; got {_bad(n_arr, ~(n_arr > 0))}")
    if not np.all((acc_arr >= 0.0) & (acc_arr <= 1.0)):
        raise FitError(f"accuracies must lie in [0, 1]; got {_bad(acc_arr, ~((acc_arr >= 0) & (acc_arr <= 1)))}")
    if math.isnan(target):
        raise ValueError("target accuracy is NaN")

    order = np.argsort(n_arr, kind="stable")
    x = np.log(n_arr[order])
    best = np.maximum.accumulate(acc_arr[order])
    hits = np.nonzero(best >= target)[0]
    if hits.size == 0:
        return math.inf
    i = int(hits[0])
    if i == 0:
        return float(n_arr[order][0])
    t = (target - best[i - 1]) / (best[i] - best[i - 1])  # best[i-1] < target <= best[i]
    return float(math.exp(x[i - 1] + t * (x[i] - x[i - 1])))


def data_multiplier(
    static_fit_or_points: PowerLawFit | Sequence[tuple[float, float]],
    dp_samples: float,
    dp_accuracy: float,
) -> float:
    """How many times more samples the baseline needs to match DP's accuracy.

    ``static_fit_or_points`` is a :class:`PowerLawFit` (inverted exactly) or raw ``(n, accuracy)``
    points (read off by :func:`interpolate_samples_for_accuracy`). ``math.inf`` if the baseline
    never reaches ``dp_accuracy``.
    """
    if not (dp_samples > 0 and math.isfinite(dp_samples)):
        raise FitError(f"DP sample count must be positive and finite; got {dp_samples}")
    if isinstance(static_fit_or_points, PowerLawFit):
        needed = static_fit_or_points.samples_for_accuracy(dp_accuracy)
    else:
        n, acc = _as_columns(static_fit_or_points, None)
        needed = interpolate_samples_for_accuracy(n, acc, dp_accuracy)
    return math.inf if math.isinf(needed) else needed / float(dp_samples)


def plot_scaling(
    points: Mapping[str, Sequence[tuple[float, float]]],
    fits: Mapping[str, PowerLawFit],
    path: str | Path,
    *,
    targets: Sequence[float] | None = None,
    title: str | None = None,
    xlabel: str = "pool size n (samples)",
) -> Path:
    """Write a PNG: accuracy vs ``xlabel`` (log x), points, fitted law and its bootstrap 95% band.

    ``targets`` are accuracies drawn as dotted horizontal lines (e.g. DP's final accuracy, to read
    off the data multiplier by eye). Uses a bare Agg :class:`~matplotlib.figure.Figure`, so no GUI
    backend or global pyplot state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i}" for i in range(10)]  # matplotlib's default cycle, fixed per strategy order

    labels = list(points) + [k for k in fits if k not in points]
    all_n = [p[0] for pts in points.values() for p in pts]
    for i, label in enumerate(labels):
        color = colors[i % len(colors)]
        fit = fits.get(label)
        pts = points.get(label, ())
        name: str | None = label if fit is None else f"{label}: α={fit.alpha:.2f}, c={fit.c:.3f}"
        if len(pts):
            n, acc = _as_columns(pts, label)
            ax.scatter(n, acc, color=color, s=22, zorder=3, label=name)
            name = None  # the points carry the legend entry
        if fit is not None:
            # from this strategy's smallest pool (not further left: the law is not extrapolated
            # downwards) to 3x the largest pool of any strategy (where multipliers are read off)
            lo_n = min((p[0] for p in pts), default=min(all_n) if all_n else 10.0)
            hi_n = max(all_n) if all_n else 1e5
            grid = np.geomspace(lo_n / 1.2, hi_n * 3.0, 200)
            if fit.boot:
                band_lo, band_hi = fit.band(grid)
                ax.fill_between(
                    grid, np.clip(band_lo, 0, 1), np.clip(band_hi, 0, 1), color=color, alpha=0.18, linewidth=0
                )
            ax.plot(grid, fit.accuracy(grid), color=color, linewidth=1.6, label=name)

    for t in targets or ():
        ax.axhline(t, color="0.4", linestyle=":", linewidth=1.0)
        ax.annotate(
            f"{t:.3f}",
            xy=(1.0, t),
            xycoords=("axes fraction", "data"),
            xytext=(2, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color="0.3",
        )

    accs = [p[1] for pts in points.values() for p in pts] + list(targets or ())
    if accs:  # frame the measured accuracies; a wide band must not squash them into a line
        span = max(max(accs) - min(accs), 0.01)
        ax.set_ylim(max(0.0, min(accs) - 0.5 * span), min(1.0, max(accs) + 0.25 * span))
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title or "accuracy = 1 − (a·n^(−α) + c)")
    ax.grid(True, which="both", alpha=0.25)
    if labels:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------------------------------
# internals


def _model(theta: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """error = c + exp(b − α·dx), dx = log n − mean(log n); a = exp(b + α·mean(log n))."""
    b, alpha, c = theta
    return c + np.exp(b - alpha * dx)


def _jac(theta: np.ndarray, dx: np.ndarray, err: np.ndarray) -> np.ndarray:
    b, alpha, _ = theta
    e = np.exp(b - alpha * dx)
    return np.column_stack([e, -dx * e, np.ones_like(dx)])


def _to_natural(theta: np.ndarray, x0: float) -> tuple[float, float, float]:
    b, alpha, c = (float(v) for v in theta)
    return float(math.exp(b + alpha * x0)), alpha, c


def _start_grid(n_starts: int, min_err: float) -> list[tuple[float, float]]:
    """Deterministic, well-spread (α, c) starts: the R2 low-discrepancy sequence over the box.

    The first start is the plain guess (α = 0.5, c = 0) so even ``n_starts=1`` is sensible.
    """
    g = 1.32471795724474602596  # plastic number: R2 sequence generator
    lo, hi = math.log(_ALPHA_RANGE[0]), math.log(_ALPHA_RANGE[1])
    starts = [(0.5, 0.0)]
    for i in range(1, n_starts):
        u = (0.5 + i / g) % 1.0
        v = (0.5 + i / g**2) % 1.0
        starts.append((math.exp(lo + u * (hi - lo)), v * _C_MAX_FRACTION * max(min_err, 0.0)))
    return starts


def _initial_b(dx: np.ndarray, err: np.ndarray, start: tuple[float, float]) -> np.ndarray:
    """Complete an (α, c) start with the b that best fits log(err − c) for that α."""
    alpha, c = start
    tiny = 1e-6
    b = float(np.mean(np.log(np.maximum(err - c, tiny)) + alpha * dx))
    return np.clip(np.array([b, alpha, c]), _LOWER, _UPPER)


def _interval(draws: np.ndarray, estimate: float) -> tuple[float, float]:
    """The 2.5–97.5 percentile range of the bootstrap refits, reaching to the estimate where it lies outside.

    The estimate is outside only when nearly all refits land on one side of it: at a bound of the box that
    fewer than 2.5% of the resamples reach (c = 0, the fit on all points, while resamples with a duplicated
    point find a floor), or in another optimum of this non-convex fit. The percentiles alone would then claim
    95% confidence in a range that excludes what the data fitted; the interval keeps both.
    """
    lo, hi = (float(q) for q in np.percentile(draws, [2.5, 97.5]))
    return min(lo, estimate), max(hi, estimate)


def _onto_bounds(theta: np.ndarray) -> np.ndarray:
    """``theta`` with each parameter within :data:`_AT_BOUND` of a bound of the box put on it."""
    scale = _AT_BOUND * np.maximum(1.0, np.abs(_UPPER - _LOWER))
    theta = np.where(theta - _LOWER <= scale, _LOWER, theta)
    return np.where(_UPPER - theta <= scale, _UPPER, theta)


def _best_fit(dx: np.ndarray, err: np.ndarray, starts: list[np.ndarray], f_scale: float) -> np.ndarray | None:
    best, best_cost = None, math.inf
    for theta0 in starts:
        try:
            res = least_squares(
                lambda th: _model(th, dx) - err,
                theta0,
                jac=lambda th: _jac(th, dx, err),
                bounds=(_LOWER, _UPPER),
                loss="soft_l1",
                f_scale=f_scale,
                x_scale="jac",
            )
        except (ValueError, FloatingPointError):
            continue
        if np.all(np.isfinite(res.x)) and res.cost < best_cost:
            best, best_cost = _onto_bounds(res.x), float(res.cost)
    return best


def _bootstrap(
    dx: np.ndarray,
    err: np.ndarray,
    theta: np.ndarray,
    grid: list[tuple[float, float]],
    n_boot: int,
    f_scale: float,
    rng: np.random.Generator,
    x0: float,
) -> list[tuple[float, float, float]]:
    """Refit on ``n_boot`` resamples; resamples with < 3 distinct n cannot identify 3 parameters
    and are redrawn (bounded, so tiny data sets cannot loop forever)."""
    m = dx.size
    extra = grid[1 : 1 + _BOOT_EXTRA_STARTS] if len(grid) > 1 else grid
    out: list[tuple[float, float, float]] = []
    draws = 0
    while len(out) < n_boot and draws < 20 * n_boot:
        draws += 1
        idx = rng.integers(0, m, size=m)
        if np.unique(dx[idx]).size < MIN_DISTINCT_N:
            continue
        d, e = dx[idx], err[idx]
        starts = [np.clip(theta, _LOWER, _UPPER)] + [_initial_b(d, e, s) for s in extra]
        th = _best_fit(d, e, starts, f_scale)
        if th is not None:
            out.append(_to_natural(th, x0))
    return out


def _validate(n: Any, err: Any, label: str | None) -> tuple[np.ndarray, np.ndarray]:
    p = _prefix(label)
    try:
        n_arr = np.asarray(n, dtype=float).ravel()
        err_arr = np.asarray(err, dtype=float).ravel()
    except (TypeError, ValueError) as exc:
        raise FitError(f"{p}points are not numbers: {exc}") from None
    if n_arr.size != err_arr.size:
        raise FitError(f"{p}got {n_arr.size} pool sizes but {err_arr.size} error values")
    distinct = int(np.unique(n_arr).size)
    if n_arr.size < MIN_POINTS or distinct < MIN_DISTINCT_N:
        raise FitError(
            f"{p}scaling-law fit needs at least {MIN_POINTS} points at {MIN_DISTINCT_N} distinct pool sizes; "
            f"got {n_arr.size} points at {distinct} distinct pool sizes"
        )
    bad_n = ~(np.isfinite(n_arr) & (n_arr > 0))
    if bad_n.any():
        raise FitError(f"{p}pool sizes must be positive and finite; got {_bad(n_arr, bad_n)}")
    bad_e = ~((err_arr >= 0.0) & (err_arr <= 1.0))
    if bad_e.any():
        raise FitError(f"{p}accuracies must lie in [0, 1]; got accuracy {_bad(1.0 - err_arr, bad_e)}")
    return n_arr, err_arr


def _as_columns(pts: Any, label: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.asarray(list(pts), dtype=float).reshape(-1, 2)
    except (TypeError, ValueError):
        raise FitError(f"{_prefix(label)}points must be (n, accuracy) pairs") from None
    return arr[:, 0], arr[:, 1]


def _prefix(label: str | None) -> str:
    return f"strategy {label!r}: " if label else ""


def _bad(values: np.ndarray, mask: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in values[mask][:3])
    more = int(mask.sum()) - 3
    return shown + (f" (and {more} more)" if more > 0 else "")
