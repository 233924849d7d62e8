"""The calibration entries posbias ships (registered in :mod:`posbias.artifacts.entries`). stdlib only.

Colours are the Okabe-Ito colour-blind-safe set (see :mod:`posbias.reports.palette`).
"""

from __future__ import annotations

import math
from typing import Any

from posbias.artifacts.entries import CalibrationEntry, Fail

__all__ = ["FASTV", "PORE", "POSPRUNE_PBC", "POSPRUNE_PBC_2D", "ADAPTPRUNE_GAUSSIAN"]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _g(v: float) -> str:
    return f"{v:.3g}"


# ---------------------------------------------------------------------------------------------- shared rules
def _layers_ordered(name: str, entry: dict[str, Any], fail: Fail) -> None:
    if entry["shallow_layer"] >= entry["deep_layer"]:
        fail(("methods", name, "deep_layer"),
             f"deep_layer {entry['deep_layer']} must be > shallow_layer {entry['shallow_layer']}")


def _grid_matches_model(name: str, entry: dict[str, Any], doc: dict[str, Any], fail: Fail) -> None:
    if entry["grid"] is not None and doc["model"]["grid"] is not None and list(entry["grid"]) != list(doc["model"]["grid"]):
        fail(("methods", name, "grid"), f"{entry['grid']} differs from model.grid {doc['model']['grid']}")


def _coef_count(name: str, entry: dict[str, Any], n_terms: int, fail: Fail, what: str) -> None:
    if len(entry["fit"]["learned"]["coef_"]) != n_terms:
        fail(("methods", name, "fit", "learned", "coef_"), f"needs {n_terms} coefficients for {what}")


# ---------------------------------------------------------------------------------------------- PoRe
def _pore_interval(entry: dict[str, Any], stats: dict[str, Any], pct: str) -> tuple[bool | None, str]:
    b = ((stats.get("pore_inference") or {}).get("params") or {}).get("b")
    if not b or not (_finite(b.get("low")) and _finite(b.get("high"))):
        return None, "no interval computed (fit without statistics)"
    lo, hi = float(b["low"]), float(b["high"])
    if lo <= 0.0 <= hi:
        return False, f"b's {pct} CI [{_g(lo)}, {_g(hi)}] spans 0: the direction of the decay is not settled"
    return True, f"b's {pct} CI [{_g(lo)}, {_g(hi)}] excludes 0"


# ---------------------------------------------------------------------------------------------- PosPrune PBC
def _pbc_check(name: str, entry: dict[str, Any], doc: dict[str, Any], fail: Fail) -> None:
    _layers_ordered(name, entry, fail)
    degree = entry["fit"]["params"]["degree"]
    _coef_count(name, entry, degree + 1, fail, f"degree {degree}")
    deg = doc.get("statistics", {}).get("pbc_degree")
    if deg is not None and deg["mode"] == "auto" and degree != deg["chosen"]:
        fail(("statistics", "pbc_degree", "chosen"), f"degree {deg['chosen']} differs from the fitted degree {degree}")


def _pbc_interval(entry: dict[str, Any], stats: dict[str, Any], pct: str) -> tuple[bool | None, str]:
    band = (stats.get("pbc_inference") or {}).get("band")
    if not band or not band.get("fit"):
        return None, "no interval computed (fit without statistics)"
    fit = [float(v) for v in band["fit"]]
    width = max(float(h) - float(lo_) for lo_, h in zip(band["low"], band["high"]))
    span = max(fit) - min(fit)
    if not (span > 0 and width < span):
        return False, f"the {pct} band of the curve (up to {_g(width)} wide) is wider than the curve's range {_g(span)}"
    return True, f"the {pct} band (up to {_g(width)} wide) is narrower than the curve's range {_g(span)}"


def _pbc_2d_check(name: str, entry: dict[str, Any], doc: dict[str, Any], fail: Fail) -> None:
    _layers_ordered(name, entry, fail)
    kind, degree = entry["fit"]["params"]["kind"], entry["fit"]["params"]["degree"]
    n_terms = 2 * degree + 1 if kind == "separable" else (degree + 1) * (degree + 2) // 2
    _coef_count(name, entry, n_terms, fail, f"a {kind} surface of degree {degree}")
    _grid_matches_model(name, entry, doc, fail)


# ---------------------------------------------------------------------------------------------- AdaptPrune
def _gaussian_check(name: str, entry: dict[str, Any], doc: dict[str, Any], fail: Fail) -> None:
    _grid_matches_model(name, entry, doc, fail)
    if "mask" in entry and (entry["grid"] is None or len(entry["mask"]) != entry["grid"][0] * entry["grid"][1]):
        fail(("methods", name, "mask"), "needs rows * cols values of a fixed grid (raster order)")


def _gaussian_unusable(learned: dict[str, Any]) -> str | None:
    if not float(learned.get("amplitude_", 1.0)) > 0.0:
        return "Gaussian amplitude 0: the mean attention has no centre peak, so the weight is flat"
    return None


def _gaussian_weak(learned: dict[str, Any]) -> str | None:
    if learned.get("centre_peak_") is False:
        return "the mean attention map has no centre peak; the weight is imposed, not measured"
    return None


FASTV = CalibrationEntry("fastv", label="FastV (raw attention)", colour="#0072B2", fitted=False)
PORE = CalibrationEntry("pore", label="PoRe (A / P(x))", colour="#D55E00", interval=_pore_interval)
POSPRUNE_PBC = CalibrationEntry("posprune-pbc", label="PosPrune PBC (A - ΔA(x))", colour="#009E73", check=_pbc_check,
                                interval=_pbc_interval)
POSPRUNE_PBC_2D = CalibrationEntry("posprune-pbc-2d", label="PosPrune 2-D map", colour="#56B4E9", check=_pbc_2d_check)
ADAPTPRUNE_GAUSSIAN = CalibrationEntry("adaptprune-gaussian", label="AdaptPrune Gaussian (A · w(u, v))", colour="#CC79A7",
                                       check=_gaussian_check, unusable=_gaussian_unusable, weak=_gaussian_weak)
