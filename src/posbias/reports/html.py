"""The HTML report: one self-contained file (figures embedded, no scripts, no external fetches)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["render_report"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}img{max-width:100%}.note{color:#555;font-size:.9em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[tuple[Any, Any]], head: tuple[str, str] | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append(f"<tr><th>{_e(head[0])}</th><th>{_e(head[1])}</th></tr>")
    out += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows]
    out.append("</table>")
    return "\n".join(out)


def render_report(store_path: str | Path, calibration_path: str | Path, out_path: str | Path) -> Path:
    """Write the HTML report for a store and the calibration fitted on it.

    Sections: provenance, mean attention vs position at the shallow and deep layer with the fitted
    curves, the fit summary, skipped samples.
    """
    from posbias.artifacts import Calibration
    from posbias.fitters import fitter_from_dict
    from posbias.pipeline import positions_for_domain
    from posbias.profiler.store import ProfileStore
    from posbias.reports.figures import bias_curves_figure, figure_to_png

    cal = Calibration.load(calibration_path)
    methods = cal.methods
    pbc = methods.get("posprune-pbc")
    pore = methods.get("pore")
    with ProfileStore(store_path) as store:
        attrs = dict(store.attrs)
        shallow_l = pbc["shallow_layer"] if pbc else cal.defaults.get("layer", 2)
        deep_l = pbc["deep_layer"] if pbc else store.n_layers - 1
        domain = pbc["domain"] if pbc else (pore["domain"] if pore else "index")
        cols = store.layers([shallow_l, deep_l])  # (T, 2)
        token_n = np.asarray(store.n_visual)[store.token_sample()]  # (T,)
        x = positions_for_domain(store.token_index(), token_n, domain)  # (T,)
        skipped = store.skipped()
        n_samples = store.n_samples
        sources = store.sources_count()
    ok = np.all(np.isfinite(cols), axis=1)
    pbc_fit = fitter_from_dict(pbc["fit"]) if pbc else None
    pore_fit = fitter_from_dict(pore["fit"]) if pore else None
    fig = bias_curves_figure(
        x=x[ok],
        shallow=cols[ok, 0].astype(np.float64),
        deep=cols[ok, 1].astype(np.float64),
        shallow_layer=shallow_l,
        deep_layer=deep_l,
        domain=domain,
        pore_predict=pore_fit.predict if pore_fit else None,
        pore_layer=pore["layer"] if pore else None,
        pbc_predict=pbc_fit.predict if pbc_fit else None,
    )
    png = base64.b64encode(figure_to_png(fig)).decode("ascii")

    prov = [
        ("model", attrs.get("model_id", "")),
        ("revision", attrs.get("model_revision", "") or "unknown"),
        ("fingerprint", attrs.get("model_fingerprint", "")),
        ("adapter", attrs.get("adapter", "")),
        ("decoder layers", attrs.get("n_layers", "")),
        ("samples profiled", n_samples),
        ("samples per source", ", ".join(f"{k}: {v}" for k, v in sorted(sources.items()))),
        ("samples skipped", len(skipped)),
        ("seed", attrs.get("seed", "")),
        ("posbias", attrs.get("posbias_version", "")),
        ("transformers", attrs.get("transformers_version", "")),
        ("torch", attrs.get("torch_version", "")),
        ("store created", attrs.get("created", "")),
        ("calibration created", cal.to_dict().get("created", "")),
    ]
    fit_rows: list[tuple[Any, Any]] = []
    if pbc:
        g = pbc["goodness"]
        fit_rows += [
            ("PosPrune PBC layers", f"{pbc['shallow_layer']} - {pbc['deep_layer']} ({pbc['domain']})"),
            ("PBC fit", f"R^2 {g['r2']:.4f}, RMSE {g['rmse']:.3e}, {g['n_samples']} samples"),
        ]
    if pore:
        g = pore["goodness"]
        fit_rows += [("PoRe layer", f"{pore['layer']} ({pore['domain']})"), ("PoRe fit", f"R^2 {g['r2']:.4f}, RMSE {g['rmse']:.3e}")]
    skipped_html = (
        "<p>None.</p>"
        if not skipped
        else "<table><tr><th>sample</th><th>source</th><th>reason</th></tr>"
        + "".join(f"<tr><td>{_e(i)}</td><td>{_e(s)}</td><td>{_e(r)}</td></tr>" for i, s, r in skipped)
        + "</table>"
    )
    title = f"posbias report: {attrs.get('model_id', '')}"
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<nav><ol><li><a href="#provenance">Provenance</a></li><li><a href="#curves">Attention vs position</a></li>
<li><a href="#fits">Fits</a></li><li><a href="#skipped">Skipped samples</a></li></ol></nav>
<h2 id="provenance">1. Provenance</h2>
{_table(prov)}
<h2 id="curves">2. Mean last-token attention vs visual-token position</h2>
<p class="note">Left: mean attention the last prompt token pays to each visual token at the shallow and deep
layer, over all profiled samples, with PoRe's fitted exponential. Right: the positional bias
ΔA = A_shallow - A_deep with PosPrune's fitted polynomial.</p>
<img alt="mean attention and bias curves" src="data:image/png;base64,{png}">
<h2 id="fits">3. Fits</h2>
{_table(fit_rows) if fit_rows else "<p>No fits in the calibration.</p>"}
<h2 id="skipped">4. Skipped samples</h2>
{skipped_html}
</body></html>
"""
    out = Path(out_path)
    out.write_text(doc, encoding="utf-8")
    return out
