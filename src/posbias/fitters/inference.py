"""Uncertainty of the fitted bias curves.

Polynomial PBC fit -- statsmodels OLS with a cluster-robust covariance, clustered by sample
-----------------------------------------------------------------------------------------------
The point estimate is the pooled ordinary least-squares fit of all (x, ΔA) points, the same coefficients
as :class:`~posbias.fitters.polynomial.PolynomialBiasFitter`. The textbook OLS (or WLS) covariance assumes
independent errors, but the V tokens of one sample share its image and question: their deviations from the
curve are correlated, so the iid standard errors treat ``S * V`` correlated points as independent and are
too small. The cluster-robust sandwich (statsmodels ``cov_type="cluster"``, CR1 small-sample correction,
groups = samples) only assumes independence between samples, which is how the data were drawn. Intervals
use Student's t with ``G - 1`` degrees of freedom (G = number of samples). WLS was not used: the pooled
points have equal weight by construction, and reweighting positions by an estimated variance would change
the estimate away from the one the paper (and the runtime) uses. The curve band is pointwise (not
simultaneous), ``f(x) ± t * sqrt(x_tᵀ Σ x_t)``.

Exponential PoRe fit -- cluster bootstrap
-----------------------------------------
The exponential is nonlinear and bounded (``a > 0, c >= 0``), so its intervals come from a bootstrap over
samples: resample the samples with replacement, recompute the mean attention curve, refit (started from
the full-data estimate), and take percentile intervals of ``a, b, c``. Refits that fail are counted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from posbias.errors import PosbiasError
from posbias.fitters.curves import SampleCurves

__all__ = [
    "RESIDUAL_POINTS",
    "PolynomialInference",
    "ExponentialInference",
    "polynomial_inference",
    "exponential_inference",
    "residual_data",
]

#: at most this many points of residual-plot data are stored (consecutive positions are averaged)
RESIDUAL_POINTS: int = 144


def _floats(a: Any) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def residual_data(
    x: np.ndarray, mean: np.ndarray, count: np.ndarray, fitted: np.ndarray, max_points: int = RESIDUAL_POINTS
) -> dict[str, list[float]]:
    """Residual-plot data, averaged over consecutive positions down to ``max_points``.

    Parameters
    ----------
    x, mean, count, fitted : np.ndarray
        (m,) positions (ascending), observed mean curve, points per position, fitted curve.

    Returns
    -------
    dict
        ``{"x", "mean", "fitted", "residual", "count"}`` lists of equal length <= ``max_points``.
    """
    order = np.argsort(x, kind="stable")
    x, mean, count, fitted = x[order], mean[order], count[order], fitted[order]  # (m,) each
    m = x.size
    groups = np.minimum((np.arange(m) * max_points) // max(m, 1), max_points - 1) if m > max_points else np.arange(m)
    k = int(groups.max()) + 1 if m else 0
    w = np.bincount(groups, weights=count, minlength=k)  # (k,)
    w_safe = np.where(w > 0, w, 1.0)
    gx = np.bincount(groups, weights=count * x, minlength=k) / w_safe  # (k,)
    gm = np.bincount(groups, weights=count * mean, minlength=k) / w_safe  # (k,)
    gf = np.bincount(groups, weights=count * fitted, minlength=k) / w_safe  # (k,)
    return {"x": _floats(gx), "mean": _floats(gm), "fitted": _floats(gf), "residual": _floats(gm - gf), "count": _floats(w)}


# ---------------------------------------------------------------------------------------------- polynomial
@dataclass
class PolynomialInference:
    """Coefficient intervals and curve band of the PBC polynomial (module docstring).

    Attributes
    ----------
    method : str
    coef, se, se_iid, ci_low, ci_high : list of float
        (degree+1,) in the fitter's scaled basis ``t = (x - x_shift_) / x_scale_``.
    n_clusters : int
    df : int
        Degrees of freedom of the t quantile (G - 1).
    level : float
    band : dict
        ``{"x", "fit", "low", "high"}`` pointwise confidence band at evenly spaced positions.
    """

    method: str
    coef: list[float]
    se: list[float]
    se_iid: list[float]
    ci_low: list[float]
    ci_high: list[float]
    n_clusters: int
    df: int
    level: float
    band: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (the calibration's ``statistics.pbc_inference``)."""
        return {
            "method": self.method,
            "basis": "t = (x - x_shift_) / x_scale_",
            "coef": list(self.coef),
            "se": list(self.se),
            "se_iid": list(self.se_iid),
            "ci_low": list(self.ci_low),
            "ci_high": list(self.ci_high),
            "n_clusters": int(self.n_clusters),
            "df": int(self.df),
            "level": float(self.level),
            "band": {k: list(v) for k, v in self.band.items()},
        }


def polynomial_inference(
    fitter: Any,
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    level: float = 0.95,
    n_band: int = 101,
) -> PolynomialInference:
    """statsmodels OLS with sample-clustered covariance for a fitted :class:`PolynomialBiasFitter`.

    Parameters
    ----------
    fitter : PolynomialBiasFitter
        Fitted on the same ``x``, ``y`` (its basis and coefficients are reused and checked).
    x, y : np.ndarray
        (n,) finite pooled positions and ΔA values.
    groups : np.ndarray
        (n,) sample id of each point (the clusters).
    level : float
        Confidence level.
    n_band : int
        Positions of the band.

    Returns
    -------
    PolynomialInference
    """
    from scipy import stats
    from statsmodels.regression.linear_model import OLS

    fitter._check_fitted()
    x = np.asarray(x, dtype=np.float64)  # (n,)
    y = np.asarray(y, dtype=np.float64)  # (n,)
    g = np.asarray(groups)  # (n,)
    if not (x.shape == y.shape == g.shape) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise PosbiasError("polynomial_inference: x, y, groups must be finite arrays of equal length")
    _, g_codes = np.unique(g, return_inverse=True)
    n_clusters = int(g_codes.max()) + 1
    if n_clusters < 2:
        raise PosbiasError("polynomial_inference: cluster-robust intervals need at least 2 samples; profile more")
    degree = int(fitter.degree)
    t = (x - fitter.x_shift_) / fitter.x_scale_  # (n,) float64
    design = np.vander(t, degree + 1, increasing=True)  # (n, p)
    res = OLS(y, design).fit()
    se_iid = np.asarray(res.bse, dtype=np.float64)  # (p,)
    robust = res.get_robustcov_results(cov_type="cluster", groups=g_codes, use_t=True)
    cov = np.asarray(robust.cov_params(), dtype=np.float64)  # (p, p)
    coef = np.asarray(res.params, dtype=np.float64)  # (p,)
    scale = max(float(np.max(np.abs(fitter.coef_))), 1e-300)
    if not np.allclose(coef, fitter.coef_, rtol=1e-6, atol=1e-9 * scale):
        raise PosbiasError("polynomial_inference: statsmodels and the fitter disagree; pass the data the fitter was fitted on")
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))  # (p,)
    df = n_clusters - 1
    q = float(stats.t.ppf(0.5 + level / 2.0, df))
    xb = np.linspace(float(x.min()), float(x.max()), int(n_band))  # (B,)
    db = np.vander((xb - fitter.x_shift_) / fitter.x_scale_, degree + 1, increasing=True)  # (B, p)
    fb = db @ coef  # (B,)
    half = q * np.sqrt(np.clip(np.einsum("bi,ij,bj->b", db, cov, db), 0.0, None))  # (B,)
    return PolynomialInference(
        method="statsmodels OLS, cluster-robust covariance (CR1) clustered by sample, t(G-1) intervals",
        coef=_floats(coef),
        se=_floats(se),
        se_iid=_floats(se_iid),
        ci_low=_floats(coef - q * se),
        ci_high=_floats(coef + q * se),
        n_clusters=n_clusters,
        df=df,
        level=float(level),
        band={"x": _floats(xb), "fit": _floats(fb), "low": _floats(fb - half), "high": _floats(fb + half)},
    )


# ---------------------------------------------------------------------------------------------- exponential
@dataclass
class ExponentialInference:
    """Bootstrap intervals, R² and residual data of the PoRe exponential (module docstring).

    Attributes
    ----------
    method : str
    params : dict
        ``{"a": {"estimate", "low", "high"}, "b": ..., "c": ...}`` in the unscaled domain.
    r2, rmse : float
        Goodness against the mean curve (from the fit).
    n_boot, n_failed : int
    level : float
    seed : int
    residuals : dict
        :func:`residual_data` of the fit against the mean attention curve.
    """

    method: str
    params: dict[str, dict[str, float]]
    r2: float
    rmse: float
    n_boot: int
    n_failed: int
    level: float
    seed: int
    residuals: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (the calibration's ``statistics.pore_inference``)."""
        return {
            "method": self.method,
            "params": {k: dict(v) for k, v in self.params.items()},
            "r2": float(self.r2),
            "rmse": float(self.rmse),
            "n_boot": int(self.n_boot),
            "n_failed": int(self.n_failed),
            "level": float(self.level),
            "seed": int(self.seed),
            "residuals": {k: list(v) for k, v in self.residuals.items()},
        }


def exponential_inference(
    fitter: Any,
    curves: SampleCurves,
    *,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> ExponentialInference:
    """Cluster (sample) bootstrap of a fitted :class:`ExponentialBiasFitter`.

    Parameters
    ----------
    fitter : ExponentialBiasFitter
        Fitted on the pooled values that ``curves`` aggregates.
    curves : SampleCurves
        Per-sample attention values per position (``curves.x`` in the fitter's domain).
    n_boot : int
        Bootstrap replicates (0 skips the intervals: low/high equal the estimate).
    level : float
        Coverage of the percentile intervals.
    seed : int
        Seed of the resampling.

    Returns
    -------
    ExponentialInference
    """
    fitter._check_fitted()
    if isinstance(n_boot, bool) or int(n_boot) < 0:
        raise PosbiasError(f"n_boot={n_boot} must be >= 0")
    n_boot = int(n_boot)
    est = np.array([fitter.a_, fitter.b_, fitter.c_], dtype=np.float64)  # (3,)
    scale = float(fitter.x_scale_)
    xs = curves.x  # (m,)
    t = xs / scale  # (m,)
    draws = np.full((n_boot, 3), np.nan)  # (B, 3)
    if n_boot:
        rng = np.random.default_rng([int(seed), 104729])
        s = curves.n_samples
        weights = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(np.float64)  # (B, S)
        means, counts = curves.group_means(weights)  # (B, m)
        p0 = np.array([est[0], est[1] * scale, est[2]])  # (3,) in t
        for k in range(n_boot):
            ok = counts[k] > 0  # (m,)
            if ok.sum() < 4:
                continue
            ym, wm = means[k, ok], counts[k, ok]
            ymax = float(ym.max())
            if ymax <= 0:
                continue
            sigma = 1.0 / np.sqrt(wm / wm.max())  # (m',)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    popt = fitter._curve_fit(t[ok], ym, sigma, p0, 1e-12 * ymax)
            except (RuntimeError, ValueError):
                continue
            if np.all(np.isfinite(popt)):
                draws[k] = [popt[0], popt[1] / scale, popt[2] if fitter.offset else 0.0]
    good = np.all(np.isfinite(draws), axis=1)  # (B,)
    alpha = 1.0 - float(level)
    params: dict[str, dict[str, float]] = {}
    for j, name in enumerate(("a", "b", "c")):
        if good.sum() >= 2:
            lo, hi = np.percentile(draws[good, j], [100 * alpha / 2, 100 * (1 - alpha / 2)])
        else:
            lo = hi = est[j]
        params[name] = {"estimate": float(est[j]), "low": float(lo), "high": float(hi)}
    mean, count = curves.mean()  # (m,), (m,)
    ok = count > 0
    res = residual_data(xs[ok], mean[ok], count[ok], fitter.predict(xs[ok]))
    return ExponentialInference(
        method="cluster bootstrap over samples (resample samples, refit the mean curve), percentile intervals",
        params=params,
        r2=float(fitter.r2_),
        rmse=float(fitter.rmse_),
        n_boot=n_boot,
        n_failed=int(n_boot - good.sum()),
        level=float(level),
        seed=int(seed),
        residuals=res,
    )
