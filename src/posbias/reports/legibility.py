"""Is a rendered figure legible? Text that overlaps text, text or legends over a plot area, text cut off.

:func:`layout_problems` draws a matplotlib figure with the Agg renderer and checks the window extents
(pixels) of every text a reader sees: titles, axis labels, the tick labels actually drawn, offset texts
("1e-7"), colour-bar labels, annotations, legend entries and figure texts. It reports

- two texts whose boxes intersect;
- a title, axis label, tick label or legend over the plot area (the axes patch) of any axes; annotations
  placed inside their own axes are allowed there, not over another axes;
- a text outside the figure (cut off in the PNG and the PDF).

The report tests render every figure of a report with it (tests/test_figures_legible.py), and
``benchmarks/bench_report.py`` can print it for a real store.
"""

from __future__ import annotations

from typing import Any

__all__ = ["layout_problems", "visible_texts", "report_figure_problems"]


def _axis_texts(axis: Any) -> list[Any]:
    out = []
    for tick in axis._update_ticks():  # the ticks matplotlib draws (inside the view interval)
        for lab in (tick.label1, tick.label2):
            if lab.get_visible() and lab.get_text().strip():
                out.append(lab)
    for t in (axis.label, axis.get_offset_text()):
        if t.get_visible() and t.get_text().strip():
            out.append(t)
    return out


def visible_texts(fig: Any) -> list[tuple[Any, Any, str]]:
    """(text artist, owning axes or None, role) for every text drawn; role: "frame", "inside" or "legend"."""
    from matplotlib.axes import Axes

    out: list[tuple[Any, Any, str]] = []
    axes = [a for a in fig.findobj(lambda o: isinstance(o, Axes)) if a.get_visible()]
    for ax in axes:
        for t in (ax.title, ax._left_title, ax._right_title):
            if t.get_visible() and t.get_text().strip():
                out.append((t, ax, "frame"))
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_visible():
                out.extend((t, ax, "frame") for t in _axis_texts(axis))
        for t in ax.texts:
            if t.get_visible() and t.get_text().strip():
                out.append((t, ax, "inside"))
        leg = ax.get_legend()
        if leg is not None and leg.get_visible():
            out.append((leg, ax, "legend"))
    for leg in getattr(fig, "legends", []):
        if leg.get_visible():
            out.append((leg, None, "legend"))
    for t in getattr(fig, "texts", []):
        if t.get_visible() and t.get_text().strip():
            out.append((t, None, "frame"))
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_visible() and sup.get_text().strip():
        out.append((sup, None, "frame"))
    return out


def _label(artist: Any, ax: Any) -> str:
    from matplotlib.legend import Legend

    if isinstance(artist, Legend):
        what = "legend"
    else:
        what = repr(artist.get_text()[:40])
    title = ax.get_title() if ax is not None else ""
    if ax is not None and not title and ax.get_label() == "<colorbar>":
        title = "colour bar"
    where = f" (axes {title[:30]!r})" if title else (" (figure)" if ax is None else "")
    return what + where


def _label_axes(ax: Any) -> str:
    if ax.get_label() == "<colorbar>":
        return "a colour bar"
    return f"axes {ax.get_title()[:30]!r}"


def _intersect(a: Any, b: Any, tol: float) -> bool:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w > tol and h > tol


def layout_problems(fig: Any, *, tol: float = 1.0) -> list[str]:
    """Legibility problems of a figure (empty list: none); ``tol`` pixels of overlap are forgiven.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        A figure already drawn into (pyplot-free figures get an Agg canvas here).
    tol : float
        Overlap in pixels (both directions) below which two boxes count as touching, not overlapping.

    Returns
    -------
    list of str
        One line per problem.
    """
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    items = visible_texts(fig)
    boxes = [(art, ax, role, art.get_window_extent(renderer)) for art, ax, role in items]
    problems: list[str] = []
    for i in range(len(boxes)):
        a, ax_a, role_a, ba = boxes[i]
        for j in range(i + 1, len(boxes)):
            b, ax_b, role_b, bb = boxes[j]
            if _intersect(ba, bb, tol):
                problems.append(f"text {_label(a, ax_a)} overlaps text {_label(b, ax_b)}")
    areas = [(ax, ax.get_window_extent(renderer)) for ax in fig.findobj(lambda o: isinstance(o, Axes))
             if ax.get_visible() and ax.axison]
    for art, ax, role, box in boxes:
        for other, area in areas:
            if role == "inside" and other is ax:
                continue
            if _intersect(box, area, tol):
                problems.append(f"text {_label(art, ax)} lies over the plot area of {_label_axes(other)}")
    fb = fig.bbox
    for art, ax, role, box in boxes:
        if box.x0 < fb.x0 - tol or box.y0 < fb.y0 - tol or box.x1 > fb.x1 + tol or box.y1 > fb.y1 + tol:
            problems.append(f"text {_label(art, ax)} is cut off by the figure's edge")
    return problems


def report_figure_problems(store_path: Any, calibration_path: Any, evaluation: Any = None, *,
                           n_pictures: int = 3) -> dict[str, list[str]]:
    """Every figure of the report of a store and calibration, drawn at its report size: key -> problems.

    Also returns the figures drawn (key ``"_figures"`` lists their keys in order, for counting).
    """
    import matplotlib

    from posbias.reports.data import collect
    from posbias.reports.document import Fig
    from posbias.reports.figures import RC, new_figure
    from posbias.reports.sections import build_sections

    data = collect(store_path, calibration_path, evaluation, n_pictures=n_pictures)
    out: dict[str, list[str]] = {"_figures": []}
    for section in build_sections(data):
        for block in section.blocks:
            if not isinstance(block, Fig):
                continue
            with matplotlib.rc_context(RC):
                fig = new_figure(block.size)
                block.draw(fig)
                out[block.key] = layout_problems(fig)
            out["_figures"].append(block.key)
    return out


if __name__ == "__main__":  # python -m posbias.reports.legibility STORE CALIBRATION [EVALUATION]
    import sys

    res = report_figure_problems(*sys.argv[1:4])
    for key in res.pop("_figures"):
        print(f"{key}: {len(res[key])} problem(s)")
        for line in res[key]:
            print("   ", line)
