"""posbias.reports: the self-contained HTML and PDF reports and their figures.

Public names load lazily (matplotlib is imported on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["render_report", "check_html", "method_color"]

_LAZY = {
    "render_report": "posbias.reports.html",
    "check_html": "posbias.reports.browser",
    "method_color": "posbias.reports.palette",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'posbias.reports' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
