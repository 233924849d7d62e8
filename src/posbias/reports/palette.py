"""One colour per pruning method, shared by every plot of the HTML and PDF reports.

The base colours are the Okabe-Ito colour-blind-safe set, extended with a few darker tints for the
methods that extend another one (``posprune`` extends ``posprune-pbc``, ``adaptprune`` extends
``adaptprune-gaussian``). Reference curves (measured data, shallow vs deep layer) are drawn in greys and
told apart by line style, so that no hue means both "a method" and "a layer".
"""

from __future__ import annotations

import zlib

__all__ = [
    "METHOD_COLORS",
    "METHOD_LABELS",
    "REFERENCE",
    "LAYER_STYLES",
    "method_color",
    "method_label",
    "DIVERGING_CMAP",
    "SEQUENTIAL_CMAP",
]

#: method name -> colour (hex)
METHOD_COLORS: dict[str, str] = {
    "fastv": "#0072B2",  # blue
    "pore": "#D55E00",  # vermillion
    "posprune-pbc": "#009E73",  # bluish green
    "posprune": "#00573F",  # dark green (PBC + ARP + MMR)
    "posprune-pbc-2d": "#56B4E9",  # sky blue
    "adaptprune-gaussian": "#CC79A7",  # reddish purple
    "adaptprune": "#7E3A6E",  # dark purple (Gaussian + soft-NMS)
    "utp": "#E69F00",  # orange
    "pa-att": "#E69F00",  # UTP's position-agnostic attention: same colour as utp
    "random": "#8C8C8C",  # grey
    "full": "#000000",
}

#: method name -> label used in legends and tables
METHOD_LABELS: dict[str, str] = {
    "fastv": "FastV (raw attention)",
    "pore": "PoRe (A / P(x))",
    "posprune-pbc": "PosPrune PBC (A - ΔA(x))",
    "posprune": "PosPrune (PBC + ARP + MMR)",
    "posprune-pbc-2d": "PosPrune 2-D map",
    "adaptprune-gaussian": "AdaptPrune Gaussian (A · w(u, v))",
    "adaptprune": "AdaptPrune (Gaussian + soft-NMS)",
    "utp": "UTP (PA-Att + schedule)",
    "pa-att": "UTP PA-Att (position-agnostic)",
    "random": "random",
    "full": "unpruned",
}

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
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _FALLBACK[zlib.crc32(method.encode("utf-8")) % len(_FALLBACK)]


def method_label(method: str) -> str:
    """Legend label of ``method`` (the name itself for methods without a label)."""
    return METHOD_LABELS.get(method, method)
