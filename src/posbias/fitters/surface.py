"""2-D bias maps over (row, col), and their held-out comparison with the 1-D raster-index fits.

For M-RoPE models (Qwen2.5-VL) a visual token's rotary position is ``(t, s + row, s + col)``: rows and
columns carry their own positions, and the raster index ``row * C + col`` mixes them. A surface over the
centred grid coordinates ``u = linspace(-1, 1, R)[row]``, ``v = linspace(-1, 1, C)[col]`` (for dynamic
grids: the same normalised coordinates of each sample's own grid) can represent such a bias; a 1-D curve
of the raster index cannot (and vice versa: a pure raster-index bias needs a high-order surface).

Models (linear least squares, pooled over samples like the 1-D polynomial):

- ``kind="separable"``: ``f(u, v) = c0 + Σ_{k=1..d} (a_k u^k + b_k v^k)`` (row and column terms);
- ``kind="poly2d"``: ``f(u, v) = Σ_{i+j<=d} c_ij u^i v^j``.

:func:`compare_bias_maps` scores the 1-D polynomials (degrees 1-5) and the surfaces on the same k folds
of samples (:mod:`posbias.fitters.selection`) and picks the 2-D map only if its held-out error beats the
best 1-D curve by more than one standard error of the fold-paired difference (otherwise the simpler 1-D
curve, which the runtime already applies, is kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from posbias.errors import PosbiasError
from posbias.fitters.base import BaseFitter, r2_score
from posbias.fitters.curves import SampleCurves, count_samples, fit_points, uv_key
from posbias.fitters.selection import cv_errors, make_folds, polynomial_design

__all__ = [
    "KINDS",
    "MAX_SURFACE_DEGREE",
    "SurfaceBiasFitter",
    "surface_terms",
    "surface_design",
    "MapComparison",
    "compare_bias_maps",
    "best_surface_params",
]

KINDS: tuple[str, ...] = ("separable", "poly2d")
MAX_SURFACE_DEGREE: int = 5


def surface_terms(kind: str, degree: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of ``u^i v^j`` in a fixed order (constant first)."""
    d = int(degree)
    if kind == "separable":
        return [(0, 0)] + [(k, 0) for k in range(1, d + 1)] + [(0, k) for k in range(1, d + 1)]
    if kind == "poly2d":
        return [(i, s - i) for s in range(d + 1) for i in range(s, -1, -1)]
    raise PosbiasError(f"surface kind {kind!r} is not one of {list(KINDS)}")


def surface_design(u: np.ndarray, v: np.ndarray, kind: str, degree: int) -> np.ndarray:
    """(n, p) float64 design matrix of the surface terms at centred coordinates ``u``, ``v`` ((n,) each)."""
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    terms = surface_terms(kind, degree)
    return np.stack([u**i * v**j for i, j in terms], axis=1)  # (n, p)


class SurfaceBiasFitter(BaseFitter):
    """Least-squares bias surface over centred grid coordinates (module docstring).

    Parameters
    ----------
    kind : {"separable", "poly2d"}, default "separable"
    degree : int, default 3
        1..5 (per axis for separable, total for poly2d).

    Attributes
    ----------
    coef_ : np.ndarray
        (p,) float64 coefficients of :func:`surface_terms` ``(kind, degree)`` in that order.
    n_samples_, n_points_, n_excluded_ : int
    r2_, rmse_ : float
        Goodness against the per-position (distinct (u, v)) mean map.
    """

    _learned = ("coef_", "n_samples_", "n_points_", "n_excluded_", "r2_", "rmse_")
    _array_learned = ("coef_",)

    def __init__(self, *, kind: str = "separable", degree: int = 3) -> None:
        self.kind = kind
        self.degree = degree

    def _check_params(self) -> None:
        if self.kind not in KINDS:
            raise PosbiasError(f"SurfaceBiasFitter: kind={self.kind!r}; use one of {list(KINDS)}")
        if isinstance(self.degree, bool) or not isinstance(self.degree, (int, np.integer)) or not (
            1 <= int(self.degree) <= MAX_SURFACE_DEGREE
        ):
            raise PosbiasError(f"SurfaceBiasFitter: degree={self.degree!r}; use an integer 1..{MAX_SURFACE_DEGREE}")

    @staticmethod
    def _uv(X: Any, name: str) -> np.ndarray:
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise PosbiasError(f"SurfaceBiasFitter.{name}: X must be (n, 2) centred (u, v) coordinates, got shape {arr.shape}")
        return arr

    def fit(self, X: Any, y: Any, sample_weight: Any = None, *, groups: Any = None) -> "SurfaceBiasFitter":
        """Fit the surface to pooled points.

        Parameters
        ----------
        X : array-like
            (n, 2) centred coordinates (u, v) in [-1, 1].
        y : array-like
            (n,) values (e.g. ΔA per token).
        sample_weight : array-like, optional
            (n,) non-negative weights.
        groups : array-like, optional
            (n,) sample id of each point (counts ``n_samples_``).

        Returns
        -------
        SurfaceBiasFitter
        """
        self._check_params()
        uv = self._uv(X, "fit")  # (n, 2)
        uv, yv, w, keep, n_excluded = fit_points(uv, y, sample_weight, "SurfaceBiasFitter.fit")  # (k, 2), (k,), (k,)
        _, inv = np.unique(uv_key(uv), return_inverse=True)  # (m,), (n,)
        inv = inv.ravel()
        m = int(inv.max()) + 1
        ws = np.bincount(inv, weights=w, minlength=m)  # (m,)
        cu = np.bincount(inv, weights=w * uv[:, 0], minlength=m) / ws  # (m,)
        cv = np.bincount(inv, weights=w * uv[:, 1], minlength=m) / ws  # (m,)
        ym = np.bincount(inv, weights=w * yv, minlength=m) / ws  # (m,)
        design = surface_design(cu, cv, self.kind, int(self.degree))  # (m, p)
        if m < design.shape[1]:
            raise PosbiasError(
                f"SurfaceBiasFitter: {m} distinct positions cannot determine {design.shape[1]} coefficients; lower the degree"
            )
        sw = np.sqrt(ws)
        coef, _, rank, _ = np.linalg.lstsq(design * sw[:, None], ym * sw, rcond=None)  # (p,)
        if rank < design.shape[1] or not np.all(np.isfinite(coef)):
            raise PosbiasError(
                f"SurfaceBiasFitter: the {self.kind} degree-{self.degree} system is rank-deficient on this grid; lower the degree"
            )
        n_samples = count_samples(groups, keep, uv, "SurfaceBiasFitter.fit")
        self.coef_ = coef.astype(np.float64)
        pred = design @ coef  # (m,)
        self.n_samples_ = int(n_samples)
        self.n_points_ = int(yv.size)
        self.n_excluded_ = int(n_excluded)
        self.r2_ = float(r2_score(ym, pred, ws))
        self.rmse_ = float(np.sqrt(np.sum(ws * (ym - pred) ** 2) / np.sum(ws)))
        return self

    def _predict(self, x: np.ndarray) -> np.ndarray:
        uv = self._uv(x, "predict")
        return surface_design(uv[:, 0], uv[:, 1], self.kind, int(self.degree)) @ self.coef_

    def score(self, X: Any, y: Any) -> float:
        """R² of the surface on the given points."""
        uv = self._uv(X, "score")
        yv = np.asarray(y, dtype=np.float64).ravel()
        ok = np.all(np.isfinite(uv), axis=1) & np.isfinite(yv)
        if not ok.any():
            raise PosbiasError("SurfaceBiasFitter.score: no finite points to score")
        return r2_score(yv[ok], self.predict(uv[ok]))

    def predict_grid(self, grid: tuple[int, int]) -> np.ndarray:
        """(R, C) float64 surface over a grid (``u, v = linspace(-1, 1, ·)``)."""
        self._check_fitted()
        r, c = int(grid[0]), int(grid[1])
        u = np.linspace(-1.0, 1.0, r) if r > 1 else np.zeros(1)  # (R,)
        v = np.linspace(-1.0, 1.0, c) if c > 1 else np.zeros(1)  # (C,)
        uu, vv = np.meshgrid(u, v, indexing="ij")  # (R, C) each
        return self._predict(np.stack([uu.ravel(), vv.ravel()], axis=1)).reshape(r, c)


@dataclass
class MapComparison:
    """Held-out comparison of 1-D curves and 2-D surfaces on the same folds.

    Attributes
    ----------
    candidates : list of str
        ``"1d-degN"``, ``"separable-degN"``, ``"poly2d-degN"``.
    cv_mse, cv_se : list of float
        Mean and SE over folds of the held-out error (:func:`posbias.fitters.selection.cv_errors`).
    best_1d, best_2d : str
        Lowest-error 1-D and 2-D candidates.
    diff, diff_se : float
        Mean fold-paired error of best_2d minus best_1d, and its SE.
    chosen : {"1d", "2d"}
    rule : str
    n_folds, seed : int
    """

    candidates: list[str]
    cv_mse: list[float]
    cv_se: list[float]
    best_1d: str
    best_2d: str | None
    diff: float | None
    diff_se: float | None
    chosen: str
    rule: str
    n_folds: int
    seed: int
    layout: str = "grid"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (the calibration's ``statistics.bias_map``)."""
        fin = lambda v: float(v) if v is not None and np.isfinite(v) else None  # noqa: E731
        return {
            "chosen": self.chosen,
            "rule": self.rule,
            "n_folds": int(self.n_folds),
            "seed": int(self.seed),
            "layout": self.layout,
            "candidates": list(self.candidates),
            "cv_mse": [fin(v) for v in self.cv_mse],
            "cv_se": [fin(v) for v in self.cv_se],
            "best_1d": self.best_1d,
            "best_2d": self.best_2d,
            "diff": fin(self.diff),
            "diff_se": fin(self.diff_se),
        }


def _parse(name: str) -> tuple[str, int]:
    kind, deg = name.rsplit("-deg", 1)
    return kind, int(deg)


def compare_bias_maps(
    curves: SampleCurves,
    *,
    degrees_1d: tuple[int, ...] = (1, 2, 3, 4, 5),
    surfaces: tuple[tuple[str, int], ...] = (("separable", 1), ("separable", 2), ("separable", 3), ("separable", 4),
                                               ("poly2d", 2), ("poly2d", 3), ("poly2d", 4)),
    n_folds: int = 5,
    seed: int = 0,
    folds: np.ndarray | None = None,
) -> MapComparison:
    """Cross-validate 1-D polynomials of ``curves.x`` against surfaces of ``(curves.u, curves.v)``.

    Parameters
    ----------
    curves : SampleCurves
        Per-sample ΔA per position, with columns that carry both x and (u, v) (``layout`` "grid" or
        "bins2d").
    degrees_1d : tuple of int
        1-D polynomial degrees.
    surfaces : tuple of (kind, degree)
        Surface candidates, simplest first within each kind.
    n_folds, seed : int
        Fold assignment (same rule as :func:`posbias.fitters.selection.make_folds`).
    folds : np.ndarray, optional
        (S,) precomputed folds.

    Returns
    -------
    MapComparison
    """
    if folds is None:
        folds = make_folds(curves.n_samples, n_folds, seed)
    k = int(folds.max()) + 1
    m = curves.n_columns
    n_x = int(np.unique(np.round(curves.x, 12)).size)
    lo, hi = float(curves.x.min()), float(curves.x.max())
    shift, scale = 0.5 * (lo + hi), max(0.5 * (hi - lo), 1e-12)
    designs: dict[str, np.ndarray] = {}
    names_1d = [f"1d-deg{d}" for d in degrees_1d if d < n_x]
    for name in names_1d:
        designs[name] = polynomial_design(curves.x, _parse(name)[1], shift, scale)
    names_2d: list[str] = []
    for kind, deg in surfaces:
        design = surface_design(curves.u, curves.v, kind, deg)  # (m, p)
        if design.shape[1] < m and np.linalg.matrix_rank(design) == design.shape[1]:
            name = f"{kind}-deg{deg}"
            designs[name] = design
            names_2d.append(name)
    if not names_1d:
        raise PosbiasError("compare_bias_maps: too few distinct positions for a 1-D polynomial")
    errs = cv_errors(curves, designs, folds)
    best_1d = min(names_1d, key=lambda n: (float(np.mean(errs[n])), names_1d.index(n)))
    if names_2d:
        best_2d = min(names_2d, key=lambda n: (float(np.mean(errs[n])), names_2d.index(n)))
        diff = errs[best_2d] - errs[best_1d]  # (k,)
        d_mean = float(np.mean(diff))
        d_se = float(np.std(diff, ddof=1) / np.sqrt(k)) if k > 1 else float("inf")
        chosen = "2d" if np.isfinite(d_mean) and d_mean < -d_se else "1d"
    else:
        best_2d, d_mean, d_se, chosen = None, None, None, "1d"
    order = names_1d + names_2d
    return MapComparison(
        candidates=order,
        cv_mse=[float(np.mean(errs[n])) for n in order],
        cv_se=[float(np.std(errs[n], ddof=1) / np.sqrt(k)) for n in order],
        best_1d=best_1d,
        best_2d=best_2d,
        diff=d_mean,
        diff_se=d_se,
        chosen=chosen,
        rule="2-D only if its held-out error beats the best 1-D by more than one SE of the fold-paired difference",
        n_folds=k,
        seed=int(seed),
        layout=curves.layout,
    )


def best_surface_params(comparison: MapComparison) -> tuple[str, int] | None:
    """``(kind, degree)`` of the best 2-D candidate, or None."""
    return None if comparison.best_2d is None else _parse(comparison.best_2d)

