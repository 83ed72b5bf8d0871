"""Tests for dp_ops.studies.scaling: fit recovery, intervals, inverses, hand-computed multipliers, plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dp_ops.errors import FitError
from dp_ops.studies.scaling import (
    PowerLawFit,
    _interval,
    data_multiplier,
    fit_power_law,
    fit_strategies,
    interpolate_samples_for_accuracy,
    plot_scaling,
)

TRUE_A, TRUE_ALPHA, TRUE_C = 2.0, 0.5, 0.05
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _synthetic(seed: int = 0, sd: float = 0.003, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = np.geomspace(100, 100_000, size)
    err = TRUE_C + TRUE_A * n**-TRUE_ALPHA + rng.normal(0.0, sd, size)
    return n, err


def _hand_fit() -> PowerLawFit:
    return PowerLawFit(
        a=TRUE_A,
        alpha=TRUE_ALPHA,
        c=TRUE_C,
        a_ci=(1.5, 2.5),
        alpha_ci=(0.4, 0.6),
        c_ci=(0.04, 0.06),
        n_points=12,
        rmse=0.0,
    )


@pytest.fixture(scope="module")
def noisy_fit() -> PowerLawFit:
    n, err = _synthetic()
    return fit_power_law(n, err, n_boot=100, seed=1, label="static")


def test_recovers_known_law(noisy_fit: PowerLawFit) -> None:
    assert noisy_fit.a == pytest.approx(TRUE_A, rel=0.15)
    assert noisy_fit.alpha == pytest.approx(TRUE_ALPHA, abs=0.05)
    assert noisy_fit.c == pytest.approx(TRUE_C, abs=0.005)
    assert noisy_fit.n_points == 12
    assert 0.0005 < noisy_fit.rmse < 0.006  # about the noise sd, not a perfect (overfitted) zero


def test_bootstrap_intervals_contain_truth_and_estimate(noisy_fit: PowerLawFit) -> None:
    assert len(noisy_fit.boot) == 100
    for (lo, hi), est, true in [
        (noisy_fit.a_ci, noisy_fit.a, TRUE_A),
        (noisy_fit.alpha_ci, noisy_fit.alpha, TRUE_ALPHA),
        (noisy_fit.c_ci, noisy_fit.c, TRUE_C),
    ]:
        assert lo < hi
        assert lo <= true <= hi
        assert lo <= est <= hi


def test_an_estimate_on_the_floor_is_zero_and_inside_its_interval() -> None:
    """A floor fitted on the bound c = 0 is exactly 0, inside its own 95% interval (not c = 9.6e-22 [7.3e-18,
    0.026]: the point fit and the refits each a different hair above the bound, the estimate outside)."""
    n = np.array([500, 1000, 2000, 4000] * 2, dtype=float)
    err = 2.0 * n**-0.5 + np.random.default_rng(0).normal(0.0, 0.006, n.size)  # no floor: c = 0
    fit = fit_power_law(n, err, n_boot=30, seed=0)
    assert fit.c == 0.0 and fit.c_ci[0] == 0.0 < fit.c_ci[1]
    for est, (lo, hi) in [(fit.a, fit.a_ci), (fit.alpha, fit.alpha_ci), (fit.c, fit.c_ci)]:
        assert lo <= est <= hi


def test_an_interval_reaches_to_an_estimate_the_refits_all_miss() -> None:
    draws = np.linspace(0.3, 0.9, 200)  # every refit above the estimate (another optimum, a bound)
    assert _interval(draws, 0.1) == (0.1, pytest.approx(np.percentile(draws, 97.5)))
    assert _interval(draws, 0.95) == (pytest.approx(np.percentile(draws, 2.5)), 0.95)
    assert _interval(draws, 0.5) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])))  # inside: percentiles


def test_exact_data_is_fitted_exactly() -> None:
    n = np.geomspace(100, 100_000, 8)
    fit = fit_power_law(n, TRUE_C + TRUE_A * n**-TRUE_ALPHA, n_boot=0)
    assert (fit.a, fit.alpha, fit.c) == pytest.approx((TRUE_A, TRUE_ALPHA, TRUE_C), rel=1e-4)
    assert fit.rmse < 1e-6
    assert all(math.isnan(v) for v in fit.a_ci)  # no bootstrap, no interval
    assert fit.to_dict()["a_ci"] == [None, None]


def test_robust_to_one_outlier() -> None:
    n, err = _synthetic(seed=2, sd=0.002)
    err[5] += 0.15  # one diverged run
    fit = fit_power_law(n, err, n_boot=0)
    assert fit.alpha == pytest.approx(TRUE_ALPHA, abs=0.05)
    assert fit.c == pytest.approx(TRUE_C, abs=0.006)


def test_bootstrap_is_reproducible_from_seed() -> None:
    n, err = _synthetic(seed=3)
    one = fit_power_law(n, err, n_boot=10, seed=7)
    two = fit_power_law(n, err, n_boot=10, seed=np.random.default_rng(7))
    other = fit_power_law(n, err, n_boot=10, seed=8)
    assert one.boot == two.boot
    assert one.boot != other.boot


@pytest.mark.parametrize(
    ("n", "err", "fragment"),
    [
        ([100, 1000, 10000], [0.3, 0.2, 0.1], "got 3 points at 3 distinct"),
        ([100, 100, 1000, 1000], [0.3, 0.3, 0.2, 0.2], "got 4 points at 2 distinct"),
        ([], [], "got 0 points"),
    ],
)
def test_too_few_points_raises_with_counts(n: list[float], err: list[float], fragment: str) -> None:
    with pytest.raises(FitError, match=fragment) as info:
        fit_power_law(n, err, label="oversample")
    msg = str(info.value)
    assert "'oversample'" in msg
    assert "at least 4 points at 3 distinct" in msg
    assert "\n" not in msg


def test_non_positive_n_and_bad_accuracy_raise() -> None:
    with pytest.raises(FitError, match=r"strategy 'dp': pool sizes must be positive.*got 0"):
        fit_power_law([0, 10, 100, 1000], [0.5, 0.4, 0.3, 0.2], label="dp")
    with pytest.raises(FitError, match=r"accuracies must lie in \[0, 1\]; got accuracy -0.2"):
        fit_power_law([10, 100, 1000, 10000], [0.5, 1.2, 0.3, 0.2])
    with pytest.raises(FitError, match=r"strategy 'static'.*accuracies must lie in \[0, 1\]"):
        fit_strategies({"static": [(10, 0.5), (100, 0.6), (1000, 1.5), (10000, 0.8)]})


def test_samples_for_accuracy_inverts_accuracy(noisy_fit: PowerLawFit) -> None:
    for n in [50.0, 1_234.0, 40_000.0, 3e6]:
        assert noisy_fit.samples_for_accuracy(noisy_fit.accuracy(n)) == pytest.approx(n, rel=1e-9)
    # hand-computed: error 0.1 = 0.05 + 2 n^-0.5  =>  n = (2 / 0.05)^2 = 1600
    assert _hand_fit().samples_for_accuracy(0.9) == pytest.approx(1600.0, rel=1e-12)
    assert _hand_fit().accuracy(1600.0) == pytest.approx(0.9, rel=1e-12)


def test_unreachable_accuracy_is_inf() -> None:
    fit = _hand_fit()  # ceiling: 1 - c = 0.95
    assert fit.samples_for_accuracy(0.95) == math.inf
    assert fit.samples_for_accuracy(0.99) == math.inf
    assert math.isfinite(fit.samples_for_accuracy(0.949))
    assert data_multiplier(fit, 1000, 0.96) == math.inf


def test_interpolation_hand_values() -> None:
    n = [100, 1000, 10000]
    acc = [0.5, 0.7, 0.9]
    # 0.8 is half-way between 0.7 and 0.9 -> half-way in log n between 1e3 and 1e4
    assert interpolate_samples_for_accuracy(n, acc, 0.8) == pytest.approx(10**3.5, rel=1e-12)
    assert interpolate_samples_for_accuracy(n, acc, 0.7) == pytest.approx(1000.0, rel=1e-12)
    assert interpolate_samples_for_accuracy(n, acc, 0.4) == 100.0  # reached by the smallest pool
    assert interpolate_samples_for_accuracy(n, acc, 0.95) == math.inf


def test_interpolation_uses_running_max_and_sorts() -> None:
    n = [100_000, 100, 10_000, 1_000]  # unsorted on purpose
    acc = [0.9, 0.5, 0.7, 0.8]  # sorted by n: 0.5, 0.8, 0.7, 0.9 -> running max 0.5, 0.8, 0.8, 0.9
    # 0.85 lies between the running max 0.8 (at 1e4, not 1e3) and 0.9 (at 1e5)
    assert interpolate_samples_for_accuracy(n, acc, 0.85) == pytest.approx(10**4.5, rel=1e-12)
    # 0.75 is 5/6 of the way from 0.5 to 0.8 -> 10^(2 + 5/6)
    assert interpolate_samples_for_accuracy(n, acc, 0.75) == pytest.approx(10 ** (2 + 5 / 6), rel=1e-12)


def test_data_multiplier_hand_values() -> None:
    static = [(100, 0.5), (1000, 0.7), (10000, 0.9)]
    assert data_multiplier(static, 1000, 0.8) == pytest.approx(10**0.5, rel=1e-12)
    assert data_multiplier(static, 500, 0.7) == pytest.approx(2.0, rel=1e-12)
    assert data_multiplier(static, 1000, 0.91) == math.inf
    assert data_multiplier(_hand_fit(), 400, 0.9) == pytest.approx(4.0, rel=1e-12)  # 1600 / 400
    with pytest.raises(FitError, match="positive"):
        data_multiplier(static, 0, 0.8)


def test_fit_strategies_and_to_dict_is_json() -> None:
    n, err = _synthetic(seed=4)
    slow = 0.10 + 1.0 * n**-0.3
    points = {
        "dp": [(float(k), float(1 - e)) for k, e in zip(n, err, strict=True)],
        "static": [(float(k), float(1 - e)) for k, e in zip(n, slow, strict=True)],
    }
    fits = fit_strategies(points, n_boot=5, seed=0)
    assert list(fits) == ["dp", "static"]
    assert fits["static"].label == "static"
    assert fits["static"].alpha == pytest.approx(0.3, abs=1e-3)
    assert fits["static"].c == pytest.approx(0.10, abs=1e-3)
    d = json.loads(json.dumps(fits["dp"].to_dict()))
    assert d["label"] == "dp"
    assert d["n_points"] == 12
    assert d["n_boot"] == 5
    assert d["alpha"] == pytest.approx(fits["dp"].alpha)
    assert len(d["alpha_ci"]) == 2
    assert "boot" not in d


def test_plot_writes_png(tmp_path, noisy_fit: PowerLawFit) -> None:
    n, err = _synthetic()
    points = {"static": [(float(k), float(1 - e)) for k, e in zip(n, err, strict=True)], "dp": [(1000.0, 0.9)]}
    out = plot_scaling(points, {"static": noisy_fit}, tmp_path / "sub" / "scaling.png", targets=[0.9], title="t")
    assert out == tmp_path / "sub" / "scaling.png"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000  # a real figure, not an empty canvas
