"""posbias.reports: the self-contained HTML and PDF reports and their figures.

Public names load lazily (matplotlib is imported on first use).
"""

from __future__ import annotations

from posbias._lazy import lazy_getattr

__all__ = ["render_report", "check_html", "method_color"]

_LAZY = {
    "render_report": "posbias.reports.html",
    "check_html": "posbias.reports.browser",
    "method_color": "posbias.reports.palette",
}

__getattr__ = lazy_getattr(__name__, _LAZY)
