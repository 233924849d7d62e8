"""Section 7 of the report: real sample images with the visual tokens each method keeps.

Images are reloaded through :mod:`posbias.data.registry` from the store's ``"source:key"`` ids (the
sources named in the store's ``data`` attribute, e.g. the embedded photos). The kept sets are computed
here from the stored attention rows and the calibration by every registered method that scores one attention
row (:func:`posbias.runtime.select.select_stored`: built-ins ``fastv``, ``pore``, ``posprune-pbc``), the
AdaptPrune centre weight (``adaptprune-gaussian``) and the position-agnostic rows (``pa-att``) when profiled;
an evaluation JSON adds the ``kept`` lists of every method it ran.

Multi-tile layouts (LLaVA-NeXT, InternVL) are computed as the pruner computes them: the grid tokens only
(separators are never candidates), each scored with its own tile's row and column. Where each tile lies in the
picture is the architecture's answer (:meth:`posbias.models.base.Architecture.tile_placement`), from the tiles'
grids the store holds and the reloaded image's size; the overview tile (the whole image at low resolution) is
drawn as a panel of its own, separators never.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["STORE_METHODS", "load_sample_image", "crop_for_adapter", "picture_geometry", "kept_from_store",
           "kept_from_evaluation", "picture_rows"]

#: report columns computed from the stored attention rows besides the registered single-row methods
STORE_METHODS: tuple[str, ...] = ("adaptprune-gaussian", "pa-att")


def _specs(attrs: dict[str, Any]) -> list[str]:
    data = attrs.get("data")
    if isinstance(data, str):
        return [s for s in data.split(",") if s.strip()]
    if isinstance(data, (list, tuple)):
        return [str(s) for s in data]
    return []


def load_sample_image(sample_id: str, attrs: dict[str, Any], cache: dict[str, Any] | None = None) -> tuple[Any | None, str]:
    """Reload a stored sample's image from its source.

    Parameters
    ----------
    sample_id : str
        ``"source:key"`` as stored.
    attrs : dict
        Store root attributes (``data`` names the sources and their paths).
    cache : dict, optional
        Source objects by name, reused across calls.

    Returns
    -------
    (PIL.Image or None, str)
        The RGB image, or None and one line saying why it could not be loaded.
    """
    from posbias.data.registry import get_source, known_sources, parse_spec

    name, _, key = sample_id.partition(":")
    cache = {} if cache is None else cache
    try:
        if name not in cache:
            spec = next((s for s in _specs(attrs) if parse_spec(s)[0] == name), None)
            if spec is None and name in known_sources():
                spec = name
            if spec is None:
                cache[name] = None
            else:
                src = get_source(spec)
                cache[name] = (src, {src.key(i): i for i in range(min(len(src), 200_000))})
        entry = cache[name]
        if entry is None:
            return None, f"source {name!r} is not registered or not named in the store's data attribute"
        src, index = entry
        if key not in index:
            return None, f"record {key!r} not found in source {name!r}"
        sample = src.load(index[key])
        return sample.image.convert("RGB"), ""
    except Exception as exc:  # noqa: BLE001 - a missing dataset must not stop the report; the reason is shown
        return None, " ".join(str(exc).split())[:200]


def _architecture_class(adapter: str) -> Any:
    """The architecture class of a stored adapter name; the base class (no crop) for a name no adapter has."""
    from posbias.models.base import Architecture
    from posbias.models.registry import ADAPTERS, architecture_class

    return architecture_class(adapter) if adapter in ADAPTERS else Architecture


def crop_for_adapter(image: Any, adapter: str, grid: tuple[int, int], max_side: int = 336) -> np.ndarray:
    """The part of the image the visual grid covers, as (H, W, 3) uint8.

    The architecture's crop rule (:meth:`posbias.models.base.Architecture.crop_image`) decides: LLaVA-1.5's
    CLIP processor resizes the shortest side and centre-crops a square, so the grid covers the central
    square; Qwen2-VL and Qwen2.5-VL resize the whole image to the grid's aspect ratio.
    """
    img = _architecture_class(adapter).crop_image(image)
    r, c = grid
    scale = max_side / max(r, c)
    img = img.resize((max(1, int(round(c * scale))), max(1, int(round(r * scale)))))
    return np.asarray(img, dtype=np.uint8)  # (H, W, 3) uint8


def picture_geometry(adapter: str, size: tuple[int, int], tokens: Any) -> dict[str, Any]:
    """Where each visual token of a sample lies in its picture.

    Parameters
    ----------
    adapter : str
        The store's adapter name (its architecture places the tiles).
    size : (height, width)
        Size of the picture (the architecture's crop of the image) in pixels; any unit for a grid drawn on grey.
    tokens : TokenGrid
        The sample's layout (row, col, tile and separator flag per token; the tiles' grids).

    Returns
    -------
    dict
        ``cells`` (V, 4) float64 (top, left, bottom, right) of every token (NaN for separators), ``overview``
        (V,) bool (the token belongs to the overview tile), ``tile_boxes`` (N, 4) float64 and ``overview_tile``
        (int or None).

    Raises
    ------
    posbias.errors.PosbiasError
        When the architecture cannot place the tiles.
    """
    placement = _architecture_class(adapter).tile_placement(size, tuple(tuple(int(x) for x in g) for g in tokens.tiles))
    boxes = np.asarray(placement.boxes, dtype=np.float64)  # (N, 4)
    v = int(np.asarray(tokens.rows).shape[0])
    tile = np.zeros(v, np.int64) if tokens.tile is None else np.asarray(tokens.tile, np.int64)  # (V,)
    sep = np.zeros(v, bool) if tokens.separator is None else np.asarray(tokens.separator, bool)  # (V,)
    grids = np.asarray(tokens.tiles, dtype=np.float64)[tile]  # (V, 2) each token's own tile's grid
    box = boxes[tile]  # (V, 4)
    dy = (box[:, 2] - box[:, 0]) / grids[:, 0]  # (V,) cell height
    dx = (box[:, 3] - box[:, 1]) / grids[:, 1]  # (V,) cell width
    r = np.asarray(tokens.rows, np.float64)
    c = np.asarray(tokens.cols, np.float64)
    cells = np.stack([box[:, 0] + r * dy, box[:, 1] + c * dx, box[:, 0] + (r + 1) * dy, box[:, 1] + (c + 1) * dx], axis=1)
    cells[sep] = np.nan
    ov = placement.overview
    return {"cells": cells, "overview": (tile == ov) if ov is not None else np.zeros(v, bool), "tile_boxes": boxes,
            "overview_tile": ov}


def _one_tile(grid: tuple[int, int]) -> Any:
    from posbias.models.base import TokenGrid

    return TokenGrid.raster(grid)


def kept_from_store(attn: np.ndarray, calibration: Any, keep: int, *, grid: tuple[int, int],
                    attn_pa: np.ndarray | None = None, tokens: Any = None) -> dict[str, np.ndarray]:
    """Kept tokens per method for one stored sample.

    Parameters
    ----------
    attn : np.ndarray
        (V, L) float32 stored attention of the sample (every visual token, separators included).
    calibration : Calibration
    keep : int
        Grid tokens to keep (clipped to 1..V minus separators).
    grid : (rows, cols)
        The first tile's grid.
    attn_pa : np.ndarray, optional
        (V,) position-agnostic attention at the shallow layer.
    tokens : TokenGrid, optional
        The sample's layout (multi-tile stores); None: one tile of ``grid`` in raster order.

    Returns
    -------
    dict
        method -> (k,) int64 ascending indices into the sample's visual tokens (never a separator).
    """
    import torch

    from posbias.runtime.registry import known_methods
    from posbias.runtime.select import select_stored

    methods = calibration.methods
    v = attn.shape[0]
    tokens = _one_tile(grid) if tokens is None else tokens
    sep = np.zeros(v, bool) if tokens.separator is None else np.asarray(tokens.separator, bool)  # (V,)
    cand = np.flatnonzero(~sep)  # (V_c,) the pruning candidates
    k = int(min(max(1, keep), cand.shape[0]))
    out: dict[str, np.ndarray] = {}
    rows = torch.from_numpy(np.ascontiguousarray(attn, dtype=np.float32))  # (V, L)
    for m in known_methods():  # every registered method that scores one stored attention row
        kept = select_stored(m, rows, calibration, keep=k, grid=grid, tokens=tokens)
        if kept is not None:
            out[m] = kept.numpy()
    g = methods.get("adaptprune-gaussian")
    if g is not None:
        from posbias.kernels import gaussian_centre_weight

        sigma = float(g["fit"]["learned"]["sigma_"])
        tile = np.zeros(v, np.int64) if tokens.tile is None else np.asarray(tokens.tile, np.int64)  # (V,)
        mask = np.zeros(v, dtype=np.float64)  # (V,) centre weight on each token's own tile (0 at separators)
        for t, tgrid in enumerate(tokens.tiles):
            here = np.flatnonzero((tile == t) & ~sep)
            if here.size:
                mask[here] = gaussian_centre_weight(np.asarray(tokens.rows)[here], np.asarray(tokens.cols)[here],
                                                    tuple(int(x) for x in tgrid), sigma)
        score = attn[cand, int(g["layer"])].astype(np.float64) * mask[cand]  # (V_c,)
        out["adaptprune-gaussian"] = np.sort(cand[np.argsort(-score, kind="stable")[:k]])
    if attn_pa is not None:
        pa = np.asarray(attn_pa, dtype=np.float64)[cand]  # (V_c,)
        out["pa-att"] = np.sort(cand[np.argsort(-pa, kind="stable")[:k]])
    return out


def kept_from_evaluation(evaluation: dict[str, Any] | None, sample_id: str, keep: int) -> dict[str, np.ndarray]:
    """Kept lists of every method the evaluation ran on ``sample_id``, at the budget closest to ``keep``."""
    out: dict[str, np.ndarray] = {}
    if not evaluation:
        return out
    best: dict[str, tuple[float, list[int]]] = {}
    for rec in evaluation.get("per_sample", []):
        if str(rec.get("id")) != sample_id or not isinstance(rec.get("kept"), list):
            continue
        m = str(rec.get("method"))
        dist = abs(float(rec.get("keep", keep)) - keep)
        if m not in best or dist < best[m][0]:
            best[m] = (dist, rec["kept"])
    for m, (_, kept) in best.items():
        out[m] = np.asarray(sorted(int(i) for i in kept), dtype=np.int64)
    return out


def _thumbnail(picture: Any, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 of a PIL picture whose longer side is at most ``max_side`` (aspect kept)."""
    w, h = picture.size
    scale = min(1.0, max_side / max(w, h))
    small = picture.resize((max(1, int(round(w * scale))), max(1, int(round(h * scale))))) if scale < 1.0 else picture
    return np.asarray(small.convert("RGB"), dtype=np.uint8)


def picture_rows(data: Any, keep: int) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Rows for :func:`posbias.reports.figures.draw_pictures`, the method columns and notes to print.

    Parameters
    ----------
    data : ReportData
    keep : int

    Returns
    -------
    rows, methods, notes
    """
    from posbias.errors import PosbiasError

    cache: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    adapter = str(data.attrs.get("adapter", ""))
    arch = _architecture_class(adapter)
    for p in data.picked:
        tokens = _one_tile(p.grid) if p.tokens is None else p.tokens
        multi = len(tokens.tiles) > 1 or (tokens.separator is not None and bool(np.any(tokens.separator)))
        kept: dict[str, np.ndarray] = {}
        if p.attn is not None:
            kept.update(kept_from_store(p.attn, data.calibration, keep, grid=p.grid, attn_pa=p.attn_pa, tokens=tokens))
        for m, idx in kept_from_evaluation(data.evaluation, p.id, keep).items():
            kept.setdefault(m, idx)
        if not kept:
            continue
        image, why = load_sample_image(p.id, data.attrs, cache)
        picture = None
        if image is not None:
            try:
                picture = arch.crop_image(image)
            except Exception as exc:  # noqa: BLE001 - show the grid without the photo, say why
                why = f"image could not be cropped ({exc})"
        if picture is not None:
            size: tuple[int, int] = (int(picture.height), int(picture.width))
        elif multi:
            notes.append(f"{p.id}: not drawn ({why}); where its tiles lie depends on the image's size.")
            continue
        else:
            size = (int(p.grid[0]), int(p.grid[1]))
            notes.append(f"{p.id}: image not shown ({why}); the grid is drawn on grey.")
        try:
            geometry = picture_geometry(adapter, size, tokens)
        except PosbiasError as exc:
            notes.append(f"{p.id}: not drawn ({exc}).")
            continue
        arr = None if picture is None else _thumbnail(picture, 448 if multi else 336)
        where = "store" if p.index >= 0 else "evaluation"
        rows.append({"image": arr, "size": size, "grid": p.grid, **geometry, "title": f"{p.id} ({where})",
                     "kept": kept, "question": p.question})
    from posbias.reports.palette import method_names

    order = method_names()
    present = {m for r in rows for m in r["kept"]}
    methods = [m for m in order if m in present] + sorted(present - set(order))
    return rows, methods, notes
