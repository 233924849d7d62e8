"""AdaptPrune's Gaussian centre correction as a fitter.

AdaptPrune multiplies the attention scores by a Gaussian mask centred at the image midpoint,
``w(x, y) = exp(-(x² + y²) / (2 σ²))`` over ``x, y = linspace(-12, 12, 24)`` with ``σ = 12`` on LLaVA's
24x24 grid. posbias works in centred coordinates scaled to each grid, ``u = linspace(-1, 1, R)[row]``,
``v = linspace(-1, 1, C)[col]``, where AdaptPrune's mask is ``exp(-(u² + v²) / (2 σ_n²))`` with
``σ_n = 12 / 12 = 1`` (:data:`DEFAULT_SIGMA`). On another grid the default keeps that ratio of sigma to
the half-width of the grid, i.e. ``σ = R / 2`` patches along rows and ``C / 2`` along columns.

``sigma="fit"`` fits ``M(u, v) ≈ c + a · exp(-(u² + v²) / (2 σ²))`` (``a >= 0``) to the measured mean
attention map by weighted least squares: a profile over σ (closed-form ``a, c`` for each σ on a log grid,
then a bounded 1-D refinement). If the best fit has ``a = 0`` the map has no centre peak
(``centre_peak_ = False``) and sigma stays at the default. The R² of the default sigma is always reported,
so a calibration says whether AdaptPrune's mask describes this model at all.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from posbias.errors import PosbiasError
from posbias.fitters.base import BaseFitter, r2_score
from posbias.fitters.curves import count_samples, fit_points, uv_key

__all__ = ["GaussianCentreFitter", "DEFAULT_SIGMA", "SIGMA_BOUNDS", "gaussian_mask"]

#: AdaptPrune's sigma (12 on linspace(-12, 12, 24)) in centred, grid-scaled units
DEFAULT_SIGMA: float = 1.0
#: range searched by sigma="fit", centred units
SIGMA_BOUNDS: tuple[float, float] = (0.05, 20.0)
#: above this many distinct (u, v) the mean map is binned 24x24
_MAX_DISTINCT: int = 4096
_BINS: int = 24


def gaussian_mask(grid: tuple[int, int], sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """(R, C) float64 mask ``exp(-(u² + v²) / (2 σ²))`` with ``u, v = linspace(-1, 1, ·)``.

    ``gaussian_mask((24, 24), 1.0)`` equals AdaptPrune's mask (sigma 12 over linspace(-12, 12, 24)).
    """
    r, c = int(grid[0]), int(grid[1])
    if r < 1 or c < 1:
        raise PosbiasError(f"gaussian_mask: grid {grid} must be two positive ints")
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise PosbiasError(f"gaussian_mask: sigma={sigma!r} must be > 0")
    from posbias.kernels import gaussian_centre_weight

    ids = np.arange(r * c, dtype=np.int64).reshape(r, c)  # (R, C) raster
    return gaussian_centre_weight(ids // c, ids % c, (r, c), float(sigma))  # (R, C), the pruner's kernel


def _fit_ac(g: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted LS of y on [1, g] for each row of g with a >= 0.

    g : (K, m); y, w : (m,). Returns a (K,), c (K,), sse (K,).
    """
    sw = w.sum()
    gm = (g * w).sum(axis=1) / sw  # (K,)
    ym = float((y * w).sum() / sw)
    dg = g - gm[:, None]  # (K, m)
    var = (dg * dg * w).sum(axis=1)  # (K,)
    cov = (dg * (y - ym) * w).sum(axis=1)  # (K,)
    a = np.where(var > 1e-300, cov / np.where(var > 1e-300, var, 1.0), 0.0)  # (K,)
    a = np.maximum(a, 0.0)
    c = ym - a * gm  # (K,)
    resid = y[None, :] - (c[:, None] + a[:, None] * g)  # (K, m)
    sse = (resid * resid * w).sum(axis=1)  # (K,)
    return a, c, sse


class GaussianCentreFitter(BaseFitter):
    """Gaussian centre weight ``exp(-(u² + v²) / (2 σ²))`` with AdaptPrune's or a fitted sigma.

    Parameters
    ----------
    sigma : "default", "fit" or float, default "default"
        ``"default"``: AdaptPrune's sigma (1.0 in centred units = 12 on a 24x24 grid, scaled to the grid);
        ``"fit"``: fitted to the mean attention map; a positive float: that sigma in centred units.

    Attributes
    ----------
    sigma_ : float
        Sigma in centred units (multiply by R/2, C/2 for patches along rows / columns).
    amplitude_, offset_ : float
        ``a >= 0`` and ``c`` of the mean-map model ``c + a · mask`` at ``sigma_``.
    centre_peak_ : bool
        False when the best fit has no centre peak (``a = 0``).
    r2_, rmse_ : float
        Goodness of ``c + a · mask`` against the mean attention map at ``sigma_``.
    r2_default_ : float
        The same R² with AdaptPrune's sigma.
    n_samples_, n_points_, n_excluded_ : int
    """

    _learned = (
        "sigma_",
        "amplitude_",
        "offset_",
        "centre_peak_",
        "r2_",
        "rmse_",
        "r2_default_",
        "n_samples_",
        "n_points_",
        "n_excluded_",
    )

    def __init__(self, *, sigma: str | float = "default") -> None:
        self.sigma = sigma

    def _check_sigma(self) -> None:
        s = self.sigma
        if isinstance(s, str):
            if s not in ("default", "fit"):
                raise PosbiasError(f"GaussianCentreFitter: sigma={s!r}; use 'default', 'fit' or a positive number")
        elif isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not (
            math.isfinite(float(s)) and float(s) > 0
        ):
            raise PosbiasError(f"GaussianCentreFitter: sigma={s!r}; use 'default', 'fit' or a positive number")

    @staticmethod
    def _check_uv(X: Any, name: str) -> np.ndarray:
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise PosbiasError(
                f"GaussianCentreFitter.{name}: X must be (n, 2) centred coordinates (u, v) in [-1, 1], got shape {arr.shape}"
            )
        return arr

    def fit(self, X: Any, y: Any, sample_weight: Any = None, *, groups: Any = None) -> "GaussianCentreFitter":
        """Fit the mean-map model (and sigma when ``sigma="fit"``).

        Parameters
        ----------
        X : array-like
            (n, 2) centred coordinates (u, v) in [-1, 1] of pooled tokens (:func:`posbias.fitters.curves.centred_coords`).
        y : array-like
            (n,) attention of each token.
        sample_weight : array-like, optional
            (n,) non-negative weights.
        groups : array-like, optional
            (n,) sample id of each point (counts ``n_samples_``).

        Returns
        -------
        GaussianCentreFitter
        """
        self._check_sigma()
        uv = self._check_uv(X, "fit")  # (n, 2)
        uv, yv, w, keep, n_excluded = fit_points(uv, y, sample_weight, "GaussianCentreFitter.fit")  # (k, 2), (k,), (k,)
        if np.any(np.abs(uv) > 1.0 + 1e-9):
            raise PosbiasError("GaussianCentreFitter.fit: X must be centred coordinates in [-1, 1]; use centred_coords(...)")
        n_samples = count_samples(groups, keep, uv, "GaussianCentreFitter.fit")
        cu, cv, ym, wm = self._mean_map(uv, yv, w)  # (m,) each
        r2map = cu * cu + cv * cv  # (m,)

        def model_at(sig: float) -> tuple[float, float, float]:
            g = np.exp(-r2map / (2.0 * sig * sig))[None, :]  # (1, m)
            a, c, sse = _fit_ac(g, ym, wm)
            return float(a[0]), float(c[0]), float(sse[0])

        peak = True
        if self.sigma == "fit":
            grid = np.geomspace(SIGMA_BOUNDS[0], SIGMA_BOUNDS[1], 161)  # (K,)
            g = np.exp(-r2map[None, :] / (2.0 * grid[:, None] ** 2))  # (K, m)
            a, c, sse = _fit_ac(g, ym, wm)
            k = int(np.argmin(sse))
            if a[k] <= 0.0:
                peak = False
                sigma = DEFAULT_SIGMA
            else:
                from scipy.optimize import minimize_scalar

                lo, hi = np.log(grid[max(k - 1, 0)]), np.log(grid[min(k + 1, grid.size - 1)])
                opt = minimize_scalar(lambda ls: model_at(float(np.exp(ls)))[2], bounds=(lo, hi), method="bounded",
                                      options={"xatol": 1e-6})
                sigma = float(np.exp(opt.x)) if opt.fun <= sse[k] else float(grid[k])
        elif self.sigma == "default":
            sigma = DEFAULT_SIGMA
        else:
            sigma = float(self.sigma)
        a_s, c_s, _ = model_at(sigma)
        if self.sigma == "fit" and a_s <= 0.0:
            peak = False
        a_d, c_d, _ = model_at(DEFAULT_SIGMA)
        pred = c_s + a_s * np.exp(-r2map / (2.0 * sigma * sigma))  # (m,)
        pred_d = c_d + a_d * np.exp(-r2map / (2.0 * DEFAULT_SIGMA**2))  # (m,)
        self.sigma_ = float(sigma)
        self.amplitude_ = float(a_s)
        self.offset_ = float(c_s)
        self.centre_peak_ = bool(peak and a_s > 0.0)
        self.r2_ = float(r2_score(ym, pred, wm))
        self.rmse_ = float(np.sqrt(np.sum(wm * (ym - pred) ** 2) / np.sum(wm)))
        self.r2_default_ = float(r2_score(ym, pred_d, wm))
        self.n_samples_ = int(n_samples)
        self.n_points_ = int(yv.size)
        self.n_excluded_ = int(n_excluded)
        return self

    @staticmethod
    def _mean_map(uv: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Weighted mean of y per distinct (u, v), or per 24x24 bin when there are many distinct points."""
        uniq, inv = np.unique(uv_key(uv), return_inverse=True)  # (m,), (n,)
        inv = inv.ravel()
        if uniq.shape[0] > _MAX_DISTINCT:
            bu = np.clip(((uv[:, 0] + 1) * 0.5 * _BINS).astype(np.int64), 0, _BINS - 1)
            bv = np.clip(((uv[:, 1] + 1) * 0.5 * _BINS).astype(np.int64), 0, _BINS - 1)
            _, inv = np.unique(bu * _BINS + bv, return_inverse=True)
            inv = inv.ravel()
        m = int(inv.max()) + 1
        ws = np.bincount(inv, weights=w, minlength=m)  # (m,)
        cu = np.bincount(inv, weights=w * uv[:, 0], minlength=m) / ws  # (m,)
        cv = np.bincount(inv, weights=w * uv[:, 1], minlength=m) / ws  # (m,)
        ym = np.bincount(inv, weights=w * y, minlength=m) / ws  # (m,)
        return cu, cv, ym, ws

    # ------------------------------------------------------------------ outputs
    def weights(self, X: Any) -> np.ndarray:
        """(n,) float64 AdaptPrune weight ``exp(-(u² + v²) / (2 sigma_²))`` (multiply attention by it)."""
        self._check_fitted()
        uv = self._check_uv(X, "weights")
        return np.exp(-(uv[:, 0] ** 2 + uv[:, 1] ** 2) / (2.0 * self.sigma_**2))

    def _predict(self, x: np.ndarray) -> np.ndarray:
        uv = self._check_uv(x, "predict")
        return self.offset_ + self.amplitude_ * np.exp(-(uv[:, 0] ** 2 + uv[:, 1] ** 2) / (2.0 * self.sigma_**2))

    def score(self, X: Any, y: Any) -> float:
        """R² of the mean-map model ``c + a · mask`` on the given points."""
        uv = self._check_uv(X, "score")
        yv = np.asarray(y, dtype=np.float64).ravel()
        ok = np.all(np.isfinite(uv), axis=1) & np.isfinite(yv)
        if not ok.any():
            raise PosbiasError("GaussianCentreFitter.score: no finite points to score")
        return r2_score(yv[ok], self.predict(uv[ok]))

    def mask(self, grid: tuple[int, int]) -> np.ndarray:
        """(R, C) float64 weight over a grid (:func:`gaussian_mask` with ``sigma_``)."""
        self._check_fitted()
        return gaussian_mask(grid, self.sigma_)

    def sigma_patches(self, grid: tuple[int, int]) -> tuple[float, float]:
        """Sigma in AdaptPrune's patch units (x over linspace(-R/2, R/2, R)): ``(sigma_ R/2, sigma_ C/2)``."""
        self._check_fitted()
        return float(self.sigma_ * grid[0] / 2.0), float(self.sigma_ * grid[1] / 2.0)
