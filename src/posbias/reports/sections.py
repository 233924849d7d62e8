"""The eight sections of the report, one per question a reader asks (issue 7), built from :class:`ReportData`.

Each section shows its figures when the data exist; otherwise it says what is missing and which command
produces it.
"""

from __future__ import annotations

import datetime as _dt
from functools import partial
from typing import Any

import numpy as np

from posbias.reports.data import ReportData
from posbias.reports.document import Fig, Para, Section, Table
from posbias.reports.figures import (
    TEXT_WIDTH,
    attention_maps_height,
    draw_attention_maps,
    draw_bias_curves,
    draw_consistency,
    draw_degree_selection,
    draw_density,
    draw_fidelity,
    draw_layer_curves,
    draw_pictures,
    draw_probe,
    draw_surface_fits,
    draw_utp,
    draw_vision_map,
    map_grid_shape,
    pictures_height,
)
from posbias.reports.palette import method_color, method_label

__all__ = ["build_sections", "SECTION_TITLES"]

SECTION_TITLES: dict[str, str] = {
    "provenance": "Verdicts and provenance",
    "attention": "Where does attention go?",
    "curves": "The bias curves",
    "consistency": "Is the bias architectural?",
    "density": "Semantic density: centre vs edge",
    "utp": "UTP schedules",
    "pictures": "Pruning in pictures",
    "fidelity": "Fidelity: does the pruned model answer like the full one?",
}


def _pore_other(pore: dict[str, Any] | None) -> tuple[str, Any] | None:
    """(label, predict) of PoRe's other exponential form recorded in the calibration, or None."""
    from posbias.fitters import fitter_from_dict

    other = ((pore or {}).get("form") or {}).get("other")
    if not other:
        return None
    label = "other form: a·exp(bx) + c" if other["params"].get("offset") else "other form: pure a·exp(bx) (released)"
    return label, fitter_from_dict(other).predict


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not np.isfinite(f):
            return "n/a"
        return f"{f:.{digits}g}"
    return str(v)


def _ci(d: dict[str, Any], digits: int = 4) -> str:
    return f"{_fmt(d.get('estimate'), digits)} [{_fmt(d.get('low'), digits)}, {_fmt(d.get('high'), digits)}]"


def _missing(what: str, command: str) -> Para:
    return Para(f"Not available: {what}.", kind="missing", command=command)


def _verdict_kind(verdict: str) -> str:
    v = verdict.lower()
    if v.startswith("not") or "no difference" in v:
        return "bad"
    if v in ("consistent",) or v.startswith("centre") or "higher" in v:
        return "good"
    return "neutral"


# ------------------------------------------------------------------------------------------------ 1


def _say(verdict: str, text: str) -> str:
    """``verdict`` then ``text``, without saying the same thing twice (text often restates the verdict)."""
    verdict, text = verdict.strip().rstrip("."), text.strip()
    if not text or text.lower().startswith(verdict.lower()) or verdict.lower() in text.lower()[: len(verdict) + 40]:
        return (text or verdict + ".")[:1].upper() + (text or verdict + ".")[1:]
    return f"{verdict}. {text[:1].upper()}{text[1:]}" if verdict else text


def _verdicts(d: ReportData) -> list[Any]:
    """The report's first block: the verdict on every fitted curve and every test, each with its reason."""
    from posbias.artifacts.entries import find_entry
    from posbias.artifacts.quality import quality_of

    cal = d.cal_doc
    stats = cal.get("statistics") or {}
    rows: list[list[str]] = []
    worst = "good"
    for name, entry in cal["methods"].items():
        kind = find_entry(name)
        if kind is not None and not kind.fitted:
            continue  # nothing fitted (fastv): no verdict to give
        verdict, reason = quality_of(entry)
        rows.append([method_label(name), verdict, reason])
        if verdict == "unusable" or (verdict == "weak" and worst == "good"):
            worst = verdict
    cons = stats.get("consistency")
    if cons:
        rows.append(["bias consistency (is it architectural?)", str(cons.get("verdict", "")), str(cons.get("evidence", ""))])
    den = stats.get("density")
    if den:
        text = str(den.get("verdict") or den.get("message", ""))
        short = str(den.get("status", "")) if den.get("status") != "evaluated" else (
            "centre higher" if text.startswith("centre") else "edge higher" if text.startswith("edge") else "no difference")
        rows.append(["semantic density (centre vs edge)", short, text])
    if not rows:
        return [Para("The calibration holds no fitted curve.", kind="neutral")]
    lead = {"good": ("Every fitted curve is good enough to use.", "good"),
            "weak": ("Some fitted curves are weak: usable, but the runtime warns; more samples would firm them up.", "neutral"),
            "unusable": ("Some fitted curves are unusable: the runtime refuses them unless forced (force=True).", "bad")}[worst]
    return [Para(lead[0], kind=lead[1]),
            Table(["what", "verdict", "why"], rows,
                  caption="Verdicts (rules: docs/calibration.md, quality; docs/statistics.md). The sections below hold the evidence.")]


def _provenance(d: ReportData, generated: str) -> Section:
    a = d.attrs
    cal = d.cal_doc
    grids = {tuple(int(v) for v in g) for g in d.grids}
    if d.fixed_grid:
        grid_txt = f"{d.grids[0, 0]} x {d.grids[0, 1]} = {int(d.n_visual[0])} visual tokens (fixed)"
    elif d.multi_tile:
        grid_txt = (f"any resolution: several tiles per image, {int(d.n_visual.min())}-{int(d.n_visual.max())} "
                    "visual tokens")
    else:
        grid_txt = f"dynamic: {len(grids)} distinct grids, {int(d.n_visual.min())}-{int(d.n_visual.max())} visual tokens"
    run_s = next((a[k] for k in ("profile_seconds", "run_seconds", "seconds") if k in a), None)
    n_bad = int((~d.ok_sample).sum())
    rows = [
        ["model", a.get("model_id", "")],
        ["revision", a.get("model_revision", "") or "unknown"],
        ["fingerprint", a.get("model_fingerprint", "")],
        ["adapter", a.get("adapter", "")],
        ["decoder layers", _fmt(d.n_layers)],
        ["visual grid", grid_txt],
        ["samples profiled", _fmt(d.n_samples)],
        ["samples per source", ", ".join(f"{k}: {v}" for k, v in sorted(d.sources_count.items()))],
        ["samples skipped", _fmt(len(d.skipped))],
        ["samples with NaN/inf attention (excluded here)", _fmt(n_bad)],
        ["data sources", str(a.get("data", "")) or "not recorded"],
        ["samples requested", _fmt(a.get("n_requested", "not recorded"))],
        ["seed", _fmt(a.get("seed", ""))],
        ["store complete", "yes" if d.complete else "NO: the profiling run stopped early (interrupted or failed)"],
        ["profiling run time", f"{float(run_s):.1f} s" if run_s is not None else "not recorded in the store"],
        ["posbias (store / calibration)", f"{a.get('posbias_version', '')} / {cal.get('posbias_version', '')}"],
        ["transformers", a.get("transformers_version", "") or "not installed"],
        ["torch", a.get("torch_version", "") or "not installed"],
        ["store", f"{d.store_path.name} (created {a.get('created', '')})"],
        ["calibration", f"{d.calibration_path.name} (created {cal.get('created', '')}, methods: {', '.join(sorted(cal['methods']))})"],
    ]
    if d.evaluation is not None:
        ev = d.evaluation
        ev_fp = (ev.get("model") or {}).get("fingerprint")
        same = "matches" if ev_fp == a.get("model_fingerprint") else f"DIFFERS ({ev_fp})"
        rows.append(["evaluation", f"{d.evaluation_path.name if d.evaluation_path else ''} (created {ev.get('created', '')}, "
                                   f"{ev.get('n_samples', '?')} samples, model fingerprint {same})"])
    rows.append(["report generated", generated])
    blocks: list[Any] = _verdicts(d)
    blocks.append(Table(["item", "value"], [[str(k), str(v)] for k, v in rows], caption="Provenance: what was measured, how."))
    if d.skipped:
        blocks.append(Table(["skipped sample", "source", "reason"], [[i, s, r] for i, s, r in d.skipped],
                            caption=f"{len(d.skipped)} samples could not be profiled.", pdf_max_rows=30))
    else:
        blocks.append(Para("No sample was skipped.", kind="note"))
    if d.missing:
        blocks.append(Table(["not in this report", "how to produce it"], [[w, c] for w, c in d.missing],
                            caption="Inputs this report could use but did not find; the sections below say the same where it matters."))
    from posbias.departures import DEPARTURES

    blocks.append(Table(["paper", "what differs", "why", "switch that restores the paper's choice"],
                        [list(row) for row in DEPARTURES],
                        caption="Remaining departures from the papers (defaults otherwise reproduce the released code; "
                                "docs/runtime.md)."))
    return Section("provenance", SECTION_TITLES["provenance"], blocks)


# ------------------------------------------------------------------------------------------------ 2


def _flat_gaussian(d: ReportData) -> str:
    """Why AdaptPrune's Gaussian is not drawn (its amplitude is 0: a flat weight), or "" when it is drawn."""
    ap = d.cal_doc["methods"].get("adaptprune-gaussian")
    if not ap or float(ap["fit"]["learned"].get("amplitude_", 1.0)) > 0.0:
        return ""
    return ("AdaptPrune's Gaussian centre weight is not drawn: its fitted amplitude is 0 (the mean attention has no "
            "centre peak), so the weight is flat and the corrected map equals the raw one.")


def _attention(d: ReportData) -> Section:
    layers = {"shallow": d.shallow, "deep": d.deep}
    maps, flat = dict(d.maps), _flat_gaussian(d)
    if flat:  # a flat weight leaves the raw map unchanged: the column would repeat the first one
        maps = {k: v for k, v in maps.items() if not k.endswith("/adaptprune-gaussian")}
    if d.fixed_grid:
        grid_word = "visual grid"
    elif d.map_tiles_overlaid:
        grid_word = f"{d.map_shape[0]}x{d.map_shape[1]} grid every tile has (the tiles of each image overlaid)"
    else:
        grid_word = f"visual grid (each image's grid rescaled to {d.map_shape[0]}x{d.map_shape[1]} cells)"
    blocks: list[Any] = [
        Para(
            f"Mean attention the last prompt token pays to each visual token, over {int(d.ok_sample.sum())} samples, drawn on "
            f"the {grid_word} (row 0 at the top, like the image) at the shallow layer {d.shallow} (where PosPrune and FastV "
            f"prune) and the deep layer {d.deep}. Columns: the raw attention, then each correction applied to it (PoRe Fig. 1, "
            "UTP Fig. 1a). A positional bias shows as a gradient that has nothing to do with the image content (e.g. more "
            "attention towards the bottom rows); after a good correction the map is flatter. The corrections are fitted at the "
            "shallow layer; the deep row applies the same curves for comparison only. Each panel has its own colour scale."
        ),
        Fig("attention_maps", "Mean last-token attention on the grid, before and after each correction.",
            "heatmaps of mean attention per grid cell, raw and corrected, shallow and deep layer",
            partial(draw_attention_maps, maps=maps, units=d.map_units, layers=layers),
            (TEXT_WIDTH, attention_maps_height(maps))),
    ]
    if flat:
        blocks.append(Para("No Gaussian column: AdaptPrune's fitted weight is flat (see the verdicts and section 3).", kind="note"))
    if not d.has_attn_pa:
        blocks.append(_missing("UTP's position-agnostic attention (PA-Att) maps: the store has no /tokens/attn_pa",
                               "profile-bias profile --signals attn_pa (or --signals all), then re-run the report"))
    if d.vision_map is not None:
        blocks.append(Fig("vision_map", "Vision-encoder importance ([CLS] attention for LLaVA, mean received attention for "
                          "Qwen2-VL and Qwen2.5-VL) next to the decoder's shallow-layer attention.",
                          "heatmap of vision-encoder importance and decoder attention",
                          partial(draw_vision_map, vision_map=d.vision_map, raw_shallow=d.maps["shallow/raw"], shallow=d.shallow),
                          (TEXT_WIDTH * 0.75, 2.6)))
    else:
        blocks.append(_missing("vision-encoder importance map (/tokens/vision_importance)",
                               "profile-bias profile --signals vision_importance (or --signals all)"))
    blocks.append(Para(
        "Per-layer view: left, every decoder layer's mean attention over position divided by that layer's mean (1 = uniform; "
        "purple above, orange below); right, the curves of a few layers (smoothed by averaging neighbouring positions), "
        "scaled by the number of visual tokens V so that 1 means uniform attention."
    ))
    blocks.append(Fig("layer_curves", "Mean attention over position at every decoder layer.",
                      "layer by position map of relative attention and per-layer curves",
                      partial(draw_layer_curves, x=d.x, layer_curves=d.layer_curves, x_label=d.x_label, shallow=d.shallow, deep=d.deep),
                      (TEXT_WIDTH, 2.9)))
    return Section("attention", SECTION_TITLES["attention"], blocks)


# ------------------------------------------------------------------------------------------------ 3


def _curves(d: ReportData) -> Section:
    from posbias.fitters import fitter_from_dict

    methods = d.cal_doc["methods"]
    stats = d.cal_doc.get("statistics") or {}
    level = float(stats.get("level", 0.95))
    pbc = methods.get("posprune-pbc")
    pore = methods.get("pore")
    pbc_fit = fitter_from_dict(pbc["fit"]) if pbc else None
    pore_fit = fitter_from_dict(pore["fit"]) if pore else None
    layers = {"shallow": d.shallow, "deep": d.deep, "pore": d.pore_layer}
    blocks: list[Any] = [
        Para(
            f"Left: PosPrune's bias ΔA = A_shallow - A_deep per position (PosPrune Fig. 3c) with the fitted polynomial; right: "
            f"the mean attention at layer {d.pore_layer} with PoRe's exponential P(x) = a·exp(bx) (+ c when held-out error "
            "chose the offset form; the other form dashed) (PoRe Fig. 2). Grey: the "
            f"measured mean and its {int(level * 100)}% band from a cluster bootstrap over samples ({d.n_boot} resamples; tokens of "
            "one image are correlated, so samples are resampled, never tokens). Bottom: residuals, mean minus fit."
        ),
        Fig("bias_curves", "Measured bias with bootstrap band, fitted curves and residuals.",
            "line plots of measured mean bias with bands, fitted polynomial and exponential, and residuals",
            partial(draw_bias_curves, x=d.x, bands=d.bands, x_label=d.x_label, layers=layers,
                    pbc_predict=pbc_fit.predict if pbc_fit else None,
                    pbc_band=(stats.get("pbc_inference") or {}).get("band"),
                    pore_predict=pore_fit.predict if pore_fit else None, level=level, n_boot=d.n_boot,
                    pore_other=_pore_other(pore)),
            (TEXT_WIDTH, 4.4)),
    ]
    rows: list[list[str]] = []
    if pbc:
        g = pbc["goodness"]
        learned = pbc["fit"]["learned"]
        rows.append(["PosPrune PBC", "layers (shallow - deep), domain", f"{pbc['shallow_layer']} - {pbc['deep_layer']}, {pbc['domain']}"])
        rows.append(["PosPrune PBC", "degree", f"{pbc['fit']['params']['degree']}"])
        inf = stats.get("pbc_inference")
        for k, c in enumerate(learned["coef_"]):
            if inf and k < len(inf.get("coef", [])):
                txt = f"{_fmt(inf['coef'][k])} [{_fmt(inf['ci_low'][k])}, {_fmt(inf['ci_high'][k])}] (SE cluster {_fmt(inf['se'][k], 3)} vs iid {_fmt(inf['se_iid'][k], 3)})"
            else:
                txt = _fmt(c)
            rows.append(["PosPrune PBC", f"coef t^{k}, t = (x - {_fmt(learned['x_shift_'])}) / {_fmt(learned['x_scale_'])}", txt])
        rows.append(["PosPrune PBC", "R² / RMSE vs mean curve", f"{_fmt(g['r2'])} / {_fmt(g['rmse'], 3)}"])
    if pore:
        g = pore["goodness"]
        learned = pore["fit"]["learned"]
        pinf = (stats.get("pore_inference") or {}).get("params")
        rows.append(["PoRe", "layer, domain", f"{pore['layer']}, {pore['domain']}"])
        form = pore.get("form") or {}
        if form.get("cv_mse"):
            mse = ", ".join(f"{n} {_fmt(v, 3) if v is not None else 'failed'}" for n, v in zip(form["forms"], form["cv_mse"]))
            rows.append(["PoRe", "form (held-out MSE)", f"{form['chosen']} ({mse}; pure unless the offset beats it by more than one SE)"])
        elif form:
            rows.append(["PoRe", "form", f"{form['chosen']} (forced)"])
        for name in ("a", "b", "c"):
            txt = _ci(pinf[name]) if pinf and name in pinf else _fmt(learned[f"{name}_"])
            rows.append(["PoRe", name, txt])
        rows.append(["PoRe", "R² / RMSE vs mean curve", f"{_fmt(g['r2'])} / {_fmt(g['rmse'], 3)}"])
    ap = methods.get("adaptprune-gaussian")
    if ap:
        learned = ap["fit"]["learned"]
        rows.append(["AdaptPrune Gaussian", "sigma (centred units; seed = 1)", f"{_fmt(learned['sigma_'])} ({ap['fit']['params']['sigma']})"])
        rows.append(["AdaptPrune Gaussian", "R² fitted sigma / AdaptPrune's sigma", f"{_fmt(learned.get('r2_'))} / {_fmt(learned.get('r2_default_'))}"])
        rows.append(["AdaptPrune Gaussian", "centre peak in the data", _fmt(bool(learned.get("centre_peak_")))])
    if rows:
        cap = f"Fitted parameters; intervals are {int(level * 100)}% (PBC: cluster-robust OLS by sample; PoRe: cluster bootstrap)." if stats else "Fitted parameters."
        blocks.append(Table(["method", "quantity", "value"], rows, caption=cap))
    deg = stats.get("pbc_degree")
    bmap = stats.get("bias_map")
    if deg or bmap:
        why = []
        if deg:
            rule = {"1se": "the lowest degree whose held-out error is within one standard error (paired by fold) of the best",
                    "min": "the degree with the lowest held-out error"}.get(str(deg.get("rule")), str(deg.get("rule")))
            mode = "chosen automatically" if deg.get("mode") == "auto" else "forced by --degree (CV shown for reference)"
            why.append(f"Degree {deg.get('chosen')} was {mode}: {deg.get('n_folds')}-fold cross-validation over samples; best "
                       f"held-out error at degree {deg.get('best')}; rule: {rule}.")
        if bmap:
            why.append(f"2-D maps: the best 1-D curve ({bmap.get('best_1d')}) and the best 2-D surface ({bmap.get('best_2d')}) "
                       f"differ by {_fmt(bmap.get('diff'), 3)} ± {_fmt(bmap.get('diff_se'), 3)} (held-out MSE); kept: {bmap.get('chosen')}. "
                       f"Rule: {bmap.get('rule', '')}")
        blocks.append(Para(" ".join(why)))
        blocks.append(Fig("degree_selection", "Held-out error of each candidate curve.", "cross-validation error per degree and per map candidate",
                          partial(draw_degree_selection, pbc_degree=deg, bias_map=bmap), (TEXT_WIDTH, 2.6)))
    else:
        blocks.append(_missing("the degree selection and 2-D comparison", "profile-bias fit --degree auto (without --no-stats)"))
    panels: list[tuple[str, np.ndarray, str, bool, str]] = []
    measured_delta = d.maps["shallow/raw"] - d.maps["deep/raw"]
    shape = d.map_shape
    if "posprune-pbc-2d" in methods:
        surf = fitter_from_dict(methods["posprune-pbc-2d"]["fit"])
        panels.append((f"measured ΔA\n(layer {d.shallow} - layer {d.deep})", measured_delta, "ΔA (probability)", True, "#000000"))
        panels.append(("2-D surface fit\nf(u, v)", np.asarray(surf.predict_grid(shape)), "ΔA (probability)", True, method_color("posprune-pbc-2d")))
    if pbc_fit is not None and d.fixed_grid:
        idx = np.arange(shape[0] * shape[1], dtype=np.float64)
        x = idx if d.domain == "index" else idx / (shape[0] * shape[1])
        if not panels:
            panels.append((f"measured ΔA\n(layer {d.shallow} - layer {d.deep})", measured_delta, "ΔA (probability)", True, "#000000"))
        panels.append(("1-D PBC curve ΔA(x)\ndrawn on the grid", np.asarray(pbc_fit.predict(x)).reshape(shape), "ΔA (probability)", True, method_color("posprune-pbc")))
    flat = _flat_gaussian(d)
    if ap and not flat:
        gfit = fitter_from_dict(ap["fit"])
        model = float(gfit.offset_) + float(gfit.amplitude_) * np.asarray(gfit.mask(shape))
        panels.append((f"measured mean A\nlayer {ap['layer']}", d.maps["pore/raw"], "attention (probability)", False, "#000000"))
        panels.append(("AdaptPrune Gaussian fit\nc + a·w(u, v)", model, "attention (probability)", False, method_color("adaptprune-gaussian")))
    if panels:
        blocks.append(Para("2-D views: the measured bias on the grid next to the fitted surface (kept only when it beats the 1-D "
                           "curve on held-out samples), the 1-D PBC curve drawn on the grid, and AdaptPrune's centre weight "
                           "fitted to the mean attention map."))
        rows_, _ = map_grid_shape(len(panels))
        blocks.append(Fig("surface_fits", "Measured maps and fitted 2-D models.", "heatmaps of measured and fitted bias maps",
                          partial(draw_surface_fits, panels=panels), (TEXT_WIDTH, 0.3 + 2.4 * rows_)))
    if flat:
        blocks.append(Para(flat, kind="note"))
    return Section("curves", SECTION_TITLES["curves"], blocks)


# ------------------------------------------------------------------------------------------------ 4


def _consistency(d: ReportData) -> Section:
    stats = d.cal_doc.get("statistics") or {}
    cons = stats.get("consistency")
    blocks: list[Any] = [Para(
        "If the bias comes from the architecture (the position encoding) and not from the images, two disjoint groups of "
        "samples give the same mean ΔA curve, and the agreement (Pearson r) rises towards 1 as the groups grow, within one "
        "data source and across sources alike (PosPrune Fig. 4)."
    )]
    if not cons:
        blocks.append(_missing("the consistency test", "profile-bias fit without --no-stats (needs at least 20 samples in a source)"))
        return Section("consistency", SECTION_TITLES["consistency"], blocks)
    verdict = str(cons.get("verdict", ""))
    blocks.append(Para("Verdict: " + _say(verdict, str(cons.get("evidence", ""))), kind=_verdict_kind(verdict)))
    if cons.get("status") == "evaluated" and cons.get("curves"):
        blocks.append(Fig("consistency", "Pearson r of two groups' mean ΔA curves vs group size.",
                          "line plot of correlation against group size with intervals",
                          partial(draw_consistency, consistency=cons), (TEXT_WIDTH * 0.8, 3.0)))
        rows = []
        for c in cons["curves"]:
            rows.append([c.get("kind", ""), " vs ".join(c.get("sources", [])), _fmt(c["group_sizes"][-1]),
                         f"{_fmt(c['r_median'][-1], 3)} [{_fmt(c['r_low'][-1], 3)}, {_fmt(c['r_high'][-1], 3)}]", c.get("verdict", "")])
        blocks.append(Table(["comparison", "sources", "largest n", "median r [split interval]", "verdict"], rows,
                            caption=f"Threshold r = {cons.get('threshold')}; {cons.get('n_repeats')} random splits per group size."))
    return Section("consistency", SECTION_TITLES["consistency"], blocks)


# ------------------------------------------------------------------------------------------------ 5


def _density(d: ReportData) -> Section:
    stats = d.cal_doc.get("statistics") or {}
    den = stats.get("density")
    blocks: list[Any] = [Para(
        "PosPrune (Fig. 2) splits the grid into region blocks and measures each block's proxy entropy H = log det(Σ + εI) of "
        "its token features; central blocks carrying more information than edge blocks justifies pruning the edge harder."
    )]
    if not den or den.get("status") != "evaluated":
        msg = (den or {}).get("message", "no statistics in the calibration")
        blocks.append(_missing(f"the density test ({msg})", "profile-bias profile --signals region_logdet (or --signals all), then profile-bias fit"))
        return Section("density", SECTION_TITLES["density"], blocks)
    verdict = str(den.get("verdict", ""))
    blocks.append(Para("Verdict: " + _say(verdict, str(den.get("message", ""))), kind=_verdict_kind(verdict)))
    blocks.append(Fig("density", "Mean proxy entropy per region block, and centre vs edge.", "heatmap of entropy per block and bar chart",
                      partial(draw_density, density=den), (TEXT_WIDTH * 0.9, 2.8)))
    w, t = den.get("wilcoxon") or {}, den.get("welch") or {}
    rows = [
        ["samples used / excluded", f"{den.get('n_samples')} / {den.get('n_excluded')}"],
        ["centre mean / edge mean (nats)", f"{_fmt(den.get('centre_mean'))} / {_fmt(den.get('edge_mean'))}"],
        ["mean difference [CI]", f"{_fmt(den.get('mean_diff'))} [{', '.join(_fmt(v) for v in den.get('diff_ci', []))}]"],
        ["Cohen's d_z", _fmt(den.get("cohens_dz"), 3)],
        ["Wilcoxon signed-rank (primary)", ", ".join(f"{k} {_fmt(v, 3)}" for k, v in w.items())],
        ["Welch t-test (blocks; optimistic)", ", ".join(f"{k} {_fmt(v, 3)}" for k, v in t.items())],
    ]
    blocks.append(Table(["statistic", "value"], rows))
    return Section("density", SECTION_TITLES["density"], blocks)


# ------------------------------------------------------------------------------------------------ 6


def _utp(d: ReportData) -> Section:
    blocks: list[Any] = [Para(
        "UTP keeps a different number of visual tokens at each layer: an integer program chooses the schedule that "
        "loses the least information for a compression ratio c, weighting each layer by its information loss l_l (the angle "
        "between the last token's output with all visual tokens removed from layer l on and the full model's)."
    )]
    if d.schedules or d.utr_loss is not None:
        level = float((d.cal_doc.get("statistics") or {}).get("level", 0.95))
        blocks.append(Fig("utp", "UTP retained tokens per layer per ratio (UTP Fig. 4c) and information loss per layer.",
                          "line plots of retained tokens per layer and loss per layer",
                          partial(draw_utp, schedules=d.schedules, utr_loss=d.utr_loss, level=level),
                          (TEXT_WIDTH if d.schedules and d.utr_loss is not None else TEXT_WIDTH * 0.6, 2.8)))
    if d.schedules:
        extra = [k for k in ("formulation", "objective", "objective_progressive", "objective_tokens", "status", "mip_gap", "gap",
                             "solve_seconds", "solve_time", "n_samples", "mode") if any(s.get(k) is not None for s in d.schedules)]
        rows = [[s["method"], _fmt(s["ratio"]), _fmt(sum(s["schedule"])), " ".join(str(v) for v in s["schedule"])] + [_fmt(s.get(k)) for k in extra]
                for s in d.schedules]
        blocks.append(Table(["method", "ratio", "tokens over layers", "retained per layer"] + extra, rows, caption="Schedules in the calibration."))
    else:
        blocks.append(_missing("UTP schedules in the calibration", "profile-bias solve --store S --ratios 2,4,8,16 --into C.json"))
    if d.utr_loss is None:
        blocks.append(_missing("per-layer information loss l_l (/samples/utr_loss)", f"profile-bias utr --store {d.store_path} (then profile-bias solve --store {d.store_path} --ratios 2,4,8,16 --into CAL.json)"))
    return Section("utp", SECTION_TITLES["utp"], blocks)


# ------------------------------------------------------------------------------------------------ 7


def _pictures(d: ReportData) -> Section:
    from posbias.reports.pictures import picture_rows

    keep = int(d.cal_doc["defaults"].get("keep", 64))
    rows, methods, notes = picture_rows(d, keep)
    blocks: list[Any] = [Para(
        f"The visual tokens each method keeps (outlined in the method's colour; pruned tokens darkened) on real images "
        f"(AdaptPrune Fig. 6), at the calibration's default budget of {keep} kept tokens (fewer when an image has fewer). "
        "Kept sets of the methods that score one attention row (fastv, pore, posprune-pbc and any such method "
        "registered), the Gaussian centre weight and PA-Att are computed here from the stored attention rows and the "
        "calibration; other methods' come from the evaluation's kept lists. Multi-tile images (LLaVA-NeXT, InternVL) "
        "show the high-resolution tiles' tokens where they lie in the image (tile boundaries in white) and, in a smaller "
        "row below, the overview tile's (the whole image at low resolution); separator tokens are never candidates and "
        "are not drawn, and the budget counts the tokens of every tile together, as the pruner does."
    )]
    if not rows:
        blocks.append(_missing("samples to draw", "profile-bias profile (the store has no usable sample)"))
        blocks.extend(Para(n, kind="note") for n in notes)
        return Section("pictures", SECTION_TITLES["pictures"], blocks)
    ncol = len(methods) + 1
    w = TEXT_WIDTH
    h = pictures_height(rows, ncol, w)
    blocks.append(Fig("pictures", "Kept tokens per method on sample images.", "images with the kept visual tokens of each method outlined",
                      partial(draw_pictures, rows=rows, methods=methods), (w, h)))
    blocks.append(Table(["sample", "question"], [[r["title"], r.get("question", "")] for r in rows], caption="The samples drawn above."))
    for n in notes:
        blocks.append(Para(n, kind="note"))
    if d.evaluation is None:
        blocks.append(_missing("kept tokens of posprune, adaptprune and utp (from an evaluation)",
                               "profile-bias evaluate ... --out evaluation.json, then report --evaluation evaluation.json"))
    return Section("pictures", SECTION_TITLES["pictures"], blocks)


# ------------------------------------------------------------------------------------------------ 8


def _fidelity(d: ReportData) -> Section:
    blocks: list[Any] = [Para(
        "How close the pruned model stays to the full one as the budget shrinks: KL divergence of the first answer token's "
        "distribution (lower is better), agreement of the top-1 token and of the generated answer, accuracy where the source "
        "has labels, and the cost (FLOPs by PosPrune Eq. 8, measured prefill time)."
    )]
    ev = d.evaluation
    if ev is None or not ev.get("results"):
        blocks.append(_missing("the fidelity evaluation", "profile-bias evaluate --model M --calibration C --methods fastv,pore,posprune,adaptprune,utp --keep 64,128,192 --out evaluation.json; then profile-bias report ... --evaluation evaluation.json"))
        return Section("fidelity", SECTION_TITLES["fidelity"], blocks)
    results = ev["results"]
    blocks.append(Fig("fidelity", "Fidelity and cost vs kept tokens, one colour per method.", "line plots of KL, agreement, accuracy and prefill time against kept tokens",
                      partial(draw_fidelity, results=results), (TEXT_WIDTH, 5.0)))
    rows = []
    for r in sorted(results, key=lambda r: (str(r["method"]), float(r["keep"]))):
        rows.append([method_label(str(r["method"])), _fmt(r["keep"]), _fmt(r.get("n")),
                     f"{_fmt(r.get('kl_mean'), 3)} ± {_fmt(r.get('kl_sem'), 2)}", _fmt(r.get("top1_agreement"), 3),
                     _fmt(r.get("exact_agreement"), 3), _fmt(r.get("accuracy"), 3), _fmt(r.get("flops_ratio"), 3),
                     f"{_fmt(r.get('prefill_ms'), 4)} / {_fmt(r.get('prefill_ms_full'), 4)}", _fmt(r.get("peak_mem_mib"), 4)])
    blocks.append(Table(["method", "keep", "n", "KL mean ± SEM (nats)", "top-1 agr.", "exact agr.", "accuracy", "FLOPs ratio",
                         "prefill ms (pruned / full)", "peak MiB"], rows,
                        caption=f"{ev.get('n_samples', '?')} evaluation samples; model {(ev.get('model') or {}).get('id', '?')}."))
    paired = [r for r in sorted(results, key=lambda r: (str(r["method"]), float(r["keep"]))) if r.get("paired")]
    if paired:
        prow = []
        for r in paired:
            kl, t1 = r["paired"]["kl"], r["paired"]["top1"]
            ci = kl["ci"]
            prow.append([method_label(str(r["method"])), _fmt(r["keep"]), _fmt(kl["n"]),
                         f"{_fmt(kl['mean'], 3)} [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]", _fmt(kl["p"], 2), kl["verdict"],
                         _fmt(t1["mean"], 2), t1["verdict"], _fmt(kl.get("n_needed"))])
        blocks.append(Table(["method", "keep", "n", "ΔKL vs FastV, mean [95% bootstrap CI]", "Wilcoxon p", "verdict (KL)",
                             "Δ top-1 agr.", "verdict (top-1)", "n to decide"], prow,
                            caption="Paired against FastV on the same samples and keep (difference = method - FastV; lower "
                                    "KL, higher agreement is better; a verdict needs the CI to exclude 0 and p < 0.05)."))
    blocks.append(Para("What each measure answers: KL and agreement measure fidelity to the full model, so a method "
                       "that keeps what the full model attends to (its positional bias included) scores well on them; "
                       "they cannot show the papers' claim, which is about task quality. Accuracy measures task quality "
                       "and needs labelled samples and a trained model. The position-invariance probe measures whether "
                       "the same content is kept wherever it sits."))
    probe = ev.get("probe")
    if probe and probe.get("results"):
        blocks.append(Para(
            f"Position-invariance probe: the same photo patch ({probe['patch']} px of a {probe['canvas']} px grey "
            f"canvas) at {len(probe['positions'])} positions, question \"{probe['question']}\". A method free of "
            "positional bias keeps about the same fraction of the patch wherever it sits (flat line, spread near 0, "
            "Spearman ρ with the position in the visual sequence near 0); a recency bias shows as a rising line."))
        blocks.append(Fig("probe", "Fraction of the patch's tokens kept vs patch position, per method and budget.",
                          "line plots of the kept fraction of a content patch against its position, one line per method",
                          partial(draw_probe, probe=probe), (TEXT_WIDTH, 4.0)))
        blocks.append(Table(["method", "keep", "spread (max - min)", "Spearman ρ with position", "keep / V"],
                            [[method_label(str(r["method"])), _fmt(r["keep"]), _fmt(r["spread"], 3), _fmt(r["spearman"], 3),
                              _fmt(r["uniform"], 3)] for r in probe["results"]],
                            caption="Position-invariance probe per method and budget (utp: the last layer's survivors, "
                                    "not comparable)."))
    return Section("fidelity", SECTION_TITLES["fidelity"], blocks)


def build_sections(data: ReportData, *, generated: str | None = None) -> list[Section]:
    """The report's sections in order (1-8).

    Parameters
    ----------
    data : ReportData
    generated : str, optional
        Generation timestamp to print (default: now, UTC).
    """
    gen = generated or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        _provenance(data, gen),
        _attention(data),
        _curves(data),
        _consistency(data),
        _density(data),
        _utp(data),
        _pictures(data),
        _fidelity(data),
    ]
