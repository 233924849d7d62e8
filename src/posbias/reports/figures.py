"""Figures of the report (matplotlib, no display, no pyplot state).

Every ``draw_*`` function draws into a *container*: a :class:`matplotlib.figure.Figure` (the HTML report
saves it as PNG) or a :class:`matplotlib.figure.SubFigure` of an A4 page (the PDF report), so both formats
show the same drawing. Sizes in :data:`FIGURE_SIZES` are in inches at A4 text width (7.2 in), so text stays
legible when printed. Colours come from :mod:`posbias.reports.palette`: one colour per method everywhere.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from posbias.reports.palette import (
    DIVERGING_CMAP,
    LAYER_STYLES,
    REFERENCE,
    SEQUENTIAL_CMAP,
    method_color,
    method_label,
)

__all__ = [
    "RC",
    "TEXT_WIDTH",
    "binned_mean",
    "new_figure",
    "figure_to_png",
    "render_png",
    "bias_curves_figure",
    "draw_attention_maps",
    "draw_vision_map",
    "draw_layer_curves",
    "draw_bias_curves",
    "draw_degree_selection",
    "draw_surface_fits",
    "draw_consistency",
    "draw_density",
    "draw_utp",
    "draw_pictures",
    "pictures_height",
    "draw_fidelity",
]

#: A4 text width in inches (210 mm minus 2 x 15 mm margins)
TEXT_WIDTH = 7.2
#: matplotlib settings of every report figure (legible at A4: 8 pt text, 7 pt ticks)
RC: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
    "pdf.fonttype": 42,
    "image.interpolation": "nearest",
}


def binned_mean(x: np.ndarray, y: np.ndarray, *, domain: str, n_bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Mean of y per position: per distinct raster index, or per bin of i/N on [0, 1).

    Parameters
    ----------
    x, y : np.ndarray
        (n,) positions and values.
    domain : {"index", "normalized"}
    n_bins : int
        Bins of the normalised domain.

    Returns
    -------
    centres, means : np.ndarray
        (k,) positions with data and the mean there.
    """
    if domain == "index":
        idx = x.astype(np.int64)  # (n,)
        counts = np.bincount(idx)
        sums = np.bincount(idx, weights=y)
        keep = counts > 0
        return np.nonzero(keep)[0].astype(np.float64), sums[keep] / counts[keep]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(x, edges) - 1, 0, n_bins - 1)  # (n,)
    counts = np.bincount(which, minlength=n_bins)
    sums = np.bincount(which, weights=y, minlength=n_bins)
    keep = counts > 0
    centres = 0.5 * (edges[:-1] + edges[1:])
    return centres[keep], sums[keep] / counts[keep]


def new_figure(size: tuple[float, float]) -> Any:
    """A pyplot-free figure with constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def figure_to_png(fig: Any, dpi: int = 150) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def render_png(draw: Callable[[Any], None], size: tuple[float, float], dpi: int = 150) -> bytes:
    """Draw into a new figure of ``size`` inches and return its PNG bytes."""
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = new_figure(size)
        draw(fig)
        return figure_to_png(fig, dpi=dpi)


# ------------------------------------------------------------------------------------------ helpers


def _coarsen(x: np.ndarray, ys: Sequence[np.ndarray], max_points: int = 96) -> tuple[np.ndarray, list[np.ndarray]]:
    """Average consecutive points down to at most ``max_points`` (NaN-aware); x (m,), ys (m,) each."""
    m = x.shape[0]
    if m <= max_points:
        return x, [np.asarray(y) for y in ys]
    k = int(np.ceil(m / max_points))
    n = m // k * k

    def red(a: np.ndarray) -> np.ndarray:
        head = np.nanmean(a[:n].reshape(-1, k), axis=1)
        return np.concatenate([head, [np.nanmean(a[n:])]]) if n < m else head

    return red(x), [red(np.asarray(y, dtype=np.float64)) for y in ys]


def _heat(fig: Any, ax: Any, img: np.ndarray, *, title: str, unit: str, cmap: str = SEQUENTIAL_CMAP,
          signed: bool = False, title_color: str = "#000000", labels: tuple[bool, bool] = (True, True)) -> None:
    """One heatmap with its own colour bar (unit on the bar); rows top to bottom like the image."""
    finite = img[np.isfinite(img)]
    kw: dict[str, Any] = {"cmap": cmap}
    if finite.size:
        if signed:
            lim = float(np.max(np.abs(finite))) or 1.0
            kw.update(vmin=-lim, vmax=lim, cmap=DIVERGING_CMAP)
        else:
            kw.update(vmin=float(np.min(finite)), vmax=float(np.max(finite)))
    if not finite.size:
        ax.imshow(np.zeros(img.shape), cmap="Greys", vmin=0, vmax=1, aspect="equal", origin="upper")
        ax.text(img.shape[1] / 2, img.shape[0] / 2, "not profiled\nat this layer", ha="center", va="center", fontsize=6.5)
        ax.set_title(title, color=title_color)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    im = ax.imshow(img, aspect="equal", origin="upper", **kw)
    ax.set_xticks([0, img.shape[1] - 1])
    ax.set_yticks([0, img.shape[0] - 1])
    ax.set_title(title, color=title_color)
    if labels[0]:
        ax.set_ylabel("row (token)")
    if labels[1]:
        ax.set_xlabel("column (token)")
    cb = fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
    cb.set_label(unit, fontsize=6.5)
    cb.ax.tick_params(labelsize=6)
    cb.formatter.set_powerlimits((-2, 3))
    cb.update_ticks()


def _ci_text(level: float) -> str:
    return f"{int(round(level * 100))}%"


def _power(values: np.ndarray) -> int:
    """Power of ten to divide ``values`` by so that the largest is in [1, 10) (0 when they are not small/large)."""
    finite = np.abs(values[np.isfinite(values)])
    top = float(finite.max()) if finite.size else 0.0
    if top == 0.0 or 1e-2 <= top < 1e3:
        return 0
    return int(np.floor(np.log10(top)))


def _unit(text: str, power: int) -> str:
    return text if power == 0 else f"{text}, ×1e{power}"


def _figure_legend(fig: Any, axes: Sequence[Any], *, ncol: int = 3) -> None:
    """One legend for ``axes`` below the plots (never over the data); repeated labels shown once."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(labels)))


# ------------------------------------------------------------------------------------------ legacy


def bias_curves_figure(
    *,
    x: np.ndarray,
    shallow: np.ndarray,
    deep: np.ndarray,
    shallow_layer: int,
    deep_layer: int,
    domain: str,
    pore_predict: Any | None,
    pore_layer: int | None,
    pbc_predict: Any | None,
) -> Any:
    """Measured mean attention vs position at the shallow and deep layer, with the fitted curves.

    Parameters
    ----------
    x : (n,) token positions in the fit domain, pooled over samples
    shallow, deep : (n,) attention at the shallow and deep layer
    pore_predict, pbc_predict : callables x -> fitted value, or None when the fit is absent
    """
    fig = new_figure((TEXT_WIDTH, 2.8))
    xlabel = "visual token raster index i (token)" if domain == "index" else "normalised position i/N"
    axes = fig.subplots(1, 2)
    xs, ms = binned_mean(x, shallow, domain=domain)
    xd, md = binned_mean(x, deep, domain=domain)
    grid = np.linspace(float(x.min()), float(x.max()), 400)
    ax = axes[0]
    ax.plot(xs, ms, lw=0.9, **LAYER_STYLES["shallow"], label=f"measured mean, layer {shallow_layer} (shallow)")
    ax.plot(xd, md, lw=0.9, **LAYER_STYLES["deep"], label=f"measured mean, layer {deep_layer} (deep)")
    if pore_predict is not None:
        ax.plot(grid, pore_predict(grid), lw=2, color=method_color("pore"), label=f"PoRe fit P(x), layer {pore_layer}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("last-token attention (probability)")
    ax.legend()
    ax = axes[1]
    xdelta, mdelta = binned_mean(x, shallow - deep, domain=domain)
    ax.plot(xdelta, mdelta, lw=0.9, color=REFERENCE["measured"], label="measured mean ΔA")
    if pbc_predict is not None:
        ax.plot(grid, pbc_predict(grid), lw=2, color=method_color("posprune-pbc"), label="PBC polynomial fit")
    ax.axhline(0.0, color=REFERENCE["zero"], lw=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ΔA = A_shallow - A_deep (probability)")
    ax.legend()
    return fig


# ------------------------------------------------------------------------------------------ section 2


MAP_COLUMNS: tuple[str, ...] = ("raw", "pore", "posprune-pbc", "adaptprune-gaussian", "pa-att")
_MAP_TITLES = {
    "raw": "raw attention",
    "pore": "PoRe: A / P(x)",
    "posprune-pbc": "PBC: A - ΔA(x)",
    "adaptprune-gaussian": "Gaussian: A · w",
    "pa-att": "UTP PA-Att",
}


def map_columns(maps: dict[str, np.ndarray]) -> list[str]:
    """Corrections that have a map, in display order."""
    return [c for c in MAP_COLUMNS if f"shallow/{c}" in maps]


#: heatmaps per row in the report's map grids: at A4 text width each map is then ~1.8 in (270 px) wide
MAP_GRID_COLUMNS = 3


def map_grid_shape(n_panels: int) -> tuple[int, int]:
    """(rows, columns) of a grid of ``n_panels`` heatmaps, at most :data:`MAP_GRID_COLUMNS` per row."""
    ncols = min(MAP_GRID_COLUMNS, max(n_panels, 1))
    return int(np.ceil(n_panels / ncols)), ncols


def draw_attention_maps(fig: Any, maps: dict[str, np.ndarray], units: dict[str, str], layers: dict[str, int]) -> None:
    """Mean last-token attention on the grid: raw and each correction, at the shallow then the deep layer.

    Panels run left to right, at most :data:`MAP_GRID_COLUMNS` per row, so that each map stays large enough
    to read at the report's width.

    Parameters
    ----------
    maps : dict
        ``"shallow/raw"`` ... -> (R, C) mean per grid cell.
    units : dict
        correction -> colour-bar label.
    layers : dict
        ``{"shallow": l, "deep": l}``.
    """
    cols = map_columns(maps)
    per_layer, ncols = map_grid_shape(len(cols))  # each layer starts a new row
    axes = fig.subplots(2 * per_layer, ncols, squeeze=False)
    for k, lname in enumerate(("shallow", "deep")):
        for i, corr in enumerate(cols):
            r, c = k * per_layer + i // ncols, i % ncols
            color = "#000000" if corr == "raw" else method_color(corr)
            _heat(
                fig, axes[r, c], maps[f"{lname}/{corr}"],
                title=f"{_MAP_TITLES[corr]}\n{lname} layer {layers[lname]}", unit=units[corr],
                title_color=color, labels=(c == 0, i + ncols >= len(cols)),
            )
        for j in range(len(cols), per_layer * ncols):
            axes[k * per_layer + j // ncols, j % ncols].set_visible(False)


def attention_maps_height(maps: dict[str, np.ndarray]) -> float:
    """Height in inches of :func:`draw_attention_maps` at the report's width."""
    rows, _ = map_grid_shape(len(map_columns(maps)))
    return 0.3 + 2.4 * 2 * rows


def draw_vision_map(fig: Any, vision_map: np.ndarray, raw_shallow: np.ndarray, shallow: int) -> None:
    """Vision-encoder importance next to the decoder's shallow-layer attention (same grid)."""
    axes = fig.subplots(1, 2, squeeze=False)[0]
    _heat(fig, axes[0], vision_map, title="vision-encoder importance", unit="importance (attention probability)")
    _heat(fig, axes[1], raw_shallow, title=f"decoder attention, layer {shallow}", unit="attention (probability)",
          labels=(False, True))


def draw_layer_curves(fig: Any, x: np.ndarray, layer_curves: np.ndarray, *, x_label: str, shallow: int, deep: int) -> None:
    """Per-layer mean attention over position: a layer x position map (ratio to the layer's mean) and curves.

    Parameters
    ----------
    x : (m,) positions; layer_curves : (L, m) mean attention per layer and position.
    """
    import matplotlib
    from matplotlib import colors

    n_layers = layer_curves.shape[0]
    axes = fig.subplots(1, 2, width_ratios=[1.0, 1.25])
    rel = layer_curves / np.nanmean(layer_curves, axis=1, keepdims=True)  # (L, m) ratio to the layer mean
    finite = rel[np.isfinite(rel) & (rel > 0)]
    lo, hi = (float(np.quantile(finite, 0.01)), float(np.quantile(finite, 0.99))) if finite.size else (0.5, 2.0)
    lim = max(hi, 1.0 / max(lo, 1e-6), 1.01)
    ax = axes[0]
    im = ax.imshow(np.where(rel > 0, rel, np.nan), aspect="auto", origin="lower", cmap="PuOr_r",
                   norm=colors.LogNorm(vmin=1.0 / lim, vmax=lim), extent=(x[0], x[-1], -0.5, n_layers - 0.5),
                   interpolation="nearest")
    ax.set_xlabel(x_label)
    ax.set_ylabel("decoder layer")
    ax.set_title("attention / layer mean (1 = uniform)")
    for layer, key in ((shallow, "shallow"), (deep, "deep")):
        ax.axhline(layer, color=LAYER_STYLES[key]["color"], ls=LAYER_STYLES[key]["linestyle"], lw=0.6)
    cb = fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
    cb.set_label("ratio to the layer's mean", fontsize=6.5)
    ax = axes[1]
    pick = sorted({int(v) for v in np.linspace(0, n_layers - 1, min(n_layers, 7)).round()} | {shallow, deep})
    cmap = matplotlib.colormaps["viridis"]
    for layer in pick:
        xs, (ys,) = _coarsen(x, [layer_curves[layer]])
        style: dict[str, Any] = {"color": cmap(layer / max(n_layers - 1, 1)), "lw": 1.0}
        if layer in (shallow, deep):
            style["lw"] = 1.8
        label = f"layer {layer}" + (" (shallow)" if layer == shallow else " (deep)" if layer == deep else "")
        ax.plot(xs, ys * layer_curves.shape[1], label=label, **style)
    ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("mean attention × V (1 = uniform)")
    ax.set_title("mean attention per layer (smoothed)")
    ax.legend(ncol=1, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=6.5)


# ------------------------------------------------------------------------------------------ section 3


def draw_bias_curves(
    fig: Any,
    x: np.ndarray,
    bands: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    x_label: str,
    layers: dict[str, int],
    pbc_predict: Callable[[np.ndarray], np.ndarray] | None,
    pbc_band: dict[str, list[float]] | None,
    pore_predict: Callable[[np.ndarray], np.ndarray] | None,
    level: float,
    n_boot: int,
    pore_other: tuple[str, Callable[[np.ndarray], np.ndarray]] | None = None,
) -> None:
    """Measured mean with its cluster-bootstrap band, the fitted PBC polynomial / PoRe exponential, residuals.

    Parameters
    ----------
    x : (m,) positions; bands : name -> (mean, low, high), each (m,), for "delta" and "pore".
    pbc_band : the calibration's pointwise confidence band of the polynomial ({"x", "fit", "low", "high"}).
    pore_other : (label, predict) of PoRe's other exponential form (pure / with offset), drawn dashed.
    """
    axes = fig.subplots(2, 2, height_ratios=[2.2, 1.0], sharex="col")
    ci = _ci_text(level)
    panels = (
        (0, "delta", "posprune-pbc", pbc_predict, "ΔA (probability)",
         f"PosPrune PBC: ΔA = A(layer {layers['shallow']}) - A(layer {layers['deep']})\nand its polynomial fit"),
        (1, "pore", "pore", pore_predict, "mean attention (probability)",
         f"PoRe: mean attention at layer {layers['pore']}\nand its exponential fit"),
    )
    for col, key, method, predict, ylabel, title in panels:
        ax, axr = axes[0, col], axes[1, col]
        mean, low, high = bands[key]
        ax.fill_between(x, low, high, color=REFERENCE["band"], alpha=0.45, lw=0,
                        label=f"{ci} bootstrap band ({n_boot} resamples of samples)")
        ax.plot(x, mean, lw=0.7, color=REFERENCE["measured"], label="measured mean")
        if predict is not None:
            fit = np.asarray(predict(x), dtype=np.float64)  # (m,)
            if method == "posprune-pbc" and pbc_band:
                bx = np.asarray(pbc_band["x"], dtype=np.float64)
                ax.fill_between(bx, pbc_band["low"], pbc_band["high"], color=method_color(method), alpha=0.25, lw=0,
                                label=f"{ci} band of the fit (cluster-robust)")
            ax.plot(x, fit, lw=1.8, color=method_color(method), label=method_label(method) + " fit")
            if method == "pore" and pore_other is not None:
                ax.plot(x, pore_other[1](x), lw=1.2, ls="--", color=method_color(method), label=pore_other[0])
            res = mean - fit  # (m,)
            xs, (rs,) = _coarsen(x, [res], 144)
            axr.plot(x, res, lw=0.5, color=REFERENCE["band"])
            axr.plot(xs, rs, lw=1.0, color=method_color(method), label=f"{method_label(method)} residual (smoothed)")
            axr.axhline(0.0, color=REFERENCE["zero"], lw=0.6)
        else:
            axr.text(0.5, 0.5, "no fit in the calibration", ha="center", va="center", transform=axr.transAxes)
        if method == "posprune-pbc":
            ax.axhline(0.0, color=REFERENCE["zero"], lw=0.6)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        axr.set_ylabel("mean - fit (probability)")
        axr.set_xlabel(x_label)
        for a in (ax, axr):
            a.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _figure_legend(fig, list(axes.ravel()), ncol=2)


def draw_degree_selection(fig: Any, pbc_degree: dict[str, Any] | None, bias_map: dict[str, Any] | None) -> None:
    """Held-out error per polynomial degree (chosen one marked) and the 1-D vs 2-D map comparison.

    Both panels show the excess of each candidate's mean held-out error over the best candidate's, so the
    axis starts at 0. Left: error bars are the fold-paired SE of that excess, the SE the 1-SE rule uses (it
    picks the simplest degree whose bar reaches 0). Right: one row per candidate, error bars the SE over folds.
    """
    n = int(pbc_degree is not None) + int(bias_map is not None)
    axes = fig.subplots(1, max(n, 1), squeeze=False, width_ratios=[1.0, 1.3] if n == 2 else None)[0]
    k = 0
    if pbc_degree is not None:
        ax = axes[k]
        k += 1
        d = np.asarray(pbc_degree["degrees"], dtype=float)
        mse = np.asarray([np.nan if v is None else v for v in pbc_degree["cv_mse"]], dtype=float)
        pse = np.asarray([np.nan if v is None else v for v in pbc_degree.get("paired_se", pbc_degree["cv_se"])], dtype=float)
        pw = _power(np.concatenate([mse - np.nanmin(mse), pse]))
        excess = (mse - np.nanmin(mse)) / 10.0**pw
        pse = pse / 10.0**pw
        ax.errorbar(d, excess, yerr=np.where(np.isfinite(pse), pse, 0.0), fmt="o-", color=REFERENCE["measured"], ms=4,
                    capsize=3, lw=1, label="excess over the best ± 1 SE paired by fold (the 1-SE rule's SE)")
        ax.axhline(0.0, color=REFERENCE["zero"], lw=0.6)
        chosen = pbc_degree.get("chosen")
        if chosen in list(d):
            j = list(d).index(chosen)
            ax.plot([chosen], [excess[j]], "o", ms=10, mfc="none", mec=method_color("posprune-pbc"), mew=2,
                    label=f"chosen degree {chosen} (simplest whose bar reaches 0)")
        ax.set_xticks(d)
        ax.set_xlabel("polynomial degree")
        ax.set_ylabel(_unit("held-out MSE − best\n(probability²", pw) + ")")
        ax.set_title(f"PBC degree: {pbc_degree.get('n_folds')}-fold CV over samples")
    if bias_map is not None:
        ax = axes[k]
        names = list(bias_map.get("candidates", []))
        mse = np.asarray([np.nan if v is None else v for v in bias_map.get("cv_mse", [])], dtype=float)
        se = np.asarray([np.nan if v is None else v for v in bias_map.get("cv_se", [])], dtype=float)
        pw = _power(np.concatenate([mse - np.nanmin(mse), se]))
        excess = (mse - np.nanmin(mse)) / 10.0**pw
        se = se / 10.0**pw
        pos = np.arange(len(names))[::-1]  # first candidate on top
        for p, nm, e, s_ in zip(pos, names, excess, se):
            color = method_color("posprune-pbc") if nm.startswith("1d") else method_color("posprune-pbc-2d")
            best = nm in (bias_map.get("best_1d"), bias_map.get("best_2d"))
            ax.errorbar([e], [p], xerr=[0.0 if not np.isfinite(s_) else s_], fmt="s" if best else "o", color=color,
                        ms=5 if best else 3.5, capsize=2, lw=1, mfc=color if best else "white")
        ax.axvline(0.0, color=REFERENCE["zero"], lw=0.6)
        ax.set_yticks(pos)
        ax.set_yticklabels(names, fontsize=6.5)
        ax.set_xlabel(_unit("held-out MSE - best (probability²", pw) + "), ± 1 SE over folds")
        ax.set_title(f"1-D curves vs 2-D maps\n(filled: best of each; kept: {bias_map.get('chosen')})")
    _figure_legend(fig, [axes[0]], ncol=2)


def draw_surface_fits(fig: Any, panels: list[tuple[str, np.ndarray, str, bool, str]]) -> None:
    """A grid of maps (at most :data:`MAP_GRID_COLUMNS` per row): measured vs fitted 2-D bias surfaces and centre weights.

    Parameters
    ----------
    panels : list of (title, (R, C) map, unit, signed, colour of the title)
    """
    nrows, ncols = map_grid_shape(len(panels))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, (title, img, unit, signed, color) in enumerate(panels):
        r, c = divmod(i, ncols)
        _heat(fig, axes[r, c], img, title=title, unit=unit, signed=signed, title_color=color,
              labels=(c == 0, i + ncols >= len(panels)))
    for j in range(len(panels), nrows * ncols):
        axes.ravel()[j].set_visible(False)


# ------------------------------------------------------------------------------------------ section 4


def draw_consistency(fig: Any, consistency: dict[str, Any]) -> None:
    """Pearson r of two groups' mean ΔA curves vs group size, within and across sources (PosPrune Fig. 4)."""
    ax = fig.subplots(1, 1)
    thr = consistency.get("threshold")
    markers = "osD^v<>p*h"
    for i, c in enumerate(consistency.get("curves", [])):
        n = np.asarray(c["group_sizes"], dtype=float)
        med = np.asarray([np.nan if v is None else v for v in c["r_median"]], dtype=float)
        lo = np.asarray([np.nan if v is None else v for v in c["r_low"]], dtype=float)
        hi = np.asarray([np.nan if v is None else v for v in c["r_high"]], dtype=float)
        kind = c.get("kind", "within")
        label = f"{kind}: {' vs '.join(c.get('sources', []))} -> {c.get('verdict', '')}"
        ls = "-" if kind == "within" else "--"
        color = REFERENCE["measured"] if kind == "within" else "#5B5B9B"
        line = ax.plot(n, med, ls=ls, marker=markers[i % len(markers)], ms=4, lw=1.2, color=color, label=label)[0]
        ax.fill_between(n, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    if thr is not None:
        ax.axhline(float(thr), color=REFERENCE["threshold"], lw=0.9, ls=":", label=f"threshold r = {thr}")
    sizes = [n for c in consistency.get("curves", []) for n in c["group_sizes"]]
    log = bool(sizes) and max(sizes) >= 8 * min(sizes) and len(set(sizes)) >= 3
    if log:
        ax.set_xscale("log")
    ax.set_xticks(sorted(set(sizes)))
    ax.set_xticklabels([str(n) for n in sorted(set(sizes))])
    ax.minorticks_off()
    ax.set_xlabel("group size n (samples per group" + (", log scale)" if log else ")"))
    ax.set_ylabel("Pearson r of the two mean ΔA curves")
    ax.set_title(f"median r over {consistency.get('n_repeats', '?')} random splits, {_ci_text(float(consistency.get('ci', 0.95)))} split interval")
    _figure_legend(fig, [ax], ncol=2)


# ------------------------------------------------------------------------------------------ section 5


def draw_density(fig: Any, density: dict[str, Any]) -> None:
    """Per-block mean proxy entropy with edge blocks marked, and centre vs edge means (PosPrune Fig. 2)."""
    from matplotlib.patches import Rectangle

    axes = fig.subplots(1, 2, width_ratios=[1.3, 1.0])
    block = np.asarray([[np.nan if v is None else v for v in row] for row in density["block_mean"]], dtype=float)
    edge = np.asarray(density["is_edge"], dtype=bool)
    ax = axes[0]
    im = ax.imshow(block, cmap="magma", origin="upper")
    for (r, c), e in np.ndenumerate(edge):
        if e:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#FFFFFF", lw=0))
    ax.set_title("mean log-det per region block (hatched: edge)")
    ax.set_xticks(np.arange(block.shape[1]))
    ax.set_yticks(np.arange(block.shape[0]))
    ax.set_xlabel("block column")
    ax.set_ylabel("block row")
    cb = fig.colorbar(im, ax=ax, shrink=0.85)
    cb.set_label("H = log det(Σ + εI) (nats)", fontsize=6.5)
    ax = axes[1]
    lo, hi = (density.get("diff_ci") or [np.nan, np.nan])[:2]
    diff = float(density["mean_diff"])
    lo = diff if lo is None else float(lo)
    hi = diff if hi is None else float(hi)
    # the difference and its interval: two bars of nearly equal (often large negative) means would hide it
    ax.errorbar([diff], [0], xerr=[[diff - lo], [hi - diff]], fmt="o", color="#333333", ms=6, capsize=4, lw=1.5)
    ax.axvline(0.0, color=REFERENCE["zero"], lw=0.8, ls="--")
    span = max(abs(lo), abs(hi), 1e-12)
    ax.set_xlim(-1.15 * span, 1.15 * span)
    ax.set_yticks([])
    ax.set_ylim(-1, 1)
    ax.spines["left"].set_visible(False)
    ax.set_xlabel("centre - edge mean H (nats)")
    p = (density.get("wilcoxon") or {}).get("p_value")
    ptxt = "n/a" if p is None else f"{p:.2g}"
    ax.set_title(f"centre - edge = {diff:.3g} [{lo:.3g}, {hi:.3g}]\nWilcoxon p = {ptxt}, n = {density.get('n_samples')}")


# ------------------------------------------------------------------------------------------ section 6


def draw_utp(fig: Any, schedules: list[dict[str, Any]], utr_loss: np.ndarray | None, level: float = 0.95) -> None:
    """UTP retained tokens per layer for each compression ratio (UTP Fig. 4c) and l_l per layer."""
    n = int(bool(schedules)) + int(utr_loss is not None)
    axes = fig.subplots(1, max(n, 1), squeeze=False)[0]
    k = 0
    base = method_color("utp")
    if schedules:
        ax = axes[k]
        k += 1
        styles = ["-", "--", "-.", ":"]
        markers = "os^Dv"
        for i, s in enumerate(schedules):
            r = np.asarray(s["schedule"], dtype=float)
            shade = 0.35 + 0.65 * (i + 1) / len(schedules)
            ax.plot(np.arange(r.size), r, ls=styles[i % 4], marker=markers[i % 5], ms=2.5, lw=1.2, color=base,
                    alpha=shade, label=f"ratio {s['ratio']:g}" + (f" ({s['method']})" if s["method"] != "utp" else ""))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("retained visual tokens (tokens)")
        ax.set_title("UTP schedules: retained tokens per layer")
    if utr_loss is not None:
        ax = axes[k]
        loss = np.asarray(utr_loss, dtype=float)  # (S, L)
        mean = np.nanmean(loss, axis=0)  # (L,)
        cnt = np.sum(np.isfinite(loss), axis=0)
        sem = np.nanstd(loss, axis=0, ddof=1) / np.sqrt(np.maximum(cnt, 1)) if loss.shape[0] > 1 else np.zeros_like(mean)
        from scipy import stats as _st

        tq = _st.t.ppf(0.5 + level / 2.0, np.maximum(cnt - 1, 1))
        layers = np.arange(mean.size)
        ax.fill_between(layers, mean - tq * sem, mean + tq * sem, color=base, alpha=0.25, lw=0, label=f"{_ci_text(level)} CI over samples")
        ax.plot(layers, mean, "o-", ms=3, color=base, lw=1.2, label=f"mean l_l over {loss.shape[0]} samples")
        ax.set_xlabel("decoder layer l (all visual tokens removed from l on)")
        ax.set_ylabel("l_l = arccos cos(f_l, g) (radians)")
        ax.set_title("information loss l_l per layer")
    _figure_legend(fig, list(axes), ncol=4)


# ------------------------------------------------------------------------------------------ section 7


#: height of an overview panel relative to its sample's main panels
OVERVIEW_SCALE = 0.5


def _aspect(row: dict[str, Any]) -> float:
    h, w = row["size"]
    return float(np.clip(float(h) / float(w), 0.45, 1.6))


def pictures_height(rows: list[dict[str, Any]], n_columns: int, width: float = TEXT_WIDTH) -> float:
    """Inches :func:`draw_pictures` needs for ``rows`` at ``width`` (at most 9.5, one A4 page)."""
    col = width / n_columns
    units = sum(_aspect(r) * (1.0 + (OVERVIEW_SCALE if r.get("overview_tile") is not None else 0.0)) for r in rows)
    extra = sum(0.22 if r.get("overview_tile") is not None else 0.0 for r in rows)  # the panels' count labels
    return float(min(9.5, units * col * 1.05 + extra + 0.5))


def _picture_panel(ax: Any, row: dict[str, Any], which: np.ndarray, kept: Any, colour: str | None,
                   outline_tiles: bool) -> tuple[int, int]:
    """The picture with the tokens of ``which`` (V,) bool: pruned ones darkened, kept ones outlined in ``colour``
    (``kept`` None: the picture alone); the tile boxes outlined when ``outline_tiles``. Returns (kept, tokens)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    h, w = (float(x) for x in row["size"])
    img = row["image"]
    extent = (0.0, w, h, 0.0)
    if img is not None:
        ax.imshow(img, extent=extent, interpolation="bilinear")
    else:
        ax.imshow(np.full((2, 2), 0.85), cmap="gray", vmin=0, vmax=1, extent=extent)
    cells = row["cells"]  # (V, 4) top, left, bottom, right; NaN: separator
    shown = which & np.all(np.isfinite(cells), axis=1)  # (V,) separators are never drawn
    n_kept = 0
    if kept is not None:
        mask = np.zeros(cells.shape[0], dtype=bool)  # (V,)
        mask[np.asarray(kept, dtype=np.int64)] = True
        on, off = cells[shown & mask], cells[shown & ~mask]
        n_kept = int(on.shape[0])

        def rects(boxes: np.ndarray) -> list[Any]:
            return [Rectangle((b[1], b[0]), b[3] - b[1], b[2] - b[0]) for b in boxes]

        ax.add_collection(PatchCollection(rects(off), facecolor="black", alpha=0.72, edgecolor="none",
                                          antialiased=False))
        ax.add_collection(PatchCollection(rects(on), facecolor="none", edgecolor=colour, linewidths=0.6))
    if outline_tiles:
        for b in row["tile_boxes"]:
            ax.add_patch(Rectangle((b[1], b[0]), b[3] - b[1], b[2] - b[0], fill=False, edgecolor="white",
                                   lw=0.7, alpha=0.9))
    ax.set_xlim(0.0, w)
    ax.set_ylim(h, 0.0)
    ax.set_aspect("equal")
    return n_kept, int(shown.sum())


def draw_pictures(fig: Any, rows: list[dict[str, Any]], methods: list[str]) -> None:
    """Kept tokens of each method overlaid on real images (AdaptPrune Fig. 6).

    Parameters
    ----------
    rows : list of dict
        Per sample: ``image`` ((H, W, 3) uint8 array or None), ``size`` (height, width) of the picture in the
        units of ``cells``, ``cells`` ((V, 4) float top, left, bottom, right of every visual token; NaN for
        separators), ``overview`` ((V,) bool: token of the overview tile), ``tile_boxes`` ((N, 4) float),
        ``overview_tile`` (int or None), ``title`` (str) and ``kept`` {method: (k,) int token indices or None}.
        A sample with an overview tile gets a second, smaller row: the overview tile's tokens on the whole image.
    methods : list of str
        Column order.
    """
    ncol = len(methods) + 1
    heights: list[float] = []
    for row in rows:
        heights.append(_aspect(row))
        if row.get("overview_tile") is not None:
            heights.append(OVERVIEW_SCALE * _aspect(row))
    gs = fig.add_gridspec(len(heights), ncol, height_ratios=heights)
    g = 0
    for i, row in enumerate(rows):
        ov = row.get("overview_tile") is not None
        main = [fig.add_subplot(gs[g, j]) for j in range(ncol)]
        small = [fig.add_subplot(gs[g + 1, j]) for j in range(ncol)] if ov else []
        g += 2 if ov else 1
        in_main = ~np.asarray(row["overview"], dtype=bool)  # (V,)
        multi = ov or len(row["tile_boxes"]) > 1
        _picture_panel(main[0], row, in_main, None, None, multi)
        if i == 0:
            main[0].set_title("image\n(tiles outlined)" if multi else "image\n(grid area)", fontsize=6.5)
        main[0].set_ylabel("\n".join(_short(row["title"])), fontsize=6)
        if ov:
            _picture_panel(small[0], row, ~in_main, None, None, False)
            small[0].set_xlabel("overview tile", fontsize=6)
        for j, m in enumerate(methods):
            kept = row["kept"].get(m)
            col = method_color(m)
            k, n = _picture_panel(main[j + 1], row, in_main, kept, col, multi)
            if kept is None:
                main[j + 1].text(row["size"][1] / 2, row["size"][0] / 2, "not available", ha="center", va="center",
                                 fontsize=6.5, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
            elif ov:
                main[j + 1].set_xlabel(f"{k}/{n} kept", fontsize=6)
            if i == 0:
                head = f"{k}/{n} kept" if kept is not None and not ov else ""
                main[j + 1].set_title(f"{_wrap_name(m)}\n{head}", fontsize=6.5, color=col)
            if ov:
                k, n = _picture_panel(small[j + 1], row, ~in_main, kept, col, False)
                if kept is not None:
                    small[j + 1].set_xlabel(f"overview {k}/{n}", fontsize=6)
        for ax in main + small:
            ax.set_xticks([])
            ax.set_yticks([])


def _wrap_name(name: str, width: int = 11) -> str:
    """A method name broken after its hyphens when it is wider than a picture column."""
    return name if len(name) <= width else name.replace("-", "-\n")


def _short(title: str, width: int = 22) -> list[str]:
    """A sample title broken into at most 3 lines of ``width`` characters."""
    import textwrap

    lines = textwrap.wrap(title.replace("/", "/ ").replace(":", ": "), width=width)
    return [ln.replace("/ ", "/").replace(": ", ":") for ln in lines[:3]]


# ------------------------------------------------------------------------------------------ section 8


def draw_fidelity(fig: Any, results: list[dict[str, Any]]) -> None:
    """KL, agreement, accuracy, FLOPs and prefill time vs the number of kept tokens, one line per method."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_method.setdefault(str(r["method"]), []).append(r)
    have_acc = any(r.get("accuracy") is not None for r in results)
    panels = [("kl_mean", "kl_sem", "KL(full ‖ pruned) (nats)", True),
              ("top1_agreement", None, "top-1 agreement (fraction)", False),
              ("accuracy" if have_acc else "exact_agreement", None,
               "accuracy (fraction)" if have_acc else "exact agreement (fraction)", False),
              ("prefill_ms", None, "prefill time (ms)", False)]
    axes = fig.subplots(2, 2).ravel()
    markers = "osD^v<>ph*"
    for ax, (key, err, ylabel, logy) in zip(axes, panels):
        for i, (m, rs) in enumerate(sorted(by_method.items())):
            rs = sorted(rs, key=lambda d: float(d["keep"]))
            k = np.asarray([float(d["keep"]) for d in rs])
            y = np.asarray([np.nan if d.get(key) is None else float(d[key]) for d in rs])
            if not np.any(np.isfinite(y)):
                continue
            e = None if err is None else np.asarray([0.0 if d.get(err) is None else float(d[err]) for d in rs])
            ax.errorbar(k, y, yerr=e, marker=markers[i % len(markers)], ms=3.5, lw=1.2, capsize=2,
                        color=method_color(m), label=method_label(m))
        if key == "prefill_ms":
            full = [float(d["prefill_ms_full"]) for d in results if d.get("prefill_ms_full") is not None]
            if full:
                ax.axhline(float(np.median(full)), color=method_color("full"), lw=0.9, ls=":", label="unpruned (median)")
        if logy:
            finite = [float(d[key]) for d in results if d.get(key) is not None and float(d[key]) > 0]
            if finite:
                ax.set_yscale("log")
        ax.set_xlabel("kept visual tokens (tokens)")
        ax.set_ylabel(ylabel)
    handles, labels = axes[0].get_legend_handles_labels()
    h3, l3 = axes[3].get_legend_handles_labels()
    for h, lab in zip(h3, l3):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)))


def draw_probe(fig: Any, probe: dict[str, Any]) -> None:
    """Position-invariance probe: kept fraction of the patch's tokens vs its position, one line per method, one
    panel per budget; the dotted line is keep / V (what a position-blind random choice keeps on average)."""
    pos = probe["positions"]
    order = np.argsort([p["mean_index"] for p in pos], kind="stable")  # raster order of the patch
    labels = [f"({pos[i]['x']},{pos[i]['y']})" for i in order]
    keeps = sorted({int(r["keep"]) for r in probe["results"]})
    axes = np.atleast_1d(fig.subplots(1, len(keeps), sharey=True))
    markers = "osD^v<>ph*"
    for ax, k in zip(axes, keeps):
        rows = sorted((r for r in probe["results"] if int(r["keep"]) == k), key=lambda r: str(r["method"]))
        for i, r in enumerate(rows):
            f = np.asarray(r["fraction"], dtype=np.float64)[order]
            rho = "n/a" if r["spearman"] is None else f"{r['spearman']:+.2f}"
            ax.plot(np.arange(f.size), f, marker=markers[i % len(markers)], ms=3.5, lw=1.2,
                    color=method_color(str(r["method"])),
                    label=f"{method_label(str(r['method']))} (spread {r['spread']:.2f}, ρ {rho})")
        if rows:
            ax.axhline(float(rows[0]["uniform"]), color=REFERENCE["zero"], lw=0.8, ls=":", label="keep / V")
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels, rotation=60, fontsize=6)
        ax.set_xlabel("patch position (x, y px), in visual-sequence order")
        ax.set_title(f"keep {k}")
    axes[0].set_ylabel("patch tokens kept (fraction)")
    handles, labels = axes[0].get_legend_handles_labels()
    if len(keeps) > 1:  # spread and rho differ per budget: name the methods only
        labels = [lab.split(" (spread")[0] for lab in labels]
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=6)  # below: the lines stay visible
