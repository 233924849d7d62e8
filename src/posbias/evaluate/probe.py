"""Position-invariance probe: is the same content kept wherever it sits in the image?

The same content patch (a crop of a real photo) is pasted at a grid of positions on a neutral grey canvas and
the model is asked one question about it. For each method and budget the pruner runs a prefill per position and
the probe records the fraction of the patch's visual tokens that survive pruning. A method free of positional
bias keeps about the same fraction everywhere; the recency bias of 1-D RoPE shows as a slope in raster order
(FastV keeps the patch more often near the end of the visual sequence). Per (method, keep):

- ``fraction``: (P,) kept fraction of the patch's tokens at each position (``kept`` tokens over patch tokens);
- ``spread``: max - min of ``fraction`` over positions;
- ``spearman``: Spearman rank correlation of ``fraction`` with the patch's position in the visual sequence
  (the mean raster index of its tokens); ``None`` when ``fraction`` is constant.

This measures positional invariance only, not fidelity to the full model nor task quality (docs/evaluation.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from posbias.errors import PosbiasError

__all__ = ["PROBE_QUESTION", "probe_canvases", "patch_tokens", "position_probe", "format_probe"]

PROBE_QUESTION = "What is in this picture?"


def _patch_image(size: int) -> Any:
    """A ``size x size`` crop of scikit-image's astronaut photo (face and shoulders), as a PIL image."""
    from PIL import Image
    from skimage import data as skdata

    photo = skdata.astronaut()  # (512, 512, 3) uint8
    return Image.fromarray(photo[20:276, 120:376]).resize((size, size), Image.BICUBIC)


def probe_canvases(canvas: int, patch: int, steps: int, *, background: int = 128) -> list[tuple[Any, tuple[int, int]]]:
    """``steps x steps`` canvases (PIL, ``canvas`` px square) with the patch's top-left at evenly spaced offsets.

    Returns
    -------
    list of (PIL.Image, (x, y))
        Canvases in raster order of the patch position, with the patch's top-left pixel.
    """
    from PIL import Image

    if patch > canvas or steps < 2:
        raise PosbiasError(f"probe: patch {patch}px must fit a {canvas}px canvas and steps={steps} must be >= 2")
    content = _patch_image(patch)
    offsets = [int(round(t)) for t in np.linspace(0, canvas - patch, steps)]
    out = []
    for y in offsets:
        for x in offsets:
            img = Image.new("RGB", (canvas, canvas), (background,) * 3)
            img.paste(content, (x, y))
            out.append((img, (x, y)))
    return out


def patch_tokens(rows: np.ndarray, cols: np.ndarray, grid: tuple[Any, Any], box: tuple[int, int, int, int],
                 canvas: int) -> np.ndarray:
    """(V,) bool: visual tokens whose cell centre lies inside the pixel ``box`` (x0, y0, x1, y1) of the canvas.

    The grid covers the whole canvas (LLaVA's 336 px square maps to its 24 x 24 grid; Qwen2.5-VL resizes the
    canvas as a whole; each LLaVA-NeXT tile covers a square canvas whole). ``grid`` is (rows, cols), ints or
    (V,) arrays (each token's own tile grid).
    """
    cy = (rows.astype(np.float64) + 0.5) / grid[0] * canvas  # (V,)
    cx = (cols.astype(np.float64) + 0.5) / grid[1] * canvas  # (V,)
    x0, y0, x1, y1 = box
    return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


def position_probe(adapter: Any, calibration: Any, methods: list[str], keeps: list[int], *, steps: int = 3,
                   patch_fraction: float = 1 / 3, params: dict[str, dict[str, Any]] | None = None,
                   question: str = PROBE_QUESTION, canvas: int = 336) -> dict[str, Any]:
    """Run the probe; returns the ``probe`` section of the evaluation document (docs/evaluation.md).

    Parameters
    ----------
    adapter : posbias adapter
    calibration : Calibration
    methods, keeps : list
        Methods and kept-token budgets (as :func:`posbias.evaluate.evaluate`).
    steps : int
        Positions per axis (``steps**2`` positions).
    patch_fraction : float
        Patch side over canvas side.
    canvas : int
        Canvas side in pixels (336: LLaVA-1.5's input, 24 x 24 tokens of 14 px; Qwen2.5-VL: 12 x 12 merged tokens).
    """
    import torch
    from scipy.stats import spearmanr

    from posbias.runtime.prune import enable_pruning

    params = params or {}
    size = int(canvas)
    patch = int(round(size * float(patch_fraction)))
    canvases = probe_canvases(size, patch, int(steps))
    positions, masks, inputs_list = [], [], []
    for img, (x, y) in canvases:
        inputs = adapter.prepare(img, question)
        lay = adapter.layout(inputs)
        grids = np.asarray(lay.tiles, dtype=np.int64)[lay.tile]  # (V, 2) each token's tile grid (tiles span the canvas)
        mask = patch_tokens(lay.rows, lay.cols, (grids[:, 0], grids[:, 1]), (x, y, x + patch, y + patch), size)
        mask &= ~lay.separator  # (V,) separators (LLaVA-NeXT's newlines) cover no pixels
        if not mask.any():
            raise PosbiasError(f"probe: the patch at ({x}, {y}) covers no visual token; use a larger patch")
        order = np.arange(lay.n_visual, dtype=np.int64)  # (V,) place along the visual run (= raster for one grid)
        positions.append({"x": x, "y": y, "tokens": int(mask.sum()), "mean_index": float(order[mask].mean())})
        masks.append(mask)
        inputs_list.append(inputs)
        n_sep = int(lay.separator.sum())  # the budget is over the grid tokens; separators are always kept
    results = []
    order = np.asarray([p["mean_index"] for p in positions])  # (P,)
    for m in methods:
        for k in keeps:
            frac = []
            for inputs, mask in zip(inputs_list, masks):
                # force: as the evaluation, the probe measures every method, weak or unusable curves included
                with enable_pruning(adapter.model, calibration, method=m, keep=k, params=params.get(m),
                                    force=True) as pruner:
                    with torch.inference_mode():
                        adapter.model(**inputs)
                    kept = pruner.last.kept.numpy()
                frac.append(float(mask[kept].sum() / mask.sum()))
            f = np.asarray(frac)  # (P,)
            rho = None
            if np.ptp(f) > 0:
                rho = float(spearmanr(order, f).statistic)
            results.append({"method": m, "keep": int(k), "fraction": [float(v) for v in f],
                            "spread": float(np.ptp(f)), "spearman": rho,
                            "uniform": float(k) / float(masks[0].size - int(n_sep))})
    return {"question": question, "canvas": size, "patch": patch, "steps": int(steps), "background": 128,
            "content": "skimage.data.astronaut crop [20:276, 120:376]", "positions": positions, "results": results}


def format_probe(probe: dict[str, Any]) -> str:
    """Terminal table of the probe: kept fraction of the patch per position, spread and Spearman rho."""
    pos = probe["positions"]
    head = ["method", "keep", "uniform"] + [f"({p['x']},{p['y']})" for p in pos] + ["spread", "spearman"]
    rows = [head]
    for r in probe["results"]:
        rows.append([r["method"], str(r["keep"]), f"{r['uniform']:.2f}"] + [f"{v:.2f}" for v in r["fraction"]]
                    + [f"{r['spread']:.2f}", "-" if r["spearman"] is None else f"{r['spearman']:+.2f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(0, "position-invariance probe: fraction of the patch's tokens kept at each patch position (x, y px, "
                    "raster order); spearman = rank correlation with the position in the visual sequence")
    return "\n".join(lines)
