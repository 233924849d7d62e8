"""One colour per pruning method, shared by every plot of the HTML and PDF reports.

Labels and colours are declared with each method (:mod:`posbias.runtime.registry`) and each calibration entry
(:mod:`posbias.artifacts.entries`); this module reads them, adds the report-only names (``pa-att``, ``random``,
``full``) and gives any other name a stable fallback colour. The built-in colours are the Okabe-Ito
colour-blind-safe set, extended with a few darker tints for the methods that extend another one (``posprune``
extends ``posprune-pbc``, ``adaptprune`` extends ``adaptprune-gaussian``). Reference curves (measured data, shallow vs deep layer) are drawn in greys and
told apart by line style, so that no hue means both "a method" and "a layer".
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

__all__ = [
    "METHOD_COLORS",
    "METHOD_LABELS",
    "REFERENCE",
    "LAYER_STYLES",
    "method_color",
    "method_label",
    "method_names",
    "DIVERGING_CMAP",
    "SEQUENTIAL_CMAP",
]

#: report-only names (not pruning methods, not calibration entries): name -> (label, colour, drawn before)
_EXTRAS: dict[str, tuple[str, str, str | None]] = {
    "pa-att": ("UTP PA-Att (position-agnostic)", "#E69F00", "utp"),  # UTP's position-agnostic attention: utp's colour
    "random": ("random", "#8C8C8C", None),  # grey
    "full": ("unpruned", "#000000", None),
}


def method_names() -> list[str]:
    """Every name the reports give a colour and label, in display order.

    The registered pruning methods in registration order, each preceded by the calibration entry it reads (when
    that entry has another name and is not listed yet) and by the report-only names drawn before it (``pa-att``
    before ``utp``); then the calibration entries no method reads; then ``random`` and ``full``.
    """
    from posbias.artifacts.entries import known_entries
    from posbias.runtime.registry import get_method, known_methods

    out: list[str] = []
    for name in known_methods():
        entry = get_method(name).entry
        before = [entry] if entry is not None else []
        before += [x for x, (_, _, nxt) in _EXTRAS.items() if nxt == name]
        out += [b for b in before if b not in out]
        if name not in out:
            out.append(name)
    out += [e for e in known_entries() if e not in out]
    out += [x for x in _EXTRAS if x not in out]
    return out


def _lookup(name: str) -> tuple[str, str | None]:
    """(label, colour or None) of a registered method, calibration entry or report-only name; (name, None) else."""
    from posbias.artifacts.entries import find_entry
    from posbias.runtime.registry import find_method

    method = find_method(name)
    if method is not None:
        return method.report_label(), method.report_colour()
    entry = find_entry(name)
    if entry is not None:
        return entry.label, entry.colour
    if name in _EXTRAS:
        return _EXTRAS[name][0], _EXTRAS[name][1]
    return name, None


class _View(Mapping):
    """A read-only name -> label / colour mapping over :func:`method_names`, following later registrations."""

    def __init__(self, part: int) -> None:
        self._part = part

    def __getitem__(self, name: str) -> str:
        value = _lookup(name)[self._part] if isinstance(name, str) else None
        if value is None or name not in method_names():
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(method_names())

    def __len__(self) -> int:
        return len(method_names())


#: method name -> colour (hex): every registered method and calibration entry, plus pa-att, random and full
METHOD_COLORS: Mapping[str, str] = _View(1)

#: method name -> label used in legends and tables
METHOD_LABELS: Mapping[str, str] = _View(0)

#: colours of reference curves (not methods)
REFERENCE: dict[str, str] = {"measured": "#333333", "band": "#9E9E9E", "zero": "#BBBBBB", "threshold": "#B22222"}

#: line styles of the shallow and deep layer curves
LAYER_STYLES: dict[str, dict[str, object]] = {
    "shallow": {"color": "#222222", "linestyle": "-"},
    "deep": {"color": "#7A7A7A", "linestyle": "--"},
}

#: colour maps: attention maps (non-negative) and signed maps (residuals, corrected differences)
SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"

_FALLBACK = ("#332288", "#117733", "#999933", "#882255", "#44AA99", "#AA4499", "#661100", "#6699CC")


def method_color(method: str) -> str:
    """Colour of ``method``: its fixed colour, or a stable pick from a fallback list for other names.

    Parameters
    ----------
    method : str
        Method name as in the calibration or the evaluation JSON.

    Returns
    -------
    str
        Hex colour; the same name always gets the same colour.
    """
    colour = _lookup(method)[1]
    if colour is not None:
        return colour
    return _FALLBACK[zlib.crc32(method.encode("utf-8")) % len(_FALLBACK)]


def method_label(method: str) -> str:
    """Legend label of ``method`` (the name itself for methods without a label)."""
    return _lookup(method)[0]
