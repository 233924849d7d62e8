"""The report as a list of sections of plain blocks, rendered to HTML (:mod:`.html`) and PDF (:mod:`.pdf`).

Blocks hold raw (unescaped) user strings; each renderer escapes for its own format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = ["Para", "Table", "Fig", "Section", "Block"]


@dataclass
class Para:
    """A paragraph. ``kind``: ``"p"``, ``"note"``, ``"good"`` / ``"bad"`` / ``"neutral"`` (verdicts),
    ``"missing"`` (an input is absent; ``command`` says what produces it)."""

    text: str
    kind: str = "p"
    command: str = ""


@dataclass
class Table:
    """A table of strings; ``pdf_max_rows`` rows at most in the PDF (the HTML shows all)."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    pdf_max_rows: int = 60


@dataclass
class Fig:
    """A figure: ``draw(container)`` draws into a Figure or SubFigure of ``size`` inches."""

    key: str
    caption: str
    alt: str
    draw: Callable[[Any], None]
    size: tuple[float, float]


Block = Union[Para, Table, Fig]


@dataclass
class Section:
    """One numbered section (one question a reader asks)."""

    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)
