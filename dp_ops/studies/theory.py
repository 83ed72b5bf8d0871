r"""Asymptotic theory of Deliberate Practice's toy model: ridge on a pruned Gaussian pool.

Setting (Askari-Hemmat et al., ICML 2025, arXiv 2502.15588, Section 4)
-----------------------------------------------------------------------
* data ``x ~ N(0, I_d)``, labels ``y = sign(w0ᵀx)``;
* a selector ``w_s`` with ``‖w0‖ = ‖w_s‖ = 1`` and ``w0ᵀw_s = ρ``; write ``s = xᵀw_s``;
* **keep hard** keeps the points with ``|s| ≤ ξ``, **keep easy** those with ``|s| ≥ ξ``; the kept
  fraction ``p`` fixes ``ξ`` (hard: ``p = 2Φ(ξ) − 1``; easy: ``p = 2(1 − Φ(ξ))``); **keep all** is
  ``p = 1`` (no selection);
* the learner is ridge on the ``n`` kept points,
  ``ŵ = (XᵀX/n + λI)⁻¹ Xᵀy/n``, with ``d/n → φ``. The paper normalises by the *pool* size ``n/p``
  instead; its ``(φ_paper, λ_paper)`` are ``(p·φ, p·λ)`` here, for the very same ``ŵ`` (below):
  ``λ = λ_paper/p`` (:func:`lam_from_paper`; the curves take ``lam_paper=`` and convert per point);
* test error on fresh *unpruned* data: ``err = arccos(m0/√ν0)/π`` with ``m0 = w0ᵀŵ`` and
  ``ν0 = ‖ŵ‖²`` (the angle between ``ŵ`` and ``w0``, over π). ``m0 ≥ 0`` in the limit for every
  setting, so this equals the ``arccos(|m0|/√ν0)/π`` form; we keep the sign because it is the error
  of the classifier ``sign(ŵᵀx)`` itself.

The paper's Theorem 1 and this derivation: the same limit
---------------------------------------------------------
:func:`paper_overlaps` is Theorem 1 as printed (the last term of ``ν0`` read as ``2φm′r/(1+φm)``;
the camera-ready's ``2φm′/(1+φmr)`` is a typo). Its ridge ``(XᵀDX/N + λ_p I)⁻¹XᵀDY/N`` on the pool of
``N = n/p`` points, ``D = diag(q)``, is *exactly* ridge on the ``n`` kept points with ``λ = λ_p/p``
(``XᵀDX/N = p·X_keptᵀX_kept/n``), so ``ŵ`` is one vector and ``φ = φ_p/p``, ``λ = λ_p/p``. With
``k = 1 + φ_p·m = 1 + φ·m_MP`` (one number in both variables; ``m_MP`` is the ``m`` below), term by term:

====================================  ============================================================
paper (pool-normalised)               here (kept-normalised)
====================================  ============================================================
``γ, β, β̃``                          ``p·κ, p·B, p·A`` (over the pool, not given kept)
``m(−λ_p)``, ``m′(−λ_p)``             ``m_MP/p = k/(p(1+λ_eff))``, ``m′_MP/p²``
``m̃(−λ_p)``                          ``k/(p(κ+λ_eff))`` (``m̃`` is ``m`` for the ``w_s`` direction)
``βm``, ``β̃m̃``                      ``k·a_u``, ``k·a_s``
``r = β²m + β̃²m̃``                   ``p·k·(A a_s + B a_u)``
``r′``                                ``k²(a_s² + a_u²) + pφ_p m′·(κ a_s² + a_u²)``
``ν0 − r′ = pφ_p m′ − 2φ_p m′r/k``    ``k²‖b‖² − pφ_p m′·(κ a_s² + a_u²)``, as ``k²‖b‖² = pφ_p m′·σ_r²``
``m0``, ``ν0``                        ``k·m0``, ``k²·ν0``
====================================  ============================================================

So the theorem's ``m0``, ``ν0`` are the overlaps of ``k·ŵ``, not of ``ŵ`` (Monte Carlo of ``w0ᵀŵ``
and ``‖ŵ‖²`` matches the values here and is off by ``k``, ``k²`` from the theorem's); the factor
cancels in the angle, so the two test errors agree to rounding: ≤ 1e-14 over hard/easy/all, p down
to 0.1, φ_p and φ around and away from 1, λ_p ∈ {0.01, 0.1, 1}, ρ ∈ {0.9, 1}; 2e-8 at ρ = 1 − 1e-9,
where the quadrature of ``A`` (a near-step integrand) limits it. No regime differs. Both are checked
against Monte Carlo in ``tests/studies/test_theory.py``.

Derivation (sketch)
-------------------
Let ``u`` be the unit vector with ``w0 = ρ w_s + σ u``, ``σ = √(1−ρ²)``, and ``g = xᵀu``. Then
``y = sign(ρ s + σ g)`` depends on ``x`` only through ``z = (s, g)``; the selection depends only on
``s``. Conditionally on being kept, ``s`` has the truncated law, and ``g`` and the other ``d − 2``
coordinates ``x⊥`` stay i.i.d. ``N(0, 1)``, independent of ``(s, y)``. Hence the kept covariance is
``Σ = I + (κ − 1) w_s w_sᵀ`` and ``E[y x] = A w_s + B u`` with

* ``κ = E[s² | kept]``,
* ``A = E[s·y | kept] = E[s·erf(ρ s /(σ√2)) | kept]``,
* ``B = E[g·y | kept] = 2 E[φ_N(ρ s/σ) | kept]`` (``φ_N`` the standard normal density).

Split ``ŵ = (a, b)`` into its ``z``-part ``a ∈ R²`` and its ``x⊥``-part ``b``. For fixed ``a`` the
problem in ``b`` is ridge with an isotropic Gaussian design ``X⊥`` and a response
``ε = y − Z a`` independent of ``X⊥``; profiling ``b`` out leaves
``(λ/2n)·εᵀ(X⊥X⊥ᵀ/n + λ)⁻¹ε + (λ/2)‖a‖²``. By rotational invariance the quadratic forms concentrate:
``vᵀ(X⊥X⊥ᵀ/n + λ)⁻¹w/n → τ·E[v w]`` for ``v, w`` independent of ``X⊥``, where ``τ`` is the companion
Stieltjes transform. Minimising the limit over ``a`` and evaluating ``‖b‖²`` gives

* ``m``: Stieltjes transform of the Marchenko–Pastur law of ratio φ at ``−λ``, the positive root of
  ``φλm² + (1 − φ + λ)m − 1 = 0``, i.e. ``m = ∫ dμ_MP(t)/(t + λ)``; ``m′ = ∫ dμ_MP(t)/(t + λ)²
  = m²(1 + φm)/(1 + φλm²)``;
* effective regularisation ``λ_eff = 1/τ = λ(1 + φm)``;
* ``a_s = A/(κ + λ_eff)``, ``a_u = B/(1 + λ_eff)`` (population ridge in the two special directions
  with the inflated penalty);
* residual variance ``σ_r² = E[(y − zᵀa)² | kept] = 1 − 2(A a_s + B a_u) + κ a_s² + a_u²``;
* ``‖b‖² = σ_r²·φ·(m − λm′) = σ_r²·φ·m²/((1 + φm)(1 + φλm²))`` (the residual, which is *not*
  a linear function of ``x``, acts as label noise on the bulk directions);

and finally ``m0 = ρ a_s + σ a_u`` and ``ν0 = a_s² + a_u² + ‖b‖²``.

Sanity limits: ``φ → 0`` gives population ridge ``(Σ + λI)⁻¹E[yx]`` (``λ_eff → λ``, ``‖b‖ → 0``);
``p = 1`` gives ``κ = 1``, ``A = ρ√(2/π)``, ``B = σ√(2/π)``, i.e. ``E[yx] = √(2/π) w0``.

Monte Carlo (:func:`monte_carlo_error`) uses ``w_s = e1``, ``w0 = ρe1 + σe2`` (no loss of generality,
``x`` is isotropic), draws only the two relevant coordinates for the whole pool of ``⌈n/p⌉`` points,
keeps exactly the ``n`` points of smallest (hard) or largest (easy) ``|s|``, then draws the other
``d − 2`` coordinates for the kept points only (they are independent of selection and label, so this
is exact, and it keeps memory at ``n·d`` however small ``p`` is).

Finite-size behaviour (measured at d = 64…1024): no systematic bias was found (differences within ~2
standard errors), but the run-to-run spread grows where the kept variance along ``w_s`` is tiny
(small ``p`` with small ``λ``: per-draw sd ≈ 0.03 at d = 256, ratio 8, λ = 0.01) and near the
interpolation threshold ``φ ≈ 1`` with ``λ → 0``; use more repetitions there.

Everything is pure numpy/scipy, deterministic given ``seed``, and silent (no logging, no printing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from scipy import integrate, special

from dp_ops.errors import ConfigError

Keep = Literal["hard", "easy", "all"]
_KEEPS = ("hard", "easy", "all")
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

__all__ = [
    "MonteCarloResult",
    "Overlaps",
    "PaperOverlaps",
    "SelectionMoments",
    "TheoryPoint",
    "kept_size_curve",
    "lam_from_paper",
    "monte_carlo_error",
    "mp_stieltjes",
    "oversampling_curve",
    "paper_error",
    "paper_overlaps",
    "plot_theory",
    "selection_moments",
    "theory_error",
    "theory_overlaps",
]


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonteCarloResult:
    """Test error over ``reps`` independent draws: mean and sample standard deviation (ddof=1)."""

    mean: float
    sd: float
    reps: int

    @property
    def se(self) -> float:
        """Standard error of ``mean``."""
        return self.sd / math.sqrt(self.reps) if self.reps > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "sd": self.sd, "se": self.se, "reps": self.reps}


@dataclass(frozen=True)
class SelectionMoments:
    """Moments of the kept distribution: ``ξ``, ``κ = E[s²]``, ``A = E[s y]``, ``B = E[g y]``."""

    xi: float
    kappa: float
    a: float
    b: float


@dataclass(frozen=True)
class Overlaps:
    """Deterministic equivalents of ``m0 = w0ᵀŵ`` and ``ν0 = ‖ŵ‖²`` (and the test error)."""

    m0: float
    nu0: float
    error: float


@dataclass(frozen=True)
class PaperOverlaps:
    """Theorem 1's quantities at ``z = −λ_p``, in the paper's variables (``φ_p = d/N``, ``N`` the pool).

    ``m0`` and ``ν0`` are the overlaps of ``(1 + φ_p·m)·ŵ`` (module docstring); ``error`` is the angle's.
    """

    gamma: float
    beta: float
    beta_tilde: float
    m: float
    m_prime: float
    m_tilde: float
    m_tilde_prime: float
    r: float
    r_prime: float
    m0: float
    nu0: float
    error: float


@dataclass(frozen=True)
class TheoryPoint:
    """One point of a theory curve, with its Monte Carlo check (``mc`` is None when not run).

    ``curve`` is ``"kept_size"`` (x = ``n``) or ``"oversampling"`` (x = ``ratio = 1/p``). ``lam`` is the
    kept-normalised penalty used; ``lam_paper`` the paper's pool-normalised one when the curve held that
    fixed (then ``lam = lam_paper/p``), None when it held ``lam`` fixed.
    """

    curve: str
    keep: str
    d: int
    n: int
    p: float
    rho: float
    lam: float
    theory_error: float
    mc: MonteCarloResult | None = None
    lam_paper: float | None = None

    @property
    def phi(self) -> float:
        return self.d / self.n

    @property
    def ratio(self) -> float:
        return 1.0 / self.p

    @property
    def pool_size(self) -> int:
        return _pool_size(self.n, self.p)

    @property
    def theory_accuracy(self) -> float:
        return 1.0 - self.theory_error

    @property
    def mc_accuracy(self) -> float | None:
        return None if self.mc is None else 1.0 - self.mc.mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "curve": self.curve,
            "keep": self.keep,
            "d": self.d,
            "n": self.n,
            "pool_size": self.pool_size,
            "p": self.p,
            "ratio": self.ratio,
            "phi": self.phi,
            "rho": self.rho,
            "lam": self.lam,
            "lam_paper": self.lam_paper,
            "theory_error": self.theory_error,
            "theory_accuracy": self.theory_accuracy,
            "mc_error_mean": None if self.mc is None else self.mc.mean,
            "mc_error_sd": None if self.mc is None else self.mc.sd,
            "mc_error_se": None if self.mc is None else self.mc.se,
            "mc_reps": 0 if self.mc is None else self.mc.reps,
            "mc_accuracy": self.mc_accuracy,
        }


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not allowed: must be a real number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not allowed: must be a real number") from None
    if not math.isfinite(out):
        raise ConfigError(f"{name}={value!r} is not allowed: must be finite")
    return out


def _check_p(p: Any) -> float:
    v = _as_float("p", p)
    if not 0.0 < v <= 1.0:
        raise ConfigError(f"p={p!r} is not allowed: the kept fraction must be in (0, 1]")
    return v


def _check_rho(rho: Any) -> float:
    v = _as_float("rho", rho)
    if not -1.0 <= v <= 1.0:
        raise ConfigError(f"rho={rho!r} is not allowed: the alignment must be in [-1, 1]")
    return v


def _check_lam(lam: Any, name: str = "lam") -> float:
    v = _as_float(name, lam)
    if not v > 0.0:
        raise ConfigError(f"{name}={lam!r} is not allowed: the ridge penalty must be > 0")
    return v


def _check_phi(phi: Any) -> float:
    v = _as_float("phi", phi)
    if not v > 0.0:
        raise ConfigError(f"phi={phi!r} is not allowed: the ratio d/n must be > 0")
    return v


def _check_keep(keep: Any) -> Keep:
    if keep not in _KEEPS:
        raise ConfigError(f"keep={keep!r} is not allowed: must be one of 'hard', 'easy', 'all'")
    return cast(Keep, keep)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name}={value!r} is not allowed: must be an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(f"{name}={value!r} is not allowed: must be an integer >= {minimum}")
    return int(value)


def _pool_size(n: int, p: float) -> int:
    # ceil(n/p) robust to float noise (512/0.2 = 2560.0000000000005 must give 2560)
    return max(n, math.ceil(n / p - 1e-9 * (n / p)))


# --------------------------------------------------------------------------------------------------
# theory
# --------------------------------------------------------------------------------------------------


def mp_stieltjes(phi: float, lam: float) -> tuple[float, float]:
    """``(m, m′)``: Stieltjes transform of the MP law (ratio ``phi``) at ``−lam`` and its derivative.

    ``m = ∫ dμ(t)/(t+λ)`` is the positive root of ``φλm² + (1−φ+λ)m − 1 = 0``;
    ``m′ = ∫ dμ(t)/(t+λ)² = m²(1+φm)/(1+φλm²)``.
    """
    phi = _check_phi(phi)
    lam = _check_lam(lam)
    c = 1.0 - phi + lam
    disc = math.sqrt(c * c + 4.0 * phi * lam)
    # pick the cancellation-free form of the positive root
    m = 2.0 / (c + disc) if c >= 0 else (disc - c) / (2.0 * phi * lam)
    m_prime = m * m * (1.0 + phi * m) / (1.0 + phi * lam * m * m)
    return m, m_prime


def _xi(p: float, keep: str) -> float:
    """Threshold on ``|s|``: hard keeps ``|s| ≤ ξ`` (P = p), easy keeps ``|s| ≥ ξ`` (P = p)."""
    if keep == "all" or (keep == "hard" and p >= 1.0):
        return math.inf
    if keep == "easy" and p >= 1.0:
        return 0.0
    # P(|s| ≤ ξ) = gammainc(1/2, ξ²/2): accurate for tiny and near-one p alike
    if keep == "hard":
        return math.sqrt(2.0 * special.gammaincinv(0.5, p))
    return math.sqrt(2.0 * special.gammainccinv(0.5, p))


def _phi_ratio(x: float, sigma: float) -> float:
    """``Φ(x/σ)`` for ``x ≥ 0`` with the limits ``x = 0 → 1/2`` and ``σ = 0, x > 0 → 1``."""
    if x == 0.0:
        return 0.5
    if sigma == 0.0 or math.isinf(x):
        return 1.0
    return float(special.ndtr(x / sigma))


def selection_moments(*, p: float, rho: float, keep: Keep = "hard") -> SelectionMoments:
    """``ξ``, ``κ = E[s²|kept]``, ``A = E[s y|kept]``, ``B = E[g y|kept]`` (see module docstring)."""
    keep = _check_keep(keep)
    p = 1.0 if keep == "all" else _check_p(p)
    rho = _check_rho(rho)
    sigma = math.sqrt(max(0.0, 1.0 - rho * rho))
    xi = _xi(p, keep)
    if p >= 1.0:  # no selection, whatever the rule
        lo, hi, s2, mass = 0.0, math.inf, 1.0, 1.0
    elif keep == "easy":
        lo, hi = xi, math.inf
        # E[s² 1{|s| ≥ ξ}] = P(χ²₃ ≥ ξ²)
        s2 = float(special.gammaincc(1.5, xi * xi / 2.0))
        mass = float(special.gammaincc(0.5, xi * xi / 2.0))
    else:
        lo, hi = 0.0, xi
        s2 = float(special.gammainc(1.5, xi * xi / 2.0))
        mass = float(special.gammainc(0.5, xi * xi / 2.0))
    kappa = s2 / mass

    # A = (2/p) ∫_lo^hi s·erf(ρ s/(σ√2))·φ(s) ds   (symmetry in s ↦ −s)
    if sigma == 0.0:
        sgn = math.copysign(1.0, rho)
        # ∫ s φ(s) ds = φ(lo) − φ(hi)
        tail = 0.0 if math.isinf(hi) else math.exp(-hi * hi / 2.0)
        half_a = sgn * _INV_SQRT_2PI * (math.exp(-lo * lo / 2.0) - tail)
    elif rho == 0.0:
        half_a = 0.0
    else:

        def integrand(s: float) -> float:
            return s * math.erf(rho * s / (sigma * math.sqrt(2.0))) * _INV_SQRT_2PI * math.exp(-s * s / 2.0)

        half_a = integrate.quad(integrand, lo, hi, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
    a = 2.0 * half_a / mass
    # B = (2/p) ∫_lo^hi 2 φ(ρ s/σ) φ(s) ds = (4σ/(p√(2π))) (Φ(hi/σ) − Φ(lo/σ))
    b = 4.0 * sigma * _INV_SQRT_2PI * (_phi_ratio(hi, sigma) - _phi_ratio(lo, sigma)) / mass
    return SelectionMoments(xi=xi, kappa=kappa, a=a, b=b)


def theory_overlaps(*, phi: float, p: float, rho: float, lam: float, keep: Keep = "hard") -> Overlaps:
    """Deterministic equivalents ``m0``, ``ν0`` of ridge on the pruned pool and the test error."""
    keep = _check_keep(keep)
    phi = _check_phi(phi)
    p = _check_p(p)
    rho = _check_rho(rho)
    lam = _check_lam(lam)
    sigma = math.sqrt(max(0.0, 1.0 - rho * rho))
    mom = selection_moments(p=p, rho=rho, keep=keep)
    m, _ = mp_stieltjes(phi, lam)
    lam_eff = lam * (1.0 + phi * m)
    a_s = mom.a / (mom.kappa + lam_eff)
    a_u = mom.b / (1.0 + lam_eff)
    resid = 1.0 - 2.0 * (mom.a * a_s + mom.b * a_u) + mom.kappa * a_s * a_s + a_u * a_u
    bulk = max(resid, 0.0) * phi * m * m / ((1.0 + phi * m) * (1.0 + phi * lam * m * m))
    m0 = rho * a_s + sigma * a_u
    nu0 = a_s * a_s + a_u * a_u + bulk
    return Overlaps(m0=m0, nu0=nu0, error=_angle_error(m0, nu0))


def _angle_error(m0: float, nu0: float) -> float:
    if nu0 <= 0.0:
        return 0.5
    cos = max(-1.0, min(1.0, m0 / math.sqrt(nu0)))
    return math.acos(cos) / math.pi


def theory_error(*, phi: float, p: float, rho: float, lam: float, keep: Keep = "hard") -> float:
    """Asymptotic test error (on unpruned data) of ridge trained on the kept points.

    ``phi = d/n`` with ``n`` the number of KEPT points; ``keep="all"`` ignores ``p`` (no selection),
    though ``p`` must still be a valid fraction.
    """
    return theory_overlaps(phi=phi, p=p, rho=rho, lam=lam, keep=keep).error


# --------------------------------------------------------------------------------------------------
# the paper's Theorem 1, as printed (pool-normalised variables)
# --------------------------------------------------------------------------------------------------


def lam_from_paper(lam_paper: float, p: float) -> float:
    """The kept-normalised ``λ`` of this module for the paper's pool-normalised ``λ_p``: ``λ_p/p``.

    ``(XᵀDX/N + λ_p I)⁻¹XᵀDY/N = (X_keptᵀX_kept/n + (λ_p/p) I)⁻¹X_keptᵀy/n`` with ``n = p·N``: the same
    ``ŵ``. Likewise ``φ = d/n = φ_p/p``.
    """
    return _check_lam(lam_paper, "lam_paper") / _check_p(p)


def _paper_moments(p: float, rho: float, keep: Keep) -> tuple[float, float, float]:
    """``γ = E[qG²]``, ``β = 2E[qφ(τG)]``, ``β̃ = 2E[qΦ(τG)G]`` (over the pool; ``τ = ρ/σ``), closed form."""
    sigma = math.sqrt(max(0.0, 1.0 - rho * rho))
    xi = _xi(p, keep)
    if keep == "all" or p >= 1.0:
        lo, hi, gamma = 0.0, math.inf, 1.0
    elif keep == "hard":  # γ = p − 2ξφ(ξ), without its cancellation at small p
        lo, hi, gamma = 0.0, xi, float(special.gammainc(1.5, xi * xi / 2.0))
    else:  # γ = p + 2ξφ(ξ)
        lo, hi, gamma = xi, math.inf, float(special.gammaincc(1.5, xi * xi / 2.0))
    # q is even: integrate over G ≥ 0 and double; ∫φ(τg)φ(g)dg = σ/√(2π)·Φ(g/σ) as 1 + τ² = 1/σ²
    band = _phi_ratio(hi, sigma) - _phi_ratio(lo, sigma)
    beta = 4.0 * sigma * _INV_SQRT_2PI * band

    def edge(g: float) -> float:  # φ(g)·h(g), h = 2Φ(τg) − 1
        if math.isinf(g):
            return 0.0
        h = math.copysign(2.0 * _phi_ratio(abs(rho) * g, sigma) - 1.0, rho)
        return _INV_SQRT_2PI * math.exp(-g * g / 2.0) * h

    # β̃ = E[qG·h(G)] (E[qG] = 0); by parts with h′ = 2τφ(τG) and τσ = ρ
    beta_tilde = 2.0 * (edge(lo) - edge(hi)) + 4.0 * rho * _INV_SQRT_2PI * band
    return gamma, beta, beta_tilde


def paper_overlaps(*, phi: float, p: float, rho: float, lam: float, keep: Keep = "hard") -> PaperOverlaps:
    """Theorem 1 as printed (camera-ready typo in ``ν0`` corrected, module docstring), at ``z = −λ``.

    ``phi = d/N`` and ``lam`` are the paper's, normalised by the POOL size ``N`` (kept ``n = p·N``):
    the same limit as :func:`theory_overlaps` at ``phi/p`` and ``lam/p``. ``keep="all"`` means ``p = 1``.
    """
    keep = _check_keep(keep)
    phi = _check_phi(phi)
    p = 1.0 if keep == "all" else _check_p(p)
    rho = _check_rho(rho)
    lam = _check_lam(lam)
    gamma, beta, beta_t = _paper_moments(p, rho, keep)
    # m(z) = (p−φ−z−√((p−φ−z)²−4φz))/(2φz) at z = −λ, in its cancellation-free form
    c = p - phi + lam
    disc = math.sqrt(c * c + 4.0 * phi * lam)
    m = 2.0 / (c + disc) if c >= 0 else (disc - c) / (2.0 * phi * lam)
    m_p = (phi * m * m + m) / (c + 2.0 * phi * lam * m)
    k = 1.0 + phi * m
    m_t = 1.0 / (gamma / k + lam)
    m_tp = m_t * m_t * (1.0 + gamma * phi * m_p / (k * k))
    r = beta * beta * m + beta_t * beta_t * m_t
    r_p = beta * beta * m_p + beta_t * beta_t * m_tp
    m0 = math.sqrt(max(0.0, 1.0 - rho * rho)) * beta * m + rho * beta_t * m_t
    nu0 = p * phi * m_p + r_p - 2.0 * phi * m_p * r / k
    err = _angle_error(abs(m0), nu0)
    return PaperOverlaps(gamma, beta, beta_t, m, m_p, m_t, m_tp, r, r_p, m0, nu0, err)


def paper_error(*, phi: float, p: float, rho: float, lam: float, keep: Keep = "hard") -> float:
    """Theorem 1's test error ``arccos(|m0|/√ν0)/π``, in the paper's pool-normalised ``phi`` and ``lam``."""
    return paper_overlaps(phi=phi, p=p, rho=rho, lam=lam, keep=keep).error


# --------------------------------------------------------------------------------------------------
# Monte Carlo
# --------------------------------------------------------------------------------------------------


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} is not allowed: must be an integer >= 0 or a numpy Generator")
    return np.random.default_rng(int(seed))


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    n, d = x.shape
    if n >= d:
        gram = x.T @ x / n
        gram[np.diag_indices_from(gram)] += lam
        return np.linalg.solve(gram, x.T @ y / n)
    # dual form, cheaper when n < d: ŵ = Xᵀ(XXᵀ/n + λI)⁻¹ y/n
    kern = x @ x.T / n
    kern[np.diag_indices_from(kern)] += lam
    return x.T @ np.linalg.solve(kern, y / n)


def _one_draw(
    rng: np.random.Generator, d: int, n: int, p: float, rho: float, lam: float, keep: str, n_test: int | None
) -> float:
    sigma = math.sqrt(max(0.0, 1.0 - rho * rho))
    pool = n if keep == "all" else _pool_size(n, p)
    z = rng.standard_normal((pool, 2))  # coordinates along w_s = e1 and u = e2
    if pool > n:
        score = np.abs(z[:, 0])
        # keep-hard: the n smallest margins |t|; keep-easy: the n largest
        idx = np.argpartition(score, n - 1)[:n] if keep == "hard" else np.argpartition(score, pool - n)[pool - n :]
        z = z[idx]
    x = np.empty((n, d))
    x[:, :2] = z
    x[:, 2:] = rng.standard_normal((n, d - 2))
    y = np.sign(rho * z[:, 0] + sigma * z[:, 1])
    y[y == 0] = 1.0
    w = _ridge(x, y, lam)
    if n_test is None:
        m0 = rho * w[0] + sigma * w[1]
        return _angle_error(float(m0), float(w @ w))
    xt = rng.standard_normal((n_test, d))
    yt = np.sign(rho * xt[:, 0] + sigma * xt[:, 1])
    return float(np.mean(np.sign(xt @ w) != yt))


def monte_carlo_error(
    *,
    d: int,
    n: int,
    p: float,
    rho: float,
    lam: float,
    keep: Keep = "hard",
    n_test: int | None = None,
    reps: int = 20,
    seed: int | np.random.Generator = 0,
) -> MonteCarloResult:
    """Finite-size test error: pool of ``⌈n/p⌉`` Gaussian points, keep ``n`` by the rule, fit ridge.

    With ``n_test=None`` (default) the error of each fit is exact, ``arccos(w0ᵀŵ/‖ŵ‖)/π``; an integer
    ``n_test`` instead measures it on that many fresh unpruned test points (noisier; for checks).
    """
    d = _check_int("d", d, 3)
    n = _check_int("n", n, 1)
    keep = _check_keep(keep)
    p = _check_p(p)
    rho = _check_rho(rho)
    lam = _check_lam(lam)
    reps = _check_int("reps", reps, 1)
    if n_test is not None:
        n_test = _check_int("n_test", n_test, 1)
    rng = _rng(seed)
    errs = np.array([_one_draw(rng, d, n, p, rho, lam, keep, n_test) for _ in range(reps)])
    sd = float(errs.std(ddof=1)) if reps > 1 else float("nan")
    return MonteCarloResult(mean=float(errs.mean()), sd=sd, reps=reps)


# --------------------------------------------------------------------------------------------------
# curves and plot
# --------------------------------------------------------------------------------------------------


def _child_seeds(seed: int | np.random.Generator, count: int) -> list[np.random.Generator]:
    """Independent generators, one per curve point (so adding a point never shifts the others)."""
    if isinstance(seed, np.random.Generator):
        return list(seed.spawn(count))
    _rng(seed)  # validates
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(count)]


def _check_curve_lam(lam: Any, lam_paper: Any) -> tuple[float | None, float | None]:
    """Exactly one of ``lam`` (normalised by the kept size) and ``lam_paper`` (by the pool size)."""
    if (lam is None) == (lam_paper is None):
        raise ConfigError(
            f"lam={lam!r}, lam_paper={lam_paper!r} is not allowed: give exactly one "
            "(lam normalises the ridge by the kept size, lam_paper by the pool size as the paper does)"
        )
    if lam_paper is None:
        return _check_lam(lam), None
    return None, _check_lam(lam_paper, "lam_paper")


def _lam_at(lam: float | None, lam_paper: float | None, p: float) -> float:
    """The kept-normalised ``λ`` of a point of kept fraction ``p``: ``lam``, or ``lam_paper/p``."""
    return lam_from_paper(lam_paper, p) if lam_paper is not None else cast(float, lam)


def kept_size_curve(
    *,
    d: int,
    kept_sizes: Sequence[int],
    p: float,
    rho: float,
    lam: float | None = None,
    lam_paper: float | None = None,
    mc_reps: int,
    seed: int | np.random.Generator = 0,
) -> list[TheoryPoint]:
    """Keep-all vs keep-hard (fraction ``p`` of a pool of ``⌈n/p⌉``) at each kept size ``n``.

    Returns, for every ``n`` in order, the keep-all point then the keep-hard point (``φ = d/n``).
    Give ``lam`` (kept-normalised) or ``lam_paper`` (the paper's, pool-normalised: each point uses
    ``λ = lam_paper/p``, so keep-all and keep-hard differ). ``mc_reps = 0`` skips Monte Carlo.
    """
    d = _check_int("d", d, 3)
    p = _check_p(p)
    rho = _check_rho(rho)
    lam, lam_paper = _check_curve_lam(lam, lam_paper)
    mc_reps = _check_int("mc_reps", mc_reps, 0)
    sizes = [_check_int("kept_sizes[]", k, 1) for k in kept_sizes]
    gens = _child_seeds(seed, 2 * len(sizes))
    out: list[TheoryPoint] = []
    rules: tuple[tuple[Keep, float], ...] = (("all", 1.0), ("hard", p))
    for i, n in enumerate(sizes):
        for j, (keep, pk) in enumerate(rules):
            lk = _lam_at(lam, lam_paper, pk)
            th = theory_error(phi=d / n, p=pk, rho=rho, lam=lk, keep=keep)
            mc = None
            if mc_reps > 0:
                gen = gens[2 * i + j]
                mc = monte_carlo_error(d=d, n=n, p=pk, rho=rho, lam=lk, keep=keep, reps=mc_reps, seed=gen)
            out.append(TheoryPoint("kept_size", keep, d, n, pk, rho, lk, th, mc, lam_paper))
    return out


def oversampling_curve(
    *,
    d: int,
    n: int,
    ratios: Sequence[float],
    rho: float,
    lam: float | None = None,
    lam_paper: float | None = None,
    mc_reps: int,
    seed: int | np.random.Generator = 0,
) -> list[TheoryPoint]:
    """Keep the ``n`` hardest of a pool of ``ratio·n`` points (``p = 1/ratio``), for each ratio ≥ 1.

    Give ``lam`` (kept-normalised, fixed along the curve) or ``lam_paper`` (the paper's, fixed along
    the curve: each point uses ``λ = lam_paper·ratio``).
    """
    d = _check_int("d", d, 3)
    n = _check_int("n", n, 1)
    rho = _check_rho(rho)
    lam, lam_paper = _check_curve_lam(lam, lam_paper)
    mc_reps = _check_int("mc_reps", mc_reps, 0)
    rs = []
    for r in ratios:
        v = _as_float("ratio", r)
        if v < 1.0:
            raise ConfigError(f"ratio={r!r} is not allowed: the oversampling ratio must be >= 1")
        rs.append(v)
    gens = _child_seeds(seed, len(rs))
    out: list[TheoryPoint] = []
    for r, gen in zip(rs, gens, strict=True):
        p = 1.0 / r
        lk = _lam_at(lam, lam_paper, p)
        th = theory_error(phi=d / n, p=p, rho=rho, lam=lk, keep="hard")
        mc = None
        if mc_reps > 0:
            mc = monte_carlo_error(d=d, n=n, p=p, rho=rho, lam=lk, keep="hard", reps=mc_reps, seed=gen)
        out.append(TheoryPoint("oversampling", "hard", d, n, p, rho, lk, th, mc, lam_paper))
    return out


def plot_theory(kept_points: Sequence[TheoryPoint], ratio_points: Sequence[TheoryPoint], path: str | Path) -> Path:
    """Two-panel PNG: accuracy vs kept size (log x, keep-all vs keep-hard) and vs oversampling ratio.

    Theory as lines (re-evaluated on a dense grid between the given points), Monte Carlo as markers
    with ±1 sd error bars (sd over repetitions). Uses a bare ``Figure`` on the Agg canvas, so no
    pyplot global state is touched. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    def acc(q: TheoryPoint, n: float, p: float) -> float:
        keep: Any = q.keep
        p = min(1.0, p)
        lam = q.lam if q.lam_paper is None else lam_from_paper(q.lam_paper, p)
        return 1.0 - theory_error(phi=q.d / n, p=p, rho=q.rho, lam=lam, keep=keep)

    def lam_label(q: TheoryPoint) -> str:
        return f"λ={q.lam:g}" if q.lam_paper is None else f"λ_paper={q.lam_paper:g}"

    def mc_of(pts: Sequence[TheoryPoint]) -> list[tuple[TheoryPoint, MonteCarloResult]]:
        return [(q, q.mc) for q in pts if q.mc is not None]

    path = Path(path)
    fig = Figure(figsize=(10.0, 4.0))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)

    styles = {"all": ("tab:blue", "keep all"), "hard": ("tab:red", "keep hard"), "easy": ("tab:green", "keep easy")}
    for keep in ("all", "hard", "easy"):
        pts = sorted((q for q in kept_points if q.keep == keep), key=lambda q: q.n)
        if not pts:
            continue
        color, label = styles[keep]
        if keep != "all":
            label = f"{label} (p={pts[0].p:g})"
        q0 = pts[0]
        grid = np.geomspace(pts[0].n, pts[-1].n, 80) if len(pts) > 1 else np.array([float(q0.n)])
        ax1.plot(
            grid,
            [acc(q0, g, q0.p) for g in grid],
            "-",
            color=color,
            label=f"{label}, theory",
        )
        mc = mc_of(pts)
        if mc:
            ax1.errorbar(
                [q.n for q, _ in mc],
                [1.0 - r.mean for _, r in mc],
                yerr=[r.sd for _, r in mc],
                fmt="o",
                color=color,
                ms=4,
                capsize=2,
                label=f"{label}, Monte Carlo (±1 sd)",
            )
    ax1.set_xscale("log")
    ax1.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
    ax1.set_xlabel("kept size n")
    ax1.set_ylabel("test accuracy")
    if kept_points:
        q0 = kept_points[0]
        ax1.axvline(q0.d, color="0.6", lw=0.8, ls=":")
        ax1.set_title(f"accuracy vs kept size (d={q0.d}, ρ={q0.rho:g}, {lam_label(q0)})")
        ax1.legend(fontsize=7)

    pts = sorted(ratio_points, key=lambda q: q.ratio)
    if pts:
        q0 = pts[0]
        grid = np.geomspace(pts[0].ratio, pts[-1].ratio, 80) if len(pts) > 1 else np.array([q0.ratio])
        ax2.plot(
            grid,
            [acc(q0, q0.n, 1.0 / g) for g in grid],
            "-",
            color="tab:red",
            label="keep hard, theory",
        )
        mc = mc_of(pts)
        if mc:
            ax2.errorbar(
                [q.ratio for q, _ in mc],
                [1.0 - r.mean for _, r in mc],
                yerr=[r.sd for _, r in mc],
                fmt="o",
                color="tab:red",
                ms=4,
                capsize=2,
                label="keep hard, Monte Carlo (±1 sd)",
            )
        ax2.set_title(f"keep the n hardest of ratio·n (n={q0.n}, d={q0.d}, ρ={q0.rho:g}, {lam_label(q0)})", fontsize=9)
        ax2.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_xlabel("oversampling ratio (pool / kept)")
    ax2.set_ylabel("test accuracy")

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
