"""posbias.fitters: bias-curve estimators (scikit-learn contract, JSON round trip) and their statistics.

Submodules are imported lazily so that ``import posbias.fitters`` costs nothing until a fitter is used.

- estimators: :class:`PolynomialBiasFitter` (PosPrune PBC), :class:`ExponentialBiasFitter` (PoRe),
  :class:`GaussianCentreFitter` (AdaptPrune), :class:`SurfaceBiasFitter` (2-D maps);
- statistics: :func:`bias_consistency`, :func:`select_polynomial_degree`, :func:`compare_bias_maps`,
  :func:`polynomial_inference`, :func:`exponential_inference`, :func:`density_test`.
"""

from __future__ import annotations

from posbias._lazy import lazy_getattr
from typing import TYPE_CHECKING, Any

__all__ = [
    "BaseFitter",
    "PolynomialBiasFitter",
    "ExponentialBiasFitter",
    "GaussianCentreFitter",
    "SurfaceBiasFitter",
    "SampleCurves",
    "mean_curve",
    "fitter_from_dict",
    "bias_consistency",
    "select_polynomial_degree",
    "compare_bias_maps",
    "polynomial_inference",
    "exponential_inference",
    "density_test",
]

_LAZY = {
    "BaseFitter": "posbias.fitters.base",
    "mean_curve": "posbias.fitters.base",
    "PolynomialBiasFitter": "posbias.fitters.polynomial",
    "ExponentialBiasFitter": "posbias.fitters.exponential",
    "GaussianCentreFitter": "posbias.fitters.gaussian",
    "SurfaceBiasFitter": "posbias.fitters.surface",
    "SampleCurves": "posbias.fitters.curves",
    "bias_consistency": "posbias.fitters.consistency",
    "select_polynomial_degree": "posbias.fitters.selection",
    "compare_bias_maps": "posbias.fitters.surface",
    "polynomial_inference": "posbias.fitters.inference",
    "exponential_inference": "posbias.fitters.inference",
    "density_test": "posbias.fitters.density",
}

if TYPE_CHECKING:  # pragma: no cover
    from posbias.fitters.base import BaseFitter, mean_curve
    from posbias.fitters.consistency import bias_consistency
    from posbias.fitters.curves import SampleCurves
    from posbias.fitters.density import density_test
    from posbias.fitters.exponential import ExponentialBiasFitter
    from posbias.fitters.gaussian import GaussianCentreFitter
    from posbias.fitters.inference import exponential_inference, polynomial_inference
    from posbias.fitters.polynomial import PolynomialBiasFitter
    from posbias.fitters.selection import select_polynomial_degree
    from posbias.fitters.surface import SurfaceBiasFitter, compare_bias_maps


def fitter_from_dict(d: dict[str, Any]) -> "BaseFitter":
    """Rebuild any fitter from its ``to_dict()`` payload (dispatches on ``d["class"]``)."""
    import posbias.fitters.exponential  # noqa: F401  (the shipped subclasses, for the dispatch)
    import posbias.fitters.gaussian  # noqa: F401
    import posbias.fitters.polynomial  # noqa: F401
    import posbias.fitters.surface  # noqa: F401
    from posbias.fitters.base import BaseFitter

    return BaseFitter.from_dict(d)


__getattr__ = lazy_getattr(__name__, _LAZY)
