"""Quality and verdict of each fitted calibration entry (``methods[name].quality``). stdlib only.

A fitted curve can be shipped although it carries no information: a Gaussian centre weight with amplitude 0
(flat), an exponential whose decay rate's interval spans zero (direction unknown), a polynomial that explains
a quarter of the mean curve. :func:`assess_entry` turns the numbers a fit already records into one of three
verdicts with a one-line reason, written into the artifact by ``profile-bias fit`` and read by the runtime
(which warns once for ``weak`` and refuses ``unusable`` unless forced). The rules are in
docs/calibration.md ("quality"); the thresholds are :data:`R2_UNUSABLE`, :data:`R2_WEAK` and
:data:`MIN_SAMPLES`.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["VERDICTS", "FITTED_METHODS", "R2_UNUSABLE", "R2_WEAK", "MIN_SAMPLES", "assess_entry", "assess_methods", "quality_of"]

#: verdicts, best first
VERDICTS: tuple[str, ...] = ("good", "weak", "unusable")
#: method entries that hold a fitted curve (``fastv`` has nothing fitted)
FITTED_METHODS: tuple[str, ...] = ("posprune-pbc", "posprune-pbc-2d", "pore", "adaptprune-gaussian")
#: at or below: the fit explains nothing of the mean curve (no better than a constant)
R2_UNUSABLE = 0.0
#: below: the fit follows the mean curve only loosely
R2_WEAK = 0.5
#: fewer samples than this: the curve is a small-sample estimate
MIN_SAMPLES = 16


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _g(v: float) -> str:
    return f"{v:.3g}"


def _interval(name: str, entry: dict[str, Any], stats: dict[str, Any]) -> tuple[bool | None, str]:
    """(sane, description) of the entry's interval: None when no interval was computed."""
    level = stats.get("level", 0.95)
    pct = f"{int(round(float(level) * 100))}%"
    if name == "pore":
        b = ((stats.get("pore_inference") or {}).get("params") or {}).get("b")
        if not b or not (_finite(b.get("low")) and _finite(b.get("high"))):
            return None, "no interval computed (fit without statistics)"
        lo, hi = float(b["low"]), float(b["high"])
        if lo <= 0.0 <= hi:
            return False, f"b's {pct} CI [{_g(lo)}, {_g(hi)}] spans 0: the direction of the decay is not settled"
        return True, f"b's {pct} CI [{_g(lo)}, {_g(hi)}] excludes 0"
    if name == "posprune-pbc":
        band = (stats.get("pbc_inference") or {}).get("band")
        if not band or not band.get("fit"):
            return None, "no interval computed (fit without statistics)"
        fit = [float(v) for v in band["fit"]]
        width = max(float(h) - float(lo_) for lo_, h in zip(band["low"], band["high"]))
        span = max(fit) - min(fit)
        if not (span > 0 and width < span):
            return False, f"the {pct} band of the curve (up to {_g(width)} wide) is wider than the curve's range {_g(span)}"
        return True, f"the {pct} band (up to {_g(width)} wide) is narrower than the curve's range {_g(span)}"
    return None, "no interval for this fit"


def assess_entry(name: str, entry: dict[str, Any], statistics: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``quality`` object of one method entry, or None for an entry with nothing fitted.

    Parameters
    ----------
    name : str
        Method name (``"pore"``, ``"posprune-pbc"``, ``"posprune-pbc-2d"``, ``"adaptprune-gaussian"``).
    entry : dict
        The method entry (with ``fit`` and ``goodness``).
    statistics : dict, optional
        The calibration's ``statistics`` section (intervals); without it the interval is "not computed".

    Returns
    -------
    dict or None
        ``{"verdict", "reason", "r2", "n_samples", "interval_ok", "interval"}``.
    """
    if name not in FITTED_METHODS or "goodness" not in entry:
        return None
    stats = statistics or {}
    goodness = entry["goodness"]
    r2 = float(goodness["r2"])
    n = int(goodness["n_samples"])
    ok, interval = _interval(name, entry, stats)
    learned = (entry.get("fit") or {}).get("learned") or {}
    verdict, reason = "good", f"R^2 {r2:.2f} against the mean curve on {n} samples"
    if name == "adaptprune-gaussian" and not float(learned.get("amplitude_", 1.0)) > 0.0:
        verdict, reason = "unusable", "Gaussian amplitude 0: the mean attention has no centre peak, so the weight is flat"
    elif r2 <= R2_UNUSABLE:
        verdict, reason = "unusable", f"R^2 {r2:.2f}: the fit explains none of the mean curve"
    elif ok is False:
        verdict, reason = "weak", interval
    elif r2 < R2_WEAK:
        verdict, reason = "weak", f"R^2 {r2:.2f} < {R2_WEAK}: the fit follows the mean curve only loosely"
    elif n < MIN_SAMPLES:
        verdict, reason = "weak", f"fitted on {n} samples (< {MIN_SAMPLES}): profile more samples"
    elif name == "adaptprune-gaussian" and learned.get("centre_peak_") is False:
        verdict, reason = "weak", "the mean attention map has no centre peak; the weight is imposed, not measured"
    return {"verdict": verdict, "reason": reason, "r2": r2, "n_samples": n, "interval_ok": ok, "interval": interval}


def assess_methods(methods: dict[str, Any], statistics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Set ``quality`` on every fitted entry of ``methods`` (in place); return ``methods``."""
    for name, entry in methods.items():
        q = assess_entry(name, entry, statistics)
        if q is not None:
            entry["quality"] = q
    return methods


def quality_of(entry: dict[str, Any]) -> tuple[str, str]:
    """(verdict, reason) of an entry; ``("not assessed", ...)`` for entries written without a quality."""
    q = entry.get("quality")
    if not q:
        return "not assessed", "the calibration predates quality verdicts (schema_version 1) or has nothing fitted"
    return str(q["verdict"]), str(q["reason"])
