"""The PDF report: A4 pages drawn with matplotlib (vector text and line art; heatmaps and photos as
embedded images), the same sections as the HTML, a title page with the contents and page numbers.

Layout: blocks (headings, paragraphs, tables, figures) are packed top to bottom onto A4 pages; a figure
that does not fit the rest of a page starts a new one; long tables continue on the next page (at most
``Table.pdf_max_rows`` rows, the HTML has them all). Each figure is drawn into a sub-figure of the page by
the same ``draw`` function the HTML uses.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posbias.reports.document import Fig, Para, Section, Table

__all__ = ["A4", "render_pdf"]

A4 = (8.27, 11.69)  # inches
_MARGIN_X = 0.5
_MARGIN_TOP = 0.6
_MARGIN_BOTTOM = 0.65
_WIDTH = A4[0] - 2 * _MARGIN_X  # 7.27 in
_HEIGHT = A4[1] - _MARGIN_TOP - _MARGIN_BOTTOM
_LINE = 0.165  # in, 8.5 pt text
_CHARS = 118  # characters per line of 8.5 pt text over the text width
_TABLE_LINE = 0.158


@dataclass
class _Item:
    kind: str  # "heading" | "para" | "table" | "fig"
    height: float
    payload: Any
    section: int = -1


def _wrap(text: str, width: int = _CHARS) -> list[str]:
    out: list[str] = []
    for para in str(text).split("\n"):
        out.extend(textwrap.wrap(para, width=width, break_long_words=True, break_on_hyphens=False) or [""])
    return out


def _para_lines(p: Para) -> list[str]:
    if p.kind == "missing":
        text = p.text + (f" Produce it with: {p.command}" if p.command else "")
        return _wrap(text, _CHARS - 4)
    return _wrap(p.text)


def _col_widths(header: list[str], rows: list[list[str]]) -> list[int]:
    """Characters per column, fitting the text width."""
    n = len(header)
    natural = [max([len(str(header[j]))] + [len(str(r[j])) for r in rows if j < len(r)]) for j in range(n)]
    natural = [max(4, min(w, 90)) for w in natural]
    budget = int(_CHARS * 1.12) - 2 * n
    if sum(natural) <= budget:
        return natural
    # shrink the widest columns first
    widths = list(natural)
    while sum(widths) > budget:
        j = max(range(n), key=lambda k: widths[k])
        widths[j] -= 1
    return widths


def _table_row_lines(row: list[str], widths: list[int]) -> list[list[str]]:
    cells = [textwrap.wrap(str(c), width=w, break_long_words=True) or [""] for c, w in zip(row, widths)]
    return [[c[i] if i < len(c) else "" for c in cells] for i in range(min(3, max(len(c) for c in cells)))]


def _table_items(t: Table) -> list[_Item]:
    rows = t.rows[: t.pdf_max_rows]
    widths = _col_widths(t.header, rows)
    lines = [_table_row_lines([str(c) for c in r], widths) for r in rows]
    header = _table_row_lines(t.header, widths)
    caption = list(t.caption and _wrap(t.caption) or [])
    if len(t.rows) > len(rows):
        caption.append(f"(first {len(rows)} of {len(t.rows)} rows; the HTML report lists all)")
    # split into chunks that fit a page
    items: list[_Item] = []
    per_page = int((_HEIGHT - 0.6) / _TABLE_LINE)
    chunk: list[list[list[str]]] = []
    n_lines = 0
    for rl in lines:
        if n_lines + len(rl) > per_page and chunk:
            items.append(_Item("table", (len(header) + n_lines) * _TABLE_LINE + 0.12, (header, chunk, widths, [])))
            chunk, n_lines = [], 0
        chunk.append(rl)
        n_lines += len(rl)
    items.append(_Item("table", (len(header) + n_lines + len(caption)) * _TABLE_LINE + 0.18, (header, chunk, widths, caption)))
    return items


def _items(sections: list[Section]) -> list[_Item]:
    out: list[_Item] = []
    for i, s in enumerate(sections):
        out.append(_Item("heading", 0.42, f"{i + 1}. {s.title}", section=i))
        for b in s.blocks:
            if isinstance(b, Para):
                lines = _para_lines(b)
                out.append(_Item("para", len(lines) * _LINE + 0.12 + (0.08 if b.kind != "p" else 0), (b, lines)))
            elif isinstance(b, Table):
                out.extend(_table_items(b))
            elif isinstance(b, Fig):
                w, h = b.size
                scale = min(1.0, _WIDTH / w)
                cap = _wrap(b.caption)
                out.append(_Item("fig", h * scale + len(cap) * _LINE + 0.12, (b, cap, h * scale)))
    return out


def _paginate(items: list[_Item]) -> list[list[_Item]]:
    pages: list[list[_Item]] = [[]]
    used = 0.0
    for k, it in enumerate(items):
        need = it.height
        if it.kind == "heading" and k + 1 < len(items):
            need += min(items[k + 1].height, 1.5)  # keep a heading with the start of what follows
        if it.kind == "heading" and pages[-1] and used > 0.55 * _HEIGHT:
            pages.append([])
            used = 0.0
        elif used + need > _HEIGHT and pages[-1]:
            pages.append([])
            used = 0.0
        pages[-1].append(it)
        used += it.height
    return pages


def _draw_text_block(sf: Any, lines: list[str], *, size: float = 8.5, color: str = "#1d1d1d", x: float = 0.0,
                     style: str = "normal", weight: str = "normal", height: float = 1.0) -> None:
    for i, line in enumerate(lines):
        sf.text(x, 1.0 - (0.06 + (i + 0.75) * _LINE) / height, line, fontsize=size, color=color, ha="left", va="baseline",
                style=style, weight=weight, transform=sf.transSubfigure, family="DejaVu Sans")


def _draw_item(sf: Any, it: _Item) -> None:
    from matplotlib.patches import Rectangle

    from posbias.reports.figures import RC

    h = it.height
    if it.kind == "heading":
        sf.text(0.0, 0.35, it.payload, fontsize=13, weight="bold", ha="left", va="baseline", transform=sf.transSubfigure)
        sf.add_artist(__import__("matplotlib.lines", fromlist=["Line2D"]).Line2D(
            [0, 1], [0.18, 0.18], color="#cccccc", lw=0.8, transform=sf.transSubfigure))
    elif it.kind == "para":
        p, lines = it.payload
        if p.kind in ("good", "bad", "neutral", "missing"):
            edge = {"good": "#009E73", "bad": "#B22222", "neutral": "#E69F00", "missing": "#9a9a9a"}[p.kind]
            sf.add_artist(Rectangle((0, 0.04 / h), 1, 1 - 0.06 / h, transform=sf.transSubfigure, facecolor="#f5f5f5",
                                    edgecolor=edge, lw=1.2, ls="--" if p.kind == "missing" else "-"))
            _draw_text_block(sf, lines, x=0.01, height=h)
        else:
            _draw_text_block(sf, lines, color="#555555" if p.kind == "note" else "#1d1d1d",
                             size=8 if p.kind == "note" else 8.5, height=h)
    elif it.kind == "table":
        header, chunk, widths, caption = it.payload
        total = float(sum(widths)) + 2 * len(widths)
        xs = [0.0]
        for w in widths[:-1]:
            xs.append(xs[-1] + (w + 2) / total)
        y = 0.06
        fs = 7.2 if sum(widths) > 100 else 7.6

        def line_at(cells: list[str], y_in: float, bold: bool) -> None:
            for x, c in zip(xs, cells):
                sf.text(x, 1.0 - y_in / h, c, fontsize=fs, ha="left", va="top", weight="bold" if bold else "normal",
                        transform=sf.transSubfigure, family="DejaVu Sans")

        for hl in header:
            line_at(hl, y, True)
            y += _TABLE_LINE
        sf.add_artist(__import__("matplotlib.lines", fromlist=["Line2D"]).Line2D(
            [0, 1], [1.0 - (y + 0.01) / h] * 2, color="#999999", lw=0.6, transform=sf.transSubfigure))
        for row in chunk:
            for rl in row:
                line_at(rl, y + 0.02, False)
                y += _TABLE_LINE
        for cl in caption:
            sf.text(0.0, 1.0 - (y + 0.06) / h, cl, fontsize=7.2, color="#555555", ha="left", va="top", style="italic",
                    transform=sf.transSubfigure)
            y += _TABLE_LINE
    elif it.kind == "fig":
        f, cap, fig_h = it.payload
        inner = sf.subfigures(2, 1, height_ratios=[fig_h, max(h - fig_h, 0.05)])
        w = min(_WIDTH, f.size[0])
        if w < _WIDTH - 0.05:
            side = (_WIDTH - w) / 2
            holder = inner[0].subfigures(1, 3, width_ratios=[side, w, side])[1]
        else:
            holder = inner[0]
        import matplotlib

        with matplotlib.rc_context(RC):
            f.draw(holder)
        _draw_text_block(inner[1], cap, size=7.8, color="#444444", style="italic", height=max(h - fig_h, 0.05))


def render_pdf(sections: list[Section], title: str, out_path: str | Path, *, subtitle: str = "") -> Path:
    """Write the sections as a multi-page A4 PDF.

    Parameters
    ----------
    sections : list of Section
    title, subtitle : str
    out_path : path

    Returns
    -------
    Path
    """
    import datetime as _dt

    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    from posbias.reports.figures import RC

    items = _items(sections)
    pages = _paginate(items)
    first_page = {}
    for pno, page in enumerate(pages):
        for it in page:
            if it.kind == "heading" and it.section not in first_page:
                first_page[it.section] = pno + 2  # +1 title page, +1 one-based
    out = Path(out_path)
    total = len(pages) + 1
    # drawn in memory, then written whole (posbias.atomic): a kill or a full disk never leaves half a PDF
    buf = io.BytesIO()
    with matplotlib.rc_context(RC), PdfPages(buf, metadata={"Title": title, "Creator": "posbias"}) as pdf:
        # title page with the contents
        page = Figure(figsize=A4)
        page.text(_MARGIN_X / A4[0], 1 - 1.0 / A4[1], title, fontsize=17, weight="bold", ha="left", va="top")
        y = 1.45
        for line in _wrap(subtitle, 100):
            page.text(_MARGIN_X / A4[0], 1 - y / A4[1], line, fontsize=9.5, color="#555555", ha="left", va="top")
            y += 0.2
        y += 0.35
        page.text(_MARGIN_X / A4[0], 1 - y / A4[1], "Contents", fontsize=12, weight="bold", ha="left", va="top")
        y += 0.35
        for i, s in enumerate(sections):
            page.text(_MARGIN_X / A4[0] + 0.02, 1 - y / A4[1], f"{i + 1}. {s.title}", fontsize=10, ha="left", va="top")
            page.text(1 - _MARGIN_X / A4[0], 1 - y / A4[1], str(first_page.get(i, "")), fontsize=10, ha="right", va="top")
            y += 0.27
        page.text(_MARGIN_X / A4[0], _MARGIN_BOTTOM / 2 / A4[1],
                  f"generated {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by posbias", fontsize=7.5,
                  color="#777777", ha="left")
        pdf.savefig(page)
        for pno, items_on_page in enumerate(pages):
            page = Figure(figsize=A4, layout="constrained")
            page.get_layout_engine().set(w_pad=0.02, h_pad=0.02, hspace=0.0, wspace=0.0)
            used = sum(it.height for it in items_on_page)
            cols = page.subfigures(1, 3, width_ratios=[_MARGIN_X, _WIDTH, _MARGIN_X])
            ratios = [_MARGIN_TOP] + [it.height for it in items_on_page] + [max(_HEIGHT - used, 0.01) + _MARGIN_BOTTOM]
            rows = cols[1].subfigures(len(ratios), 1, height_ratios=ratios)
            for sf, it in zip(rows[1:-1], items_on_page):
                _draw_item(sf, it)
            page.text(0.5, _MARGIN_BOTTOM / 2 / A4[1], f"{title} — page {pno + 2} of {total}", fontsize=7, color="#777777", ha="center")
            pdf.savefig(page)
    from posbias.atomic import atomic_write_bytes

    return atomic_write_bytes(out, buf.getvalue())
