"""The runtime's use of the calibration's quality verdicts: warn once for a weak entry, refuse an unusable one.

``profile-bias fit`` writes ``methods[name].quality`` (docs/calibration.md); :func:`check_entry_quality` is
called by :func:`posbias.runtime.enable_pruning` before anything is hooked. Calibrations without a quality
(schema_version 1) pass silently.
"""

from __future__ import annotations

import warnings
from typing import Any

from posbias.errors import PosbiasError

__all__ = ["CalibrationQualityWarning", "check_entry_quality"]

_WARNED: set[tuple[str, str, str]] = set()


class CalibrationQualityWarning(UserWarning):
    """A pruning method uses a calibration entry whose fit was judged ``weak``."""


def check_entry_quality(calibration: Any, method: str | None, *, params: dict[str, Any] | None = None,
                        force: bool = False) -> str | None:
    """Check the quality of the entry ``method`` would use; return its verdict (None: nothing to check).

    Parameters
    ----------
    calibration : Calibration or None
    method : str or None
        Pruning method (None: the calibration's default).
    params : dict, optional
        The method's resolved parameters or overrides (the method's ``uses_entry`` decides whether they read
        the entry: AdaptPrune without its Gaussian uses none).
    force : bool
        Use an ``unusable`` entry anyway (with a warning) instead of refusing it.

    Raises
    ------
    PosbiasError
        The entry is ``unusable`` and ``force`` is False.
    """
    from posbias.runtime.registry import find_method

    if calibration is None:
        return None
    if method is None:
        method = str(calibration.defaults.get("method", ""))
    spec = find_method(method)
    if spec is None or not spec.reads_entry(params or {}):
        return None  # no entry read (e.g. AdaptPrune without its Gaussian: params={"gaussian": False})
    name = spec.entry
    methods = calibration.methods
    if name not in methods:
        return None
    q = methods[name].get("quality")
    if not q:
        return None
    verdict, reason = str(q["verdict"]), str(q["reason"])
    if verdict == "unusable" and not force:
        raise PosbiasError(
            f"calibration {calibration.source}: its {name!r} entry, which method {method!r} uses, is unusable ({reason}); "
            "recalibrate with more samples, choose another method, or pass force=True to use it anyway"
        )
    if verdict in ("weak", "unusable"):
        key = (str(calibration.source), calibration.fingerprint, name)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"calibration {calibration.source}: the {name!r} entry used by method {method!r} is {verdict} ({reason}); "
                "its corrections may do little or harm; profile more samples to firm it up",
                CalibrationQualityWarning,
                stacklevel=3,
            )
    return verdict
