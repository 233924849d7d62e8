"""Shared machinery of the bias-curve fitters.

Every fitter follows the scikit-learn estimator contract: a keyword-only ``__init__`` that only stores
its parameters, ``fit`` that validates its input and returns ``self``, learned values whose names end in
``_``, and a plain-JSON ``to_dict``/``from_dict`` round trip (lists and floats, never pickles).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import numpy as np

from posbias.errors import PosbiasError

__all__ = ["BaseFitter", "DOMAINS", "NORMALIZED_BINS", "mean_curve", "r2_score"]

#: position domains a fitter understands
DOMAINS: tuple[str, ...] = ("index", "normalized")

#: bin count used for the mean curve of the "normalized" domain when it has more distinct positions
NORMALIZED_BINS: int = 100


def r2_score(y_true: np.ndarray, y_pred: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Coefficient of determination, always finite.

    Parameters
    ----------
    y_true, y_pred : np.ndarray
        (n,) float64 observed and predicted values.
    weight : np.ndarray, optional
        (n,) non-negative weights.

    Returns
    -------
    float
        ``1 - SS_res / SS_tot``; when ``SS_tot == 0`` it is 1.0 for a perfect fit and 0.0 otherwise
        (so the value is always JSON-safe).
    """
    w = np.ones_like(y_true) if weight is None else weight  # (n,) float64
    mean = float(np.sum(w * y_true) / np.sum(w))
    ss_res = float(np.sum(w * (y_true - y_pred) ** 2))
    ss_tot = float(np.sum(w * (y_true - mean) ** 2))
    if ss_tot <= 0.0:
        return 1.0 if ss_res <= 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def mean_curve(
    x: np.ndarray,
    y: np.ndarray,
    n_bins: int | None = None,
    *,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of ``y`` per distinct ``x`` (fixed grids) or per equal-width bin of ``x`` (normalized).

    Parameters
    ----------
    x : array-like
        (n,) positions. Must be finite.
    y : array-like
        (n,) values. Must be finite.
    n_bins : int, optional
        ``None``: one point per distinct ``x``. Otherwise ``n_bins`` equal-width bins over
        ``[min(x), max(x)]``; empty bins are dropped and each bin is represented by the (weighted)
        mean ``x`` of its members.
    sample_weight : array-like, optional
        (n,) non-negative weights for the means.

    Returns
    -------
    xs : np.ndarray
        (m,) float64 ascending positions (distinct values or bin centroids).
    means : np.ndarray
        (m,) float64 weighted mean of ``y`` at each position.
    weights : np.ndarray
        (m,) float64 total weight at each position (the count when unweighted).
    """
    x = np.asarray(x, dtype=np.float64).ravel()  # (n,) float64
    y = np.asarray(y, dtype=np.float64).ravel()  # (n,) float64
    if x.shape != y.shape or x.size == 0:
        raise PosbiasError(f"mean_curve: x and y must be non-empty and of equal length (got {x.size} and {y.size})")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise PosbiasError("mean_curve: x and y contain NaN or inf; drop those points first")
    w = np.ones_like(x) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
    if w.shape != x.shape:
        raise PosbiasError(f"mean_curve: sample_weight has {w.size} entries for {x.size} points; pass one per point")
    if n_bins is None:
        xs, inverse = np.unique(x, return_inverse=True)  # (m,), (n,)
    else:
        if int(n_bins) < 1:
            raise PosbiasError(f"mean_curve: n_bins={n_bins} must be >= 1 (or None for one bin per distinct x)")
        lo, hi = float(x.min()), float(x.max())
        if hi > lo:
            edges = np.linspace(lo, hi, int(n_bins) + 1)  # (n_bins+1,)
            raw = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, int(n_bins) - 1)  # (n,)
        else:
            raw = np.zeros(x.shape, dtype=np.int64)  # (n,)
        used, inverse = np.unique(raw, return_inverse=True)  # (m,), (n,)
        xs = None
    m = int(inverse.max()) + 1
    wsum = np.bincount(inverse, weights=w, minlength=m)  # (m,) float64
    keep = wsum > 0  # (m,) bool
    ysum = np.bincount(inverse, weights=w * y, minlength=m)  # (m,) float64
    if xs is None:
        xsum = np.bincount(inverse, weights=w * x, minlength=m)  # (m,) float64
        xs = np.divide(xsum, wsum, out=np.zeros(m), where=keep)
    means = np.divide(ysum, wsum, out=np.zeros(m), where=keep)  # (m,) float64
    return xs[keep].astype(np.float64), means[keep], wsum[keep]


class BaseFitter:
    """Base class of the bias-curve fitters (scikit-learn estimator contract).

    Subclasses set ``_learned`` (the names of the learned attributes stored by ``to_dict``), implement
    ``fit`` and ``_predict``.
    """

    #: learned attribute names (ending in "_") written by to_dict, in a fixed order
    _learned: ClassVar[tuple[str, ...]] = ()
    #: learned attributes that are arrays (stored as JSON lists)
    _array_learned: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return sorted(p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters as a dict (``deep`` is accepted for scikit-learn compatibility)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> "BaseFitter":
        """Set constructor parameters; unknown names raise :class:`PosbiasError`."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise PosbiasError(
                    f"{type(self).__name__}.set_params: unknown parameter {name!r}; valid ones are {valid}"
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ validation helpers
    def _check_domain(self) -> None:
        if self.domain not in DOMAINS:  # type: ignore[attr-defined]
            raise PosbiasError(
                f"{type(self).__name__}: domain={self.domain!r} is not supported; use one of {list(DOMAINS)}"  # type: ignore[attr-defined]
            )

    def _check_xy(
        self, x: Any, y: Any, sample_weight: Any = None, groups: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """Validate fit input and drop non-finite points.

        Returns
        -------
        x, y, w : np.ndarray
            (n_kept,) float64 finite positions, values and weights.
        n_excluded : int
            Number of points dropped because x or y was NaN or inf.
        n_samples : int
            Distinct ``groups`` among kept points when given; otherwise the largest number of kept
            points sharing one position (the number of samples when every sample covers position 0).
        """
        name = type(self).__name__
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
            raise PosbiasError(
                f"{name}.fit: x and y must be 1-D of equal length (got shapes {x.shape} and {y.shape}); "
                "pool the per-token values of all samples into two flat arrays"
            )
        if sample_weight is None:
            w = np.ones_like(x)  # (n,) float64
        else:
            w = np.asarray(sample_weight, dtype=np.float64)
            if w.shape != x.shape:
                raise PosbiasError(
                    f"{name}.fit: sample_weight has shape {w.shape}, expected {x.shape}; pass one weight per point"
                )
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                raise PosbiasError(f"{name}.fit: sample_weight must be finite and >= 0; fix the weights")
        finite = np.isfinite(x) & np.isfinite(y)  # (n,) bool
        n_excluded = int(x.size - finite.sum())
        x, y, w = x[finite], y[finite], w[finite]
        keep = w > 0
        x, y, w = x[keep], y[keep], w[keep]
        if x.size == 0:
            raise PosbiasError(
                f"{name}.fit: no finite points with positive weight ({n_excluded} non-finite excluded); "
                "check the attention store"
            )
        if self.domain == "index":  # type: ignore[attr-defined]
            if np.any(x < 0):
                raise PosbiasError(f"{name}.fit: domain='index' needs positions >= 0 (got min {x.min()}); pass raster indices")
        else:
            if np.any(x < 0) or np.any(x > 1):
                raise PosbiasError(
                    f"{name}.fit: domain='normalized' needs positions in [0, 1] (got [{x.min()}, {x.max()}]); pass i/N"
                )
        if groups is not None:
            g = np.asarray(groups)
            if g.shape != finite.shape:
                raise PosbiasError(f"{name}.fit: groups has shape {g.shape}, expected {finite.shape}; pass one sample id per point")
            n_samples = int(np.unique(g[finite][keep]).size)
        else:
            _, counts = np.unique(x, return_counts=True)
            n_samples = int(counts.max())
        return x, y, w, n_excluded, n_samples

    def _mean_curve(self, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-position (index) or binned (normalized, many positions) mean curve of the fit data."""
        n_bins: int | None = None
        if self.domain == "normalized" and np.unique(x).size > NORMALIZED_BINS:  # type: ignore[attr-defined]
            n_bins = NORMALIZED_BINS
        return mean_curve(x, y, n_bins, sample_weight=w)

    def _check_fitted(self) -> None:
        missing = [n for n in self._learned if not hasattr(self, n)]
        if missing:
            raise PosbiasError(f"{type(self).__name__} is not fitted yet; call fit(x, y) or from_dict(...) first")

    # ------------------------------------------------------------------ prediction
    def _predict(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, x: Any) -> np.ndarray:
        """Fitted curve at positions ``x`` (same domain as the fit).

        Parameters
        ----------
        x : array-like
            (n,) positions.

        Returns
        -------
        np.ndarray
            (n,) float64 curve values.
        """
        self._check_fitted()
        x = np.asarray(x, dtype=np.float64)
        return self._predict(x)

    def score(self, x: Any, y: Any) -> float:
        """R^2 of :meth:`predict` against ``y`` on the given (finite) points, scikit-learn style."""
        xv = np.asarray(x, dtype=np.float64).ravel()  # (n,) float64
        yv = np.asarray(y, dtype=np.float64).ravel()  # (n,) float64
        if xv.shape != yv.shape:
            raise PosbiasError(f"{type(self).__name__}.score: x and y differ in length ({xv.size} vs {yv.size})")
        ok = np.isfinite(xv) & np.isfinite(yv)
        if not ok.any():
            raise PosbiasError(f"{type(self).__name__}.score: no finite points to score")
        return r2_score(yv[ok], self.predict(xv[ok]))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe ``{"class", "params", "learned"}`` (learned keys keep their trailing ``_``)."""
        self._check_fitted()
        learned: dict[str, Any] = {}
        for name in self._learned:
            value = getattr(self, name)
            if name in self._array_learned:
                learned[name] = [float(v) for v in np.asarray(value, dtype=np.float64).ravel()]
            elif isinstance(value, (bool, np.bool_)):
                learned[name] = bool(value)
            elif isinstance(value, (int, np.integer)):
                learned[name] = int(value)
            else:
                learned[name] = float(value)
        params = {k: (v if not isinstance(v, np.generic) else v.item()) for k, v in self.get_params().items()}
        return {"class": type(self).__name__, "params": params, "learned": learned}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BaseFitter":
        """Rebuild a fitted estimator from :meth:`to_dict` output.

        Called on :class:`BaseFitter` it dispatches on ``d["class"]`` among the subclasses imported so far
        (:func:`posbias.fitters.fitter_from_dict` imports every shipped one first); called on a subclass the
        class name must match.
        """
        if not isinstance(d, dict) or not {"class", "params", "learned"} <= set(d):
            raise PosbiasError("fitter dict must have keys 'class', 'params' and 'learned'; pass to_dict() output")
        target: type[BaseFitter] = cls
        if cls is BaseFitter:
            registry = {sub.__name__: sub for sub in _all_subclasses(BaseFitter)}
            if d["class"] not in registry:
                raise PosbiasError(f"unknown fitter class {d['class']!r}; known: {sorted(registry)}")
            target = registry[d["class"]]
        elif d["class"] != cls.__name__:
            raise PosbiasError(f"fitter dict is a {d['class']!r}, not a {cls.__name__}; use {d['class']}.from_dict")
        params = dict(d["params"])
        unknown = set(params) - set(target._param_names())
        if unknown:
            raise PosbiasError(f"{target.__name__}.from_dict: unknown params {sorted(unknown)}")
        est = target(**params)
        learned = d["learned"]
        missing = [n for n in target._learned if n not in learned]
        if missing:
            raise PosbiasError(f"{target.__name__}.from_dict: learned values {missing} missing; re-export the fit")
        for name in target._learned:
            value = learned[name]
            if name in target._array_learned:
                setattr(est, name, np.asarray(value, dtype=np.float64))
            elif isinstance(value, bool):
                setattr(est, name, value)
            elif isinstance(value, int):
                setattr(est, name, int(value))
            else:
                fv = float(value)
                if not math.isfinite(fv):
                    raise PosbiasError(f"{target.__name__}.from_dict: learned {name} is not finite")
                setattr(est, name, fv)
        return est


def _all_subclasses(cls: type) -> list[type]:
    out: list[type] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out
