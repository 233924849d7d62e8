"""The HTML report: one self-contained file (figures embedded as PNG data URIs, no scripts, no external
fetches), readable without JavaScript, with a table of contents. Every user-provided string is escaped.

:func:`render_report` is the entry point of ``profile-bias report`` and of the whole-pipeline command; it
writes the HTML and, when asked, the PDF (:mod:`posbias.reports.pdf`) from the same sections.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posbias.errors import EnvironmentFault
from posbias.reports.document import Fig, Para, Section, Table

__all__ = ["render_report", "render_html", "report_title"]

_CSS = """
:root{color-scheme:light}
body{font-family:"DejaVu Sans",system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1080px;margin:1.5em auto;padding:0 1.2em;color:#1d1d1d;line-height:1.45}
h1{font-size:1.55em;margin-bottom:.2em}h2{font-size:1.22em;border-bottom:1px solid #d5d5d5;padding-bottom:.2em;margin-top:1.8em}
.sub{color:#555;margin-top:0}
nav{background:#f6f6f6;border:1px solid #e2e2e2;padding:.4em 1.2em;display:inline-block}
nav ol{margin:.3em 0;padding-left:1.4em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0;max-width:100%}
td,th{border:1px solid #cfcfcf;padding:.22em .55em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td{overflow-wrap:anywhere}
caption{caption-side:bottom;text-align:left;color:#555;font-size:.92em;padding-top:.25em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:0}
figcaption{color:#444;font-size:.9em}
.note{color:#555;font-size:.92em}
.verdict{padding:.45em .7em;border-left:5px solid #888;background:#f5f5f5}
.good{border-color:#009E73;background:#eef8f4}.bad{border-color:#B22222;background:#fbefef}.neutral{border-color:#E69F00;background:#fdf6e9}
.missing{padding:.45em .7em;border:1px dashed #b0b0b0;background:#fafafa;color:#333}
code{background:#f0f0f0;padding:0 .25em;font-size:.92em;overflow-wrap:anywhere}
.scroll{overflow-x:auto}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def report_title(attrs: dict[str, Any]) -> str:
    """Title of the report for a store's attributes."""
    return f"posbias report: {attrs.get('model_id', '')}"


def _para(p: Para) -> str:
    if p.kind == "missing":
        cmd = f" Produce it with: <code>{_e(p.command)}</code>" if p.command else ""
        return f'<p class="missing">{_e(p.text)}{cmd}</p>'
    if p.kind in ("good", "bad", "neutral"):
        return f'<p class="verdict {p.kind}">{_e(p.text)}</p>'
    if p.kind == "note":
        return f'<p class="note">{_e(p.text)}</p>'
    return f"<p>{_e(p.text)}</p>"


def _table(t: Table) -> str:
    out = ['<div class="scroll"><table>']
    if t.caption:
        out.append(f"<caption>{_e(t.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in t.header) + "</tr></thead><tbody>")
    for row in t.rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _figure(f: Fig, png: bytes) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{_e(f.key)}"><img alt="{_e(f.alt)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{_e(f.caption)}</figcaption></figure>")


def render_html(
    sections: list[Section],
    title: str,
    out_path: str | Path,
    *,
    subtitle: str = "",
    png_of: Callable[[Fig], bytes] | None = None,
) -> Path:
    """Write the sections as one self-contained HTML file.

    Parameters
    ----------
    sections : list of Section
    title : str
        Page title (escaped).
    out_path : path
    subtitle : str
        One line under the title (escaped).
    png_of : callable, optional
        ``Fig -> PNG bytes`` (default: :func:`posbias.reports.figures.render_png` at 110 dpi).

    Returns
    -------
    Path
    """
    from posbias.reports.figures import render_png

    if png_of is None:
        png_of = lambda f: render_png(f.draw, f.size)  # noqa: E731
    toc = "".join(f'<li><a href="#{_e(s.id)}">{_e(s.title)}</a></li>' for s in sections)
    body: list[str] = []
    for i, s in enumerate(sections, 1):
        body.append(f'<section><h2 id="{_e(s.id)}">{i}. {_e(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Para):
                body.append(_para(b))
            elif isinstance(b, Table):
                body.append(_table(b))
            elif isinstance(b, Fig):
                body.append(_figure(b, png_of(b)))
        body.append("</section>")
    doc = (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n"
        f"<style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n"
        + (f'<p class="sub">{_e(subtitle)}</p>\n' if subtitle else "")
        + f'<nav aria-label="contents"><strong>Contents</strong><ol>{toc}</ol></nav>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    from posbias.atomic import atomic_write_text

    return atomic_write_text(out_path, doc)


def _start_pdf_process(sections: list[Section], title: str, pdf: str | Path, subtitle: str) -> Any:
    """Fork a child that writes the PDF; None when fork is unavailable. Returns (process, reader)."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        return None
    ctx = mp.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)

    def work() -> None:
        try:
            from posbias.reports.pdf import render_pdf

            render_pdf(sections, title, pdf, subtitle=subtitle)
            writer.send("")
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
            from posbias.atomic import environment_fault

            fault = environment_fault(exc, pdf) if isinstance(exc, (OSError, RuntimeError)) else exc
            if isinstance(fault, EnvironmentFault):  # the machine's fault: the parent says it as such
                writer.send(("environment", str(fault)))
            else:
                writer.send(f"{type(exc).__name__}: {' '.join(str(exc).split())}")

    proc = ctx.Process(target=work, name="posbias-report-pdf", daemon=True)
    proc.start()
    writer.close()
    return proc, reader


def _join_pdf_process(child: Any, pdf: str | Path) -> None:
    from posbias.errors import PosbiasError

    proc, reader = child
    try:
        msg = reader.recv()
    except EOFError:
        msg = "the PDF process ended without an answer"
    proc.join()
    if isinstance(msg, tuple):
        raise EnvironmentFault(msg[1])
    if msg or proc.exitcode != 0 or not Path(pdf).is_file():
        raise PosbiasError(f"PDF file {pdf}: writing the PDF failed ({msg or f'exit code {proc.exitcode}'}); "
                           "re-run with the HTML only to see the rest of the report")


def render_report(
    store_path: str | Path,
    calibration_path: str | Path,
    out_path: str | Path | None,
    *,
    pdf: str | Path | None = None,
    evaluation: str | Path | None = None,
    n_pictures: int = 3,
    parallel: bool = True,
) -> Path:
    """Write the HTML report (and optionally the PDF) for a store and the calibration fitted on it.

    Parameters
    ----------
    store_path : path
        Profile store.
    calibration_path : path
        Calibration JSON fitted on that store.
    out_path : path or None
        HTML file to write (None: PDF only).
    pdf : path, optional
        PDF file to write, with the same sections.
    evaluation : path, optional
        Evaluation JSON (``profile-bias evaluate``) for the fidelity section and more kept-token pictures.
    n_pictures : int
        Store samples drawn in the pictures section.
    parallel : bool
        Draw the PDF in a forked child process while the parent draws the HTML (POSIX only; the two share
        nothing but the already computed sections). Falls back to sequential where fork is unavailable.

    Returns
    -------
    Path
        The HTML path (or the PDF path when no HTML was asked for).
    """
    import matplotlib

    from posbias.errors import PosbiasError
    from posbias.reports.data import collect
    from posbias.reports.figures import RC, figure_to_png, new_figure
    from posbias.reports.sections import build_sections

    if out_path is None and pdf is None:
        raise PosbiasError("nothing to write: pass out_path and/or pdf")
    for flag, p in (("HTML file", out_path), ("PDF file", pdf)):
        if p is not None and not Path(p).parent.is_dir():
            raise PosbiasError(f"{flag} {p}: folder {Path(p).parent} does not exist; create it or choose another path")
    start = time.perf_counter()
    data = collect(store_path, calibration_path, evaluation, n_pictures=n_pictures)
    sections = build_sections(data)
    title = report_title(data.attrs)
    subtitle = (f"store {Path(store_path).name}, calibration {Path(calibration_path).name}"
                + (f", evaluation {Path(evaluation).name}" if evaluation is not None else ""))
    result: Path | None = None
    child = None
    if pdf is not None and out_path is not None and parallel:
        child = _start_pdf_process(sections, title, pdf, subtitle)
    if out_path is not None:
        def png_of(f: Fig) -> bytes:
            with matplotlib.rc_context(RC):
                fig = new_figure(f.size)
                f.draw(fig)
                return figure_to_png(fig)

        try:
            result = render_html(sections, title, out_path, subtitle=subtitle, png_of=png_of)
        except BaseException:
            if child is not None:
                child[0].terminate()
                child[0].join()
            raise
    if pdf is not None:
        if child is not None:
            _join_pdf_process(child, pdf)
            pdf_path = Path(pdf)
        else:
            from posbias.reports.pdf import render_pdf

            pdf_path = render_pdf(sections, title, pdf, subtitle=subtitle)
        result = result or pdf_path
    data.timings["total"] = time.perf_counter() - start
    return result  # type: ignore[return-value]
