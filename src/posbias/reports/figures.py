"""Figures of the report (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

__all__ = ["binned_mean", "bias_curves_figure", "figure_to_png"]

METHOD_COLORS = {"measured": "#4d4d4d", "pore": "#d95f02", "posprune-pbc": "#1b9e77", "fastv": "#7570b3"}


def binned_mean(x: np.ndarray, y: np.ndarray, *, domain: str, n_bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Mean of y per position: per distinct raster index, or per bin of i/N on [0, 1)."""
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


def figure_to_png(fig: Any) -> bytes:
    """PNG bytes of a figure (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    xlabel = "visual token raster index i" if domain == "index" else "normalised position i/N"
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    xs, ms = binned_mean(x, shallow, domain=domain)
    xd, md = binned_mean(x, deep, domain=domain)
    grid = np.linspace(float(x.min()), float(x.max()), 400)
    ax = axes[0]
    ax.plot(xs, ms, lw=0.9, color="#e7298a", label=f"measured mean, layer {shallow_layer} (shallow)")
    ax.plot(xd, md, lw=0.9, color="#66a61e", label=f"measured mean, layer {deep_layer} (deep)")
    if pore_predict is not None:
        ax.plot(grid, pore_predict(grid), lw=2, color=METHOD_COLORS["pore"], label=f"PoRe fit P(x), layer {pore_layer}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("last-token attention (probability)")
    ax.set_title("Mean attention vs position")
    ax.legend(fontsize=8)
    ax = axes[1]
    xdelta, mdelta = binned_mean(x, shallow - deep, domain=domain)
    ax.plot(xdelta, mdelta, lw=0.9, color=METHOD_COLORS["measured"], label="measured mean ΔA")
    if pbc_predict is not None:
        ax.plot(grid, pbc_predict(grid), lw=2, color=METHOD_COLORS["posprune-pbc"], label="PBC polynomial fit")
    ax.axhline(0.0, color="#999999", lw=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ΔA = A_shallow - A_deep (probability)")
    ax.set_title(f"Positional bias ΔA (layer {shallow_layer} - layer {deep_layer})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
