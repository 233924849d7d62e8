"""posbias.fitters: bias-curve estimators (scikit-learn contract, JSON round trip).

Submodules are imported lazily so that ``import posbias.fitters`` costs nothing until a fitter is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["BaseFitter", "PolynomialBiasFitter", "ExponentialBiasFitter", "mean_curve", "fitter_from_dict"]

_LAZY = {
    "BaseFitter": "posbias.fitters.base",
    "mean_curve": "posbias.fitters.base",
    "PolynomialBiasFitter": "posbias.fitters.polynomial",
    "ExponentialBiasFitter": "posbias.fitters.exponential",
}

if TYPE_CHECKING:  # pragma: no cover
    from posbias.fitters.base import BaseFitter, mean_curve
    from posbias.fitters.exponential import ExponentialBiasFitter
    from posbias.fitters.polynomial import PolynomialBiasFitter


def fitter_from_dict(d: dict[str, Any]) -> "BaseFitter":
    """Rebuild any fitter from its ``to_dict()`` payload (dispatches on ``d["class"]``)."""
    from posbias.fitters.base import BaseFitter

    return BaseFitter.from_dict(d)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'posbias.fitters' has no attribute {name!r}")
