"""The calibration-entry registry: each entry of a calibration's ``methods`` declared once. stdlib only.

An entry (``methods["pore"]``, ``methods["posprune-pbc"]`` ...) is what the fit stage writes and a pruning
method reads. Its :class:`CalibrationEntry` says what :func:`posbias.artifacts.calibration.check_semantics`
checks beyond the generic rules (layers inside the model, ``domain`` equal to the fit's), how
:mod:`posbias.artifacts.quality` judges it, and the label and colour the reports give it. The built-in
declarations live in :mod:`posbias.artifacts.builtin_entries` and are imported on first use.

Adding an entry: declare a :class:`CalibrationEntry` and either add one line to ``_BUILTIN`` (shipped entries)
or call :func:`register_entry` (anywhere else).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posbias._registry import NamesView, Registry

__all__ = ["CalibrationEntry", "Fail", "register_entry", "unregister_entry", "get_entry", "find_entry",
           "known_entries", "ENTRY_NAMES"]

#: ``fail(json_path_tuple, message)``: raise the calibration's one-line SchemaError at that path
Fail = Callable[[tuple[Any, ...], str], None]


@dataclass(frozen=True)
class CalibrationEntry:
    """One kind of calibration entry.

    Attributes
    ----------
    name : str
        The key under ``methods`` in the calibration.
    label, colour : str
        Legend label and hex colour in the reports.
    fitted : bool
        The entry holds a fitted curve with ``goodness`` and gets a quality verdict (``fastv`` holds none).
    check : callable, optional
        ``check(name, entry, doc, fail)``: cross-field rules the JSON Schema cannot express; call ``fail`` with
        the JSON path and the reason.
    interval : callable, optional
        ``interval(entry, statistics, pct) -> (ok or None, description)``: whether the entry's confidence
        interval (from the calibration's ``statistics``) supports it; None when none was computed.
    unusable, weak : callable, optional
        ``rule(learned) -> reason or None`` on ``fit.learned``: an entry-specific reason to judge the fit
        unusable (checked before the generic R^2 rule) or weak (checked after every generic rule).
    """

    name: str
    label: str
    colour: str
    fitted: bool = True
    check: Callable[[str, dict[str, Any], dict[str, Any], Fail], None] | None = None
    interval: Callable[[dict[str, Any], dict[str, Any], str], tuple[bool | None, str]] | None = None
    unusable: Callable[[dict[str, Any]], str | None] | None = None
    weak: Callable[[dict[str, Any]], str | None] | None = None


_ENTRIES: Registry[CalibrationEntry] = Registry("calibration entry", CalibrationEntry, {
    "fastv": "posbias.artifacts.builtin_entries:FASTV",
    "pore": "posbias.artifacts.builtin_entries:PORE",
    "posprune-pbc": "posbias.artifacts.builtin_entries:POSPRUNE_PBC",
    "adaptprune-gaussian": "posbias.artifacts.builtin_entries:ADAPTPRUNE_GAUSSIAN",
    "posprune-pbc-2d": "posbias.artifacts.builtin_entries:POSPRUNE_PBC_2D",
})

#: live view of the registered entry names, in registration order
ENTRY_NAMES = NamesView(_ENTRIES)


def register_entry(entry: CalibrationEntry, *, replace: bool = False) -> CalibrationEntry:
    """Register a calibration entry kind (``replace=True`` to replace an existing name)."""
    return _ENTRIES.register(entry, replace=replace)


def unregister_entry(name: str) -> None:
    """Remove a registered entry kind (no error when absent)."""
    _ENTRIES.unregister(name)


def get_entry(name: str) -> CalibrationEntry:
    """The declaration of entry ``name``; PosbiasError for an unknown name."""
    return _ENTRIES.get(name)


def find_entry(name: str) -> CalibrationEntry | None:
    """The declaration of entry ``name``, or None."""
    return _ENTRIES.find(name)


def known_entries() -> tuple[str, ...]:
    """Registered entry names, built-ins first."""
    return _ENTRIES.names()
