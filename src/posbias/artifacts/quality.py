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

from collections.abc import Sequence
from typing import Any

from posbias.artifacts.entries import ENTRY_NAMES, find_entry, get_entry

__all__ = ["VERDICTS", "FITTED_METHODS", "R2_UNUSABLE", "R2_WEAK", "MIN_SAMPLES", "assess_entry", "assess_methods", "quality_of"]

#: verdicts, best first
VERDICTS: tuple[str, ...] = ("good", "weak", "unusable")


class _FittedNames(Sequence):
    """Live view of the registered entries that hold a fitted curve (``fastv`` has nothing fitted)."""

    def __getitem__(self, index: Any) -> Any:
        return tuple(n for n in ENTRY_NAMES if get_entry(n).fitted)[index]

    def __len__(self) -> int:
        return len(self[:])

    def __repr__(self) -> str:
        return repr(self[:])


#: method entries that hold a fitted curve (``fastv`` has nothing fitted)
FITTED_METHODS = _FittedNames()
#: at or below: the fit explains nothing of the mean curve (no better than a constant)
R2_UNUSABLE = 0.0
#: below: the fit follows the mean curve only loosely
R2_WEAK = 0.5
#: fewer samples than this: the curve is a small-sample estimate
MIN_SAMPLES = 16


def _interval(name: str, entry: dict[str, Any], stats: dict[str, Any]) -> tuple[bool | None, str]:
    """(sane, description) of the entry's interval: None when no interval was computed."""
    kind = find_entry(name)
    if kind is None or kind.interval is None:
        return None, "no interval for this fit"
    level = stats.get("level", 0.95)
    return kind.interval(entry, stats, f"{int(round(float(level) * 100))}%")


def assess_entry(name: str, entry: dict[str, Any], statistics: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``quality`` object of one method entry, or None for an entry with nothing fitted.

    Parameters
    ----------
    name : str
        Entry name (one registered in :mod:`posbias.artifacts.entries` with ``fitted=True``; others get None).
    entry : dict
        The method entry (with ``fit`` and ``goodness``).
    statistics : dict, optional
        The calibration's ``statistics`` section (intervals); without it the interval is "not computed".

    Returns
    -------
    dict or None
        ``{"verdict", "reason", "r2", "n_samples", "interval_ok", "interval"}``.
    """
    kind = find_entry(name)
    if kind is None or not kind.fitted or "goodness" not in entry:
        return None
    stats = statistics or {}
    goodness = entry["goodness"]
    r2 = float(goodness["r2"])
    n = int(goodness["n_samples"])
    ok, interval = _interval(name, entry, stats)
    learned = (entry.get("fit") or {}).get("learned") or {}
    verdict, reason = "good", f"R^2 {r2:.2f} against the mean curve on {n} samples"
    unusable = kind.unusable(learned) if kind.unusable is not None else None
    weak = kind.weak(learned) if kind.weak is not None else None
    if unusable:
        verdict, reason = "unusable", unusable
    elif r2 <= R2_UNUSABLE:
        verdict, reason = "unusable", f"R^2 {r2:.2f}: the fit explains none of the mean curve"
    elif ok is False:
        verdict, reason = "weak", interval
    elif r2 < R2_WEAK:
        verdict, reason = "weak", f"R^2 {r2:.2f} < {R2_WEAK}: the fit follows the mean curve only loosely"
    elif n < MIN_SAMPLES:
        verdict, reason = "weak", f"fitted on {n} samples (< {MIN_SAMPLES}): profile more samples"
    elif weak:
        verdict, reason = "weak", weak
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
