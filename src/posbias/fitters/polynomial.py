"""PosPrune's positional-bias curve: a polynomial of shallow-minus-deep attention.

PosPrune (Eqs. 3-6) estimates the architecture-induced positional bias of a shallow decoder
layer as the expected difference between shallow- and deep-layer attention per visual token,
``ΔA_i = A_i^shallow - A_i^deep``, and smooths it with a polynomial in the token position,
``ΔA(i) = Σ_k a_k i^k``. The corrected shallow attention is ``A_i^shallow - ΔA(i)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from posbias.errors import PosbiasError
from posbias.fitters.base import BaseFitter, r2_score

__all__ = ["PolynomialBiasFitter", "MAX_DEGREE"]

#: highest polynomial degree accepted (PosPrune's ablation covers 1..5 and picks 3)
MAX_DEGREE: int = 5


class PolynomialBiasFitter(BaseFitter):
    """Least-squares polynomial ``ΔA(x) = Σ_k a_k x^k`` of the per-token attention difference.

    Parameters
    ----------
    degree : int, default 3
        Polynomial degree, 1..5 (PosPrune finds 3 best).
    domain : {"index", "normalized"}, default "index"
        ``"index"``: x is the raster index 0..V-1 (fixed-grid models such as LLaVA-1.5);
        ``"normalized"``: x = i / V in [0, 1) (dynamic-resolution models such as Qwen2.5-VL).

    Attributes
    ----------
    coef_ : np.ndarray
        (degree+1,) float64 coefficients in ascending powers of the SCALED position
        ``t = (x - x_shift_) / x_scale_`` (t spans [-1, 1] over the fitted range).
    x_shift_, x_scale_ : float
        The affine map from x to t.
    n_samples_ : int
        Number of samples pooled (distinct ``groups`` if given, else the largest count at one position).
    n_points_ : int
        Number of finite points used.
    n_excluded_ : int
        Number of points dropped because x or y was NaN or inf.
    r2_, rmse_ : float
        Goodness of the fitted curve against the per-position mean curve of the data.

    Notes
    -----
    Pooled ordinary least squares over all samples equals fitting the per-position mean curve when every
    position has the same number of samples; with unequal counts the pooled fit weights each position by
    its count.
    """

    _learned = ("coef_", "x_shift_", "x_scale_", "n_samples_", "n_points_", "n_excluded_", "r2_", "rmse_")
    _array_learned = ("coef_",)

    def __init__(self, *, degree: int = 3, domain: str = "index") -> None:
        self.degree = degree
        self.domain = domain

    def fit(
        self,
        x: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        groups: Any = None,
    ) -> "PolynomialBiasFitter":
        """Fit the polynomial to pooled per-token differences.

        Parameters
        ----------
        x : array-like
            (n,) token positions (raster index for ``domain="index"``, i/N for ``"normalized"``).
        y : array-like
            (n,) per-token ``A_shallow - A_deep`` pooled over all samples.
        sample_weight : array-like, optional
            (n,) non-negative weights.
        groups : array-like, optional
            (n,) sample id of each point; only used to count ``n_samples_``.

        Returns
        -------
        PolynomialBiasFitter
            ``self``, fitted.
        """
        if isinstance(self.degree, bool) or not isinstance(self.degree, (int, np.integer)) or not (
            1 <= int(self.degree) <= MAX_DEGREE
        ):
            raise PosbiasError(
                f"PolynomialBiasFitter: degree={self.degree!r} is not allowed; use an integer 1..{MAX_DEGREE} (3 is the PosPrune paper's choice)"
            )
        self._check_domain()
        degree = int(self.degree)
        x, y, w, n_excluded, n_samples = self._check_xy(x, y, sample_weight, groups)  # (n,) float64 each
        n_distinct = int(np.unique(x).size)
        if n_distinct <= degree:
            raise PosbiasError(
                f"PolynomialBiasFitter: {n_distinct} distinct positions cannot determine a degree-{degree} polynomial; "
                f"pass at least {degree + 1} positions or lower the degree"
            )
        lo, hi = float(x.min()), float(x.max())
        shift = 0.5 * (lo + hi)
        scale = 0.5 * (hi - lo)
        t = (x - shift) / scale  # (n,) float64 in [-1, 1]
        vander = np.vander(t, degree + 1, increasing=True)  # (n, degree+1) float64
        sw = np.sqrt(w)  # (n,) float64
        coef, _, rank, _ = np.linalg.lstsq(vander * sw[:, None], y * sw, rcond=None)  # (degree+1,) float64
        if rank < degree + 1 or not np.all(np.isfinite(coef)):
            raise PosbiasError(
                "PolynomialBiasFitter: the least-squares system is rank-deficient; pass more distinct positions"
            )
        self.coef_ = coef.astype(np.float64)
        self.x_shift_ = float(shift)
        self.x_scale_ = float(scale)
        self.n_samples_ = int(n_samples)
        self.n_points_ = int(x.size)
        self.n_excluded_ = int(n_excluded)
        xm, ym, wm = self._mean_curve(x, y, w)  # (m,) each
        pred = self._predict(xm)  # (m,) float64
        self.r2_ = float(r2_score(ym, pred, wm))
        self.rmse_ = float(np.sqrt(np.sum(wm * (ym - pred) ** 2) / np.sum(wm)))
        return self

    def _predict(self, x: np.ndarray) -> np.ndarray:
        t = (x - self.x_shift_) / self.x_scale_  # same shape as x, float64
        out = np.zeros_like(t)
        for c in self.coef_[::-1]:  # Horner, highest power first
            out = out * t + c
        return out

    def unscaled_coef(self) -> np.ndarray:
        """Coefficients ``a_k`` in ascending powers of the raw position x (PosPrune's Eq. 5).

        Returns
        -------
        np.ndarray
            (degree+1,) float64. Less well conditioned than ``coef_``; for reporting only.
        """
        self._check_fitted()
        poly = np.polynomial.Polynomial(
            self.coef_, domain=[self.x_shift_ - self.x_scale_, self.x_shift_ + self.x_scale_], window=[-1.0, 1.0]
        )
        return np.asarray(poly.convert().coef, dtype=np.float64)
