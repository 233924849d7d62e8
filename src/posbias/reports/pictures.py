"""Section 7 of the report: real sample images with the visual tokens each method keeps.

Images are reloaded through :mod:`posbias.data.registry` from the store's ``"source:key"`` ids (the
sources named in the store's ``data`` attribute, e.g. the embedded photos). The kept sets are computed
here from the stored attention rows and the calibration with :func:`posbias.runtime.select_tokens`
(``fastv``, ``pore``, ``posprune-pbc``), the AdaptPrune centre weight (``adaptprune-gaussian``) and the
position-agnostic rows (``pa-att``) when profiled; an evaluation JSON adds the ``kept`` lists of every
method it ran.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["STORE_METHODS", "load_sample_image", "crop_for_adapter", "kept_from_store", "kept_from_evaluation", "picture_rows"]

#: methods whose kept set the report computes itself from the stored attention rows
STORE_METHODS: tuple[str, ...] = ("fastv", "pore", "posprune-pbc", "adaptprune-gaussian", "pa-att")


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


def kept_from_store(attn: np.ndarray, calibration: Any, keep: int, *, grid: tuple[int, int], attn_pa: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Kept raster indices per method for one stored sample.

    Parameters
    ----------
    attn : np.ndarray
        (V, L) float32 stored attention of the sample.
    calibration : Calibration
    keep : int
        Tokens to keep (clipped to 1..V).
    grid : (rows, cols)
    attn_pa : np.ndarray, optional
        (V,) position-agnostic attention at the shallow layer.

    Returns
    -------
    dict
        method -> (k,) int64 ascending raster indices.
    """
    import torch

    from posbias.runtime import select_tokens
    from posbias.runtime import scoring as _scoring

    methods = calibration.methods
    v = attn.shape[0]
    k = int(min(max(1, keep), v))
    out: dict[str, np.ndarray] = {}
    for m in ("fastv", "pore", "posprune-pbc"):
        if m not in methods:
            continue
        try:
            layer = int(_scoring.method_layer(m, calibration))
        except TypeError:  # pragma: no cover - older argument order
            layer = int(_scoring.method_layer(calibration, m))  # type: ignore[arg-type]
        row = torch.from_numpy(np.ascontiguousarray(attn[:, layer], dtype=np.float32))  # (V,)
        out[m] = select_tokens(m, row, calibration, keep=k, n_visual=v).numpy()
    g = methods.get("adaptprune-gaussian")
    if g is not None:
        from posbias.kernels import gaussian_centre_weight

        sigma = float(g["fit"]["learned"]["sigma_"])
        ids = np.arange(v, dtype=np.int64)  # (V,) raster
        mask = gaussian_centre_weight(ids // grid[1], ids % grid[1], grid, sigma)  # (V,) float64
        score = attn[:, int(g["layer"])].astype(np.float64) * mask  # (V,)
        out["adaptprune-gaussian"] = np.sort(np.argsort(-score, kind="stable")[:k])
    if attn_pa is not None:
        out["pa-att"] = np.sort(np.argsort(-np.asarray(attn_pa, dtype=np.float64), kind="stable")[:k])
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
    cache: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    adapter = str(data.attrs.get("adapter", ""))
    for p in data.picked:
        kept: dict[str, np.ndarray] = {}
        if p.attn is not None:
            kept.update(kept_from_store(p.attn, data.calibration, keep, grid=p.grid, attn_pa=p.attn_pa))
        for m, idx in kept_from_evaluation(data.evaluation, p.id, keep).items():
            kept.setdefault(m, idx)
        if not kept:
            continue
        image, why = load_sample_image(p.id, data.attrs, cache)
        arr = None
        if image is not None:
            try:
                arr = crop_for_adapter(image, adapter, p.grid)
            except Exception as exc:  # noqa: BLE001 - show the grid without the photo, say why
                why = f"image could not be resized ({exc})"
        if arr is None:
            notes.append(f"{p.id}: image not shown ({why}); the grid is drawn on grey.")
        where = "store" if p.index >= 0 else "evaluation"
        rows.append({"image": arr, "grid": p.grid, "title": f"{p.id} ({where})", "kept": kept, "question": p.question})
    order = [m for m in ("fastv", "pore", "posprune-pbc", "posprune", "adaptprune-gaussian", "adaptprune", "pa-att", "utp")]
    present = {m for r in rows for m in r["kept"]}
    methods = [m for m in order if m in present] + sorted(present - set(order))
    return rows, methods, notes
