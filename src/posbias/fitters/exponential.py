"""PoRe's recency-bias curve: an exponential of the mean attention per position.

PoRe averages the last-token attention each visual token receives over a data set,
``Ā_i = (1/M) Σ_m A_i^(m)``, fits it with an exponential by least squares, ``P(x) = a·exp(b·x)``, and
reweights attention as ``Â_i = A_i / P(i)``. This fitter adds an optional constant offset
``P(x) = a·exp(b·x) + c`` and constrains ``a > 0, c >= 0`` so that ``P(x) > 0`` everywhere.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from posbias.errors import PosbiasError
from posbias.fitters.base import BaseFitter, r2_score

__all__ = ["ExponentialBiasFitter", "select_exponential_form"]

#: smallest allowed amplitude, relative to the largest mean attention (keeps P strictly positive)
_A_FLOOR_REL: float = 1e-12


def _model(t: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * np.exp(b * t) + c


def _model_pure(t: np.ndarray, a: float, b: float) -> np.ndarray:
    return a * np.exp(b * t)


class ExponentialBiasFitter(BaseFitter):
    """Least-squares ``P(x) = a·exp(b·x) + c`` (or PoRe's ``a·exp(b·x)``) of the mean attention curve.

    Parameters
    ----------
    offset : bool, default True
        Fit the constant ``c >= 0``; ``False`` gives PoRe's pure exponential (``c_ = 0``).
    domain : {"index", "normalized"}, default "index"
        ``"index"``: x is the raster index 0..V-1; ``"normalized"``: x = i / V in [0, 1).

    Attributes
    ----------
    a_, b_, c_ : float
        Curve parameters in the unscaled domain of x (``a_ > 0``, ``c_ >= 0``).
    x_scale_ : float
        Internal conditioning scale: the fit runs on ``t = x / x_scale_`` (t in [0, 1]).
    n_samples_, n_points_, n_excluded_ : int
        Samples pooled, finite points used, non-finite points dropped.
    r2_, rmse_ : float
        Goodness of the curve against the mean attention curve it was fitted to.
    """

    _learned = ("a_", "b_", "c_", "x_scale_", "n_samples_", "n_points_", "n_excluded_", "r2_", "rmse_")

    def __init__(self, *, offset: bool = True, domain: str = "index") -> None:
        self.offset = offset
        self.domain = domain

    def fit(
        self,
        x: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        groups: Any = None,
    ) -> "ExponentialBiasFitter":
        """Fit the exponential to the per-position mean of pooled attention values.

        Parameters
        ----------
        x : array-like
            (n,) token positions.
        y : array-like
            (n,) attention each token received, pooled over samples (must be >= 0 on average).
        sample_weight : array-like, optional
            (n,) non-negative weights for the per-position means.
        groups : array-like, optional
            (n,) sample id of each point; only used to count ``n_samples_``.

        Returns
        -------
        ExponentialBiasFitter
            ``self``, fitted.
        """
        if not isinstance(self.offset, (bool, np.bool_)):
            raise PosbiasError(f"ExponentialBiasFitter: offset={self.offset!r} must be True or False")
        self._check_domain()
        x, y, w, n_excluded, n_samples = self._check_xy(x, y, sample_weight, groups)  # (n,) float64 each
        xm, ym, wm = self._mean_curve(x, y, w)  # (m,) float64 each
        n_par = 3 if self.offset else 2
        if xm.size < n_par + 1:
            raise PosbiasError(
                f"ExponentialBiasFitter: {xm.size} distinct positions are too few for {n_par} parameters; "
                f"pass at least {n_par + 1} positions"
            )
        ymax = float(ym.max())
        if ymax <= 0.0:
            raise PosbiasError(
                "ExponentialBiasFitter: the mean attention is <= 0 at every position; fit attention values, not differences"
            )
        scale = float(xm.max()) if xm.max() > 0 else 1.0
        t = xm / scale  # (m,) float64 in [0, 1]
        sigma = 1.0 / np.sqrt(wm / wm.max())  # (m,) float64, relative: positions with more data count more
        a_floor = _A_FLOOR_REL * ymax

        best: tuple[float, np.ndarray] | None = None
        last_error = ""
        for p0 in self._initial_guesses(t, ym, wm):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    popt = self._curve_fit(t, ym, sigma, p0, a_floor)
            except (RuntimeError, ValueError) as exc:  # curve_fit's "optimal parameters not found"
                last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                continue
            if not np.all(np.isfinite(popt)):
                continue
            full = np.array([popt[0], popt[1], popt[2] if self.offset else 0.0])  # (3,) float64
            sse = float(np.sum(wm * (ym - _model(t, *full)) ** 2))
            if best is None or sse < best[0]:
                best = (sse, full)
        if best is None:
            raise PosbiasError(
                f"ExponentialBiasFitter: curve_fit did not converge ({last_error}); profile more samples so the "
                "mean attention curve is less noisy, or use offset=False"
            )
        a_t, b_t, c_t = (float(v) for v in best[1])
        self.x_scale_ = scale
        self.a_ = a_t
        self.b_ = b_t / scale
        self.c_ = max(c_t, 0.0)
        self.n_samples_ = int(n_samples)
        self.n_points_ = int(x.size)
        self.n_excluded_ = int(n_excluded)
        pred = self._predict(xm)  # (m,) float64
        self.r2_ = float(r2_score(ym, pred, wm))
        self.rmse_ = float(np.sqrt(np.sum(wm * (ym - pred) ** 2) / np.sum(wm)))
        return self

    def _curve_fit(self, t: np.ndarray, ym: np.ndarray, sigma: np.ndarray, p0: np.ndarray, a_floor: float) -> np.ndarray:
        from scipy.optimize import curve_fit  # scipy only when fitting

        if self.offset:
            lower, upper = [a_floor, -np.inf, 0.0], [np.inf, np.inf, np.inf]
            p = np.array([max(p0[0], 2 * a_floor), p0[1], max(p0[2], 0.0)])
            popt, _ = curve_fit(_model, t, ym, p0=p, sigma=sigma, bounds=(lower, upper), maxfev=20000)
        else:
            lower, upper = [a_floor, -np.inf], [np.inf, np.inf]
            p = np.array([max(p0[0], 2 * a_floor), p0[1]])
            popt, _ = curve_fit(_model_pure, t, ym, p0=p, sigma=sigma, bounds=(lower, upper), maxfev=20000)
        return np.asarray(popt, dtype=np.float64)

    def _initial_guesses(self, t: np.ndarray, ym: np.ndarray, wm: np.ndarray) -> list[np.ndarray]:
        """Starting points from weighted log-linear fits of ``y - c0`` for a few offsets ``c0``."""
        ymin = float(ym.min())
        offsets = [0.0]
        if self.offset and ymin > 0:
            offsets += [0.5 * ymin, 0.9 * ymin, 0.99 * ymin]
        guesses: list[np.ndarray] = []
        for c0 in offsets:
            r = ym - c0  # (m,) float64
            ok = r > 0
            if ok.sum() >= 2 and np.unique(t[ok]).size >= 2:
                slope, intercept = np.polyfit(t[ok], np.log(r[ok]), 1, w=np.sqrt(wm[ok]))
                guesses.append(np.array([float(np.exp(intercept)), float(slope), c0]))
            else:
                guesses.append(np.array([float(np.mean(ym[ym > 0])), 0.0, c0]))
        return guesses

    def _predict(self, x: np.ndarray) -> np.ndarray:
        return self.a_ * np.exp(self.b_ * x) + self.c_


def select_exponential_form(curves: Any, folds: np.ndarray, *, domain: str = "index") -> dict[str, Any]:
    """Held-out choice between PoRe's released pure exponential ``a e^{bx}`` and the offset form ``a e^{bx} + c``.

    Each form is fitted to the mean curve of the training folds' samples and scored by the count-weighted squared
    error against the held-out samples' mean curve. The pure form (the released PoRe weights ``exp(-b i)``) is kept
    unless the offset form's mean error is lower by more than one standard error of the fold-paired difference
    (the 1-SE rule of :func:`posbias.fitters.selection.choose`, favouring the simpler pure form).

    Parameters
    ----------
    curves : SampleCurves
        (S, m) per-sample attention sums and counts over positions.
    folds : np.ndarray
        (S,) fold id of each sample.

    Returns
    -------
    dict
        ``{"forms": ["pure", "offset"], "cv_mse": [..], "cv_se": [..], "paired_se": [..], "best", "chosen",
        "rule": "1se", "n_folds"}`` (plain JSON; a form whose fit fails on a fold gets ``None``).
    """
    from posbias.fitters.selection import choose

    k = int(folds.max()) + 1
    member = (folds[None, :] == np.arange(k)[:, None]).astype(np.float64)  # (k, S)
    test_means, test_counts = curves.group_means(member)  # (k, m)
    train_means, train_counts = curves.group_means(1.0 - member)  # (k, m)
    forms = {"pure": False, "offset": True}
    errors = {name: np.full(k, np.inf) for name in forms}
    for f in range(k):
        tr, te = train_counts[f] > 0, test_counts[f] > 0  # (m,) bool
        for name, offset in forms.items():
            try:
                fit = ExponentialBiasFitter(offset=offset, domain=domain).fit(
                    curves.x[tr], train_means[f, tr], sample_weight=train_counts[f, tr])
            except PosbiasError:
                continue
            resid = test_means[f, te] - fit.predict(curves.x[te])  # (m_te,)
            errors[name][f] = float(np.sum(test_counts[f, te] * resid**2) / np.sum(test_counts[f, te]))
    chosen, best, paired = choose(errors, ["pure", "offset"], "1se")
    fin = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
    return {
        "forms": ["pure", "offset"],
        "cv_mse": [fin(np.mean(errors[n])) for n in forms],
        "cv_se": [fin(np.std(errors[n], ddof=1) / np.sqrt(k)) if k > 1 else None for n in forms],
        "paired_se": [fin(paired[n]) for n in forms],
        "best": best,
        "chosen": chosen,
        "rule": "1se",
        "n_folds": k,
    }
