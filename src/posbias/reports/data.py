"""Everything a report shows, read once from the store, the calibration and the evaluation JSON.

:func:`collect` reads the profile store in a few vectorised passes (all layers once, per-position and
per-cell sums with ``np.bincount``), so that a report of an 800-sample, 576-token, 32-layer store stays
well under the 30 s budget. Optional inputs (position-agnostic rows, vision importance, region density,
UTP losses and schedules, an evaluation) are read when present; what is absent is listed in
:attr:`ReportData.missing` together with the command that produces it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posbias.errors import PosbiasError

__all__ = [
    "EVALUATION_SCHEMA",
    "MAP_BINS",
    "CURVE_BINS",
    "ReportData",
    "collect",
    "load_evaluation",
    "read_optional",
]

EVALUATION_SCHEMA = "posbias.evaluation"
#: cells per axis of the attention maps of dynamic-resolution stores (fixed grids use their own grid)
MAP_BINS = 24
#: bins of i/N for the curves of dynamic-resolution stores (fixed grids use one column per raster index)
CURVE_BINS = 64
#: cluster-bootstrap replicates of the measured-mean bands
N_BOOT = 200

_RESULT_KEYS = ("method", "keep", "kl_mean")


def load_evaluation(path: str | Path) -> dict[str, Any]:
    """Read and check an evaluation JSON (``profile-bias evaluate``; format in docs/evaluation.md).

    Parameters
    ----------
    path : path
        The JSON file.

    Returns
    -------
    dict
        The document, with ``results`` and ``per_sample`` lists (empty when absent).

    Raises
    ------
    posbias.errors.PosbiasError
        For a missing or unreadable file, another schema, or results without method/keep/kl_mean.
    """
    p = Path(path)
    if not p.is_file():
        raise PosbiasError(f"evaluation file {p} does not exist; run 'profile-bias evaluate' first or leave it out")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PosbiasError(f"evaluation file {p} is not valid JSON ({str(exc).splitlines()[0]}); regenerate it with profile-bias evaluate") from exc
    if not isinstance(doc, dict) or doc.get("schema") != EVALUATION_SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise PosbiasError(f"evaluation file {p} is not a posbias evaluation (schema={got!r}); pass the JSON written by profile-bias evaluate")
    version = doc.get("schema_version")
    if version != 1:
        raise PosbiasError(f"evaluation file {p} has schema_version {version!r}; this posbias reads version 1: upgrade posbias or re-run the evaluation")
    results = doc.get("results", [])
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise PosbiasError(f"evaluation file {p}: 'results' must be a list of objects; regenerate it with profile-bias evaluate")
    for i, r in enumerate(results):
        lacking = [k for k in _RESULT_KEYS if k not in r]
        if lacking:
            raise PosbiasError(f"evaluation file {p}: results[{i}] lacks {lacking}; regenerate it with profile-bias evaluate")
    per_sample = doc.get("per_sample", [])
    if not isinstance(per_sample, list):
        raise PosbiasError(f"evaluation file {p}: 'per_sample' must be a list; regenerate it with profile-bias evaluate")
    doc["results"] = results
    doc["per_sample"] = [r for r in per_sample if isinstance(r, dict)]
    return doc


def read_optional(store: Any, group: str, name: str) -> np.ndarray | None:
    """An optional store dataset (``/tokens/attn_pa``, ``/samples/utr_loss`` ...), or None when absent.

    Reads through the :class:`~posbias.profiler.store.ProfileStore` accessors (``has`` / ``token_data`` /
    ``sample_data`` / ``static``), so an interrupted store's segments are included.

    Parameters
    ----------
    store : ProfileStore
    group : {"tokens", "samples", "static"}
    name : str
    """
    path = f"{group}/{name}"
    if not store.has(path):
        return None
    if group == "tokens":
        return np.asarray(store.token_data(name))
    if group == "samples" and path not in store.static_names():
        return np.asarray(store.sample_data(name))
    return np.asarray(store.static(path))


@dataclass
class PickedSample:
    """A sample shown in the pictures section."""

    index: int  # row in the store (-1 when it comes from the evaluation only)
    id: str
    source: str
    question: str
    grid: tuple[int, int]
    attn: np.ndarray | None  # (V, L) float32 stored attention, None for evaluation-only samples
    attn_pa: np.ndarray | None = None  # (V,) position-agnostic attention at the shallow layer, when profiled
    tokens: Any = None  # TokenGrid of a multi-tile sample (rows, cols, tile, separator, tiles); None: one raster grid


@dataclass
class ReportData:
    """Numbers and arrays behind every section (see :func:`collect`)."""

    store_path: Path
    calibration_path: Path
    evaluation_path: Path | None
    calibration: Any  # posbias.artifacts.Calibration
    cal_doc: dict[str, Any]
    attrs: dict[str, Any]
    n_samples: int
    n_layers: int
    n_tokens: int
    complete: bool
    sample_ids: list[str]
    sources: list[str]
    questions: list[str]
    sources_count: dict[str, int]
    skipped: list[tuple[str, str, str]]
    grids: np.ndarray  # (S, 2) int32
    n_visual: np.ndarray  # (S,) int32
    fixed_grid: bool
    domain: str
    shallow: int
    deep: int
    pore_layer: int
    ok_sample: np.ndarray  # (S,) bool: finite attention at the layers used
    # curves over position: m columns
    x: np.ndarray  # (m,) float64 position of each column (raster index or bin centre of i/N)
    layer_curves: np.ndarray  # (L, m) float64 mean attention per layer and position (ok samples)
    curve_sums: dict[str, np.ndarray]  # name -> (S, m) per-sample sums ("shallow", "deep", "delta", "pore")
    curve_counts: np.ndarray  # (S, m) float64 tokens per sample and column
    bands: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # name -> (mean, low, high), each (m,)
    # maps over the grid: (R, C) cells
    map_shape: tuple[int, int]
    map_tiles_overlaid: bool  # every token's own grid is map_shape (InternVL's equal tiles): tiles drawn on one grid
    multi_tile: bool  # any-resolution layouts (several tiles per image, or separators)
    maps: dict[str, np.ndarray]  # "<layer>/<correction>" -> (R, C) float64 mean per cell
    map_units: dict[str, str]
    vision_map: np.ndarray | None  # (R, C) mean vision-encoder importance, when profiled
    utr_loss: np.ndarray | None  # (S, L) float64, when profiled
    schedules: list[dict[str, Any]]  # UTP schedules found in the calibration
    evaluation: dict[str, Any] | None
    picked: list[PickedSample] = field(default_factory=list)
    has_attn_pa: bool = False
    missing: list[tuple[str, str]] = field(default_factory=list)  # (what, command that produces it)
    n_boot: int = N_BOOT
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def x_label(self) -> str:
        """Axis label of the position variable, with its unit."""
        if self.domain == "index":
            return "visual token raster index i (token)"
        return "normalised position i/N (fraction of the visual tokens)"

    @property
    def grid(self) -> tuple[int, int] | None:
        """The fixed grid (rows, cols), or None for dynamic-resolution stores."""
        if not self.fixed_grid or self.n_samples == 0:
            return None
        return int(self.grids[0, 0]), int(self.grids[0, 1])


def _method_layers(cal_methods: dict[str, Any], n_layers: int) -> tuple[int, int, int, str | None]:
    from posbias.fitters.layers import default_layers

    d_shallow, d_deep = default_layers(n_layers) if n_layers >= 2 else (0, 0)
    pbc = cal_methods.get("posprune-pbc") or {}
    pore = cal_methods.get("pore") or {}
    shallow = int(pbc.get("shallow_layer", cal_methods.get("fastv", {}).get("layer", d_shallow)))
    deep = int(pbc.get("deep_layer", d_deep))
    pore_layer = int(pore.get("layer", shallow))
    domain = pbc.get("domain") or pore.get("domain")
    return shallow, deep, pore_layer, domain


def _find_schedules(cal_doc: dict[str, Any]) -> list[dict[str, Any]]:
    """UTP schedules anywhere under ``methods`` (tolerant of the exact layout the UTP solver writes).

    Accepts per method either ``{"schedules": [{"ratio", "schedule"|"retained"|"r", ...}, ...]}`` or
    ``{"schedules": {"<ratio>": {...}}}``; returns ``[{"method", "ratio", "schedule", ...}, ...]``.
    """
    found: list[dict[str, Any]] = []
    holders = list((cal_doc.get("methods") or {}).items())
    if "schedules" in cal_doc:  # top-level, if a later schema puts them there
        holders.append(("utp", {"schedules": cal_doc["schedules"]}))
    for mname, entry in holders:
        if not isinstance(entry, dict) or "schedules" not in entry:
            continue
        sched = entry["schedules"]
        items: list[tuple[Any, Any]]
        if isinstance(sched, dict):
            items = list(sched.items())
        elif isinstance(sched, list):
            items = [(s.get("ratio") if isinstance(s, dict) else None, s) for s in sched]
        else:
            continue
        for ratio, s in items:
            if not isinstance(s, dict):
                continue
            r = next((s[k] for k in ("schedule", "retained", "r", "schedule_") if isinstance(s.get(k), list)), None)
            if r is None:
                continue
            try:
                ratio_f = float(s.get("ratio", ratio))
            except (TypeError, ValueError):
                ratio_f = float("nan")
            found.append({**s, "method": mname, "ratio": ratio_f, "schedule": [int(v) for v in r]})
    found.sort(key=lambda d: (d["method"], d["ratio"]))
    return found


def _bootstrap_band(sums: np.ndarray, counts: np.ndarray, ok: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve and its cluster-bootstrap (over samples) percentile band.

    sums, counts : (S, m); ok : (S,) bool. Returns (mean, low, high), each (m,).
    """
    s_ok = sums[ok]  # (S', m)
    c_ok = counts[ok]  # (S', m)
    tot_c = c_ok.sum(axis=0)  # (m,)
    mean = np.where(tot_c > 0, s_ok.sum(axis=0) / np.maximum(tot_c, 1), np.nan)  # (m,)
    n = s_ok.shape[0]
    if n < 2:
        return mean, mean.copy(), mean.copy()
    rng = np.random.default_rng([int(seed), 7])
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=int(n_boot)).astype(np.float64)  # (B, S')
    bs = w @ s_ok  # (B, m)
    bc = w @ c_ok  # (B, m)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = bs / bc  # (B, m)
    alpha = (1.0 - float(level)) / 2.0
    import warnings

    with warnings.catch_warnings():  # columns no sample covers stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.nanquantile(boot, alpha, axis=0)  # (m,)
        high = np.nanquantile(boot, 1.0 - alpha, axis=0)  # (m,)
    return mean, low, high


def _pick_samples(ids: list[str], ok: np.ndarray, n_pick: int) -> list[int]:
    """Up to ``n_pick`` store rows with distinct images (the key's part before '/'), first come first."""
    seen: set[str] = set()
    out: list[int] = []
    for i, sid in enumerate(ids):
        if not ok[i]:
            continue
        src, _, key = sid.partition(":")
        image_key = f"{src}:{key.split('/')[0]}"
        if image_key in seen:
            continue
        seen.add(image_key)
        out.append(i)
        if len(out) >= n_pick:
            break
    return out


def _uniform_tile(within: np.ndarray, tile: np.ndarray, sep: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                  tile_grids: np.ndarray) -> tuple[int, int] | None:
    """The tile grid when every stored tile has it, no token is a separator and every sample's tokens are whole
    tiles in raster order one after the other (then a sample of n visual tokens is n / (rows * cols) such tiles);
    else None. ``within`` (T,) is each token's place in its sample."""
    if sep.any() or not tile_grids.shape[0] or not np.all(tile_grids == tile_grids[0]):
        return None
    r, c = int(tile_grids[0, 0]), int(tile_grids[0, 1])
    per = r * c
    if per == 0:
        return None
    ok = np.array_equal(rows * c + cols, within % per) and np.array_equal(tile, within // per)
    return (r, c) if ok else None


def collect(
    store_path: str | Path,
    calibration_path: str | Path,
    evaluation_path: str | Path | None = None,
    *,
    n_pictures: int = 3,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> ReportData:
    """Read the store, the calibration and (optionally) the evaluation; compute what the figures plot.

    Parameters
    ----------
    store_path : path
        Profile store (``profile.h5``).
    calibration_path : path
        Calibration JSON fitted on that store.
    evaluation_path : path, optional
        Evaluation JSON from ``profile-bias evaluate``.
    n_pictures : int
        Samples shown in the "pruning in pictures" section.
    n_boot : int
        Cluster-bootstrap replicates of the measured-mean bands.
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    ReportData
    """
    import time

    from posbias.artifacts import Calibration
    from posbias.fitters.curves import centred_coords, token_geometry
    from posbias.profiler.store import ProfileStore

    t0 = time.perf_counter()
    cal = Calibration.load(calibration_path)
    cal_doc = cal.to_dict()
    evaluation = load_evaluation(evaluation_path) if evaluation_path is not None else None
    methods = cal_doc["methods"]
    timings: dict[str, float] = {}
    missing: list[tuple[str, str]] = []

    with ProfileStore(store_path) as store:
        n_samples, n_layers, n_tokens = store.n_samples, store.n_layers, store.n_tokens
        if n_samples == 0:
            raise PosbiasError(f"store {store_path} holds no samples; profile some first (profile-bias profile --n N)")
        if store.attrs.get("model_fingerprint") != cal.fingerprint:
            raise PosbiasError(
                f"calibration {calibration_path} (fingerprint {cal.fingerprint}) was not fitted on store {store_path} "
                f"(fingerprint {store.attrs.get('model_fingerprint')}); pass the calibration fitted on this store"
            )
        shallow, deep, pore_layer, domain = _method_layers(methods, n_layers)
        for name, layer in (("shallow", shallow), ("deep", deep), ("PoRe", pore_layer)):
            if not 0 <= layer < n_layers:
                raise PosbiasError(
                    f"calibration {calibration_path}: {name} layer {layer} is outside store {store_path}'s layers "
                    f"0..{n_layers - 1}; pass the calibration fitted on this store"
                )
        grids = np.asarray(store.grids, dtype=np.int32)  # (S, 2)
        n_visual = np.asarray(store.n_visual, dtype=np.int64)  # (S,)
        multi_tile = bool(store.multi_tile)
        fixed = bool(np.all(grids == grids[0])) and not multi_tile
        if domain is None:
            domain = "index" if fixed else "normalized"
        if domain == "index" and not fixed:
            domain = "normalized"
        token_sample = store.token_sample()  # (T,)
        token_index, tok_grid_all, candidate = token_geometry(store)  # (T,), (T, 2), (T,): separators not shown
        rows = np.asarray(store.rows, dtype=np.int64)  # (T,)
        cols = np.asarray(store.cols, dtype=np.int64)  # (T,)
        token_tile = np.asarray(store.token_tile, dtype=np.int64)  # (T,)
        token_sep = np.asarray(store.token_separator, dtype=bool)  # (T,)
        tile_grids = np.asarray(store.tile_grids, dtype=np.int64)  # (G, 2)
        tile_offsets = np.asarray(store.tile_offsets, dtype=np.int64)  # (S,)
        n_tiles = np.asarray(store.n_tiles, dtype=np.int64)  # (S,)
        t1 = time.perf_counter()
        attn = store.all_layers()  # (T, L) float32
        timings["read attention"] = time.perf_counter() - t1
        attn_pa = read_optional(store, "tokens", "attn_pa")  # (T, K) first K layers, or None
        vis_imp = read_optional(store, "tokens", "vision_importance")  # (T,) or None
        utr = read_optional(store, "samples", "utr_loss")  # (S, L) or None
        attrs = dict(store.attrs)
        sample_ids = list(store.sample_ids)
        sources = list(store.sources)
        questions = list(store.questions)
        sources_count = store.sources_count()
        skipped = store.skipped()
        complete = bool(store.complete)

    # ---------------------------------------------------------------- validity
    used = sorted({shallow, deep, pore_layer})
    bad_tok = ~np.all(np.isfinite(attn[:, used]), axis=1)  # (T,)
    ok_sample = np.ones(n_samples, dtype=bool)  # (S,)
    ok_sample[token_sample[bad_tok]] = False
    ok_tok = ok_sample[token_sample] & candidate  # (T,)

    # ---------------------------------------------------------------- position columns
    if domain == "index":
        pos = token_index  # (T,)
        m = int(pos.max()) + 1 if n_tokens else 1
        x = np.arange(m, dtype=np.float64)  # (m,)
        xtok = token_index.astype(np.float64)  # (T,)
    else:
        xtok = token_index / n_visual[token_sample].astype(np.float64)  # (T,) in [0, 1)
        m = CURVE_BINS
        pos = np.clip((xtok * m).astype(np.int64), 0, m - 1)  # (T,)
        x = (np.arange(m) + 0.5) / m  # (m,)
    flat = token_sample * m + pos  # (T,)
    counts = np.bincount(flat[ok_tok], minlength=n_samples * m).reshape(n_samples, m).astype(np.float64)  # (S, m)

    def per_sample(values: np.ndarray) -> np.ndarray:
        v = np.where(ok_tok, values, 0.0)  # (T,)
        return np.bincount(flat, weights=v, minlength=n_samples * m).reshape(n_samples, m)  # (S, m)

    a_sh = attn[:, shallow].astype(np.float64)  # (T,)
    a_dp = attn[:, deep].astype(np.float64)  # (T,)
    a_pr = attn[:, pore_layer].astype(np.float64)  # (T,)
    curve_sums = {"shallow": per_sample(a_sh), "deep": per_sample(a_dp), "pore": per_sample(a_pr)}
    curve_sums["delta"] = curve_sums["shallow"] - curve_sums["deep"]
    level = float((cal_doc.get("statistics") or {}).get("level", 0.95))
    t1 = time.perf_counter()
    bands = {k: _bootstrap_band(v, counts, ok_sample, n_boot, level, seed) for k, v in curve_sums.items()}
    timings["bootstrap"] = time.perf_counter() - t1

    # per-layer mean curves over all ok samples
    t1 = time.perf_counter()
    v0 = int(n_visual[0])
    raster = domain == "index" and fixed and n_tokens == n_samples * v0 and bool(
        np.array_equal(pos.reshape(n_samples, v0), np.broadcast_to(np.arange(v0), (n_samples, v0))))
    if raster:  # every sample in raster order on one grid: a reshape instead of L bincounts
        cube = attn.reshape(n_samples, v0, n_layers)[ok_sample]  # (S', V, L) float32
        with np.errstate(invalid="ignore"):
            layer_curves = np.nanmean(cube, axis=0, dtype=np.float64).T  # (L, V)
    else:
        pos_ok = pos[ok_tok]  # (T',)
        attn_ok = attn[ok_tok]  # (T', L)
        layer_curves = np.full((n_layers, m), np.nan)  # (L, m)
        finite_all = np.isfinite(attn_ok)  # (T', L)
        for li in range(n_layers):
            col = attn_ok[:, li].astype(np.float64)  # (T',)
            good = finite_all[:, li]
            s_ = np.bincount(pos_ok[good], weights=col[good], minlength=m)  # (m,)
            c_ = np.bincount(pos_ok[good], minlength=m)  # (m,)
            layer_curves[li] = np.where(c_ > 0, s_ / np.maximum(c_, 1), np.nan)
    timings["layer curves"] = time.perf_counter() - t1

    # ---------------------------------------------------------------- maps
    tiles_overlaid = False
    if fixed:
        map_shape = (int(grids[0, 0]), int(grids[0, 1]))
        cell = rows * map_shape[1] + cols  # (T,)
    elif tok_grid_all.shape[0] and bool(np.all(tok_grid_all == tok_grid_all[0])):
        # every token's own grid is the same (InternVL: equal tiles): draw on that grid, tiles overlaid, no rescaling
        map_shape = (int(tok_grid_all[0, 0]), int(tok_grid_all[0, 1]))
        cell = np.clip(rows, 0, map_shape[0] - 1) * map_shape[1] + np.clip(cols, 0, map_shape[1] - 1)  # (T,)
        tiles_overlaid = True
    else:
        map_shape = (MAP_BINS, MAP_BINS)
        tok_grid = tok_grid_all  # (T, 2) each token's own grid (its tile's)
        br = np.clip(((rows + 0.5) / tok_grid[:, 0] * MAP_BINS).astype(np.int64), 0, MAP_BINS - 1)  # (T,)
        bc = np.clip(((cols + 0.5) / tok_grid[:, 1] * MAP_BINS).astype(np.int64), 0, MAP_BINS - 1)  # (T,)
        cell = br * MAP_BINS + bc  # (T,)
    n_cells = map_shape[0] * map_shape[1]
    cell_ok = cell[ok_tok]  # (T',)
    cell_n = np.bincount(cell_ok, minlength=n_cells).astype(np.float64)  # (cells,)

    def cell_mean(values: np.ndarray) -> np.ndarray:
        v = values[ok_tok]  # (T',)
        good = np.isfinite(v)
        s = np.bincount(cell_ok[good], weights=v[good], minlength=n_cells)  # (cells,)
        c = np.bincount(cell_ok[good], minlength=n_cells)  # (cells,)
        return np.where(c > 0, s / np.maximum(c, 1), np.nan).reshape(map_shape)  # (R, C)

    maps: dict[str, np.ndarray] = {}
    units: dict[str, str] = {}
    u_tok, v_tok = centred_coords(rows, cols, tok_grid_all[:, 0], tok_grid_all[:, 1])  # (T,) each
    from posbias.fitters import fitter_from_dict

    corrections: list[tuple[str, Any]] = [("raw", None)]
    if "pore" in methods:
        pfit = fitter_from_dict(methods["pore"]["fit"])
        p_tok = np.asarray(pfit.predict(xtok), dtype=np.float64)  # (T,)
        corrections.append(("pore", lambda a, p=p_tok: a / p))
    if "posprune-pbc" in methods:
        bfit = fitter_from_dict(methods["posprune-pbc"]["fit"])
        d_tok = np.asarray(bfit.predict(xtok), dtype=np.float64)  # (T,)
        corrections.append(("posprune-pbc", lambda a, d=d_tok: a - d))
    if "adaptprune-gaussian" in methods:
        sigma = float(methods["adaptprune-gaussian"]["fit"]["learned"]["sigma_"])
        g_tok = np.exp(-(u_tok**2 + v_tok**2) / (2.0 * sigma**2))  # (T,)
        corrections.append(("adaptprune-gaussian", lambda a, g=g_tok: a * g))
    layer_vals = {"shallow": a_sh, "deep": a_dp}
    for lname, vals in layer_vals.items():
        for cname, fn in corrections:
            maps[f"{lname}/{cname}"] = cell_mean(vals if fn is None else fn(vals))
    maps["pore/raw"] = maps["shallow/raw"] if pore_layer == shallow else cell_mean(a_pr)
    units["raw"] = "attention (probability)"
    units["pore"] = "A / P(x) (ratio)"
    units["posprune-pbc"] = "A - ΔA(x) (probability)"
    units["adaptprune-gaussian"] = "A · w(u, v) (probability)"
    units["pa-att"] = "PA-Att (probability)"
    pa = None if attn_pa is None else np.asarray(attn_pa, dtype=np.float64).reshape(n_tokens, -1)  # (T, K)
    has_pa = pa is not None and pa.shape[1] > shallow
    if pa is not None:
        for lname, layer in (("shallow", shallow), ("deep", deep)):
            if layer < pa.shape[1]:
                maps[f"{lname}/pa-att"] = cell_mean(pa[:, layer])
            else:  # PA rows cover the first K layers only: show the raw map's shape as "not profiled"
                maps[f"{lname}/pa-att"] = np.full(map_shape, np.nan)
    if not has_pa:
        missing.append(("position-agnostic attention at the shallow layer (/tokens/attn_pa, UTP PA-Att maps)",
                        "profile-bias profile --signals attn_pa (or --signals all), then re-run the report"))
    vision_map = None
    if vis_imp is not None:
        vision_map = cell_mean(np.asarray(vis_imp, dtype=np.float64).reshape(-1))
    else:
        missing.append(("vision-encoder importance (/tokens/vision_importance)", "profile-bias profile --signals vision_importance (or --signals all)"))
    del cell_n

    utr_loss = None if utr is None else np.asarray(utr, dtype=np.float64)
    if utr_loss is None:
        missing.append(("UTP information loss l_l (/samples/utr_loss)", f"profile-bias utr --store {store_path}, then profile-bias solve --store {store_path} --ratios 2,4,8,16 --into CAL.json"))
    schedules = _find_schedules(cal_doc)
    if not schedules:
        missing.append(("UTP schedules in the calibration", "profile-bias solve --store S --ratios 2,4,8,16 --into C.json"))
    stats = cal_doc.get("statistics")
    if not stats:
        missing.append(("fit statistics (consistency, degree CV, intervals)", "profile-bias fit without --no-stats"))
    elif (stats.get("density") or {}).get("status") != "evaluated":
        missing.append(("semantic density test", "profile-bias profile --signals region_logdet (or --signals all), then profile-bias fit"))
    if evaluation is None:
        missing.append(("fidelity evaluation (KL, agreement, FLOPs, prefill time)", "profile-bias evaluate ... --out evaluation.json, then report --evaluation evaluation.json"))

    # ---------------------------------------------------------------- pictures
    from posbias.models.base import TokenGrid

    picked: list[PickedSample] = []
    pa_full = pa[:, shallow] if has_pa else None  # (T,)
    starts = np.concatenate([[0], np.cumsum(n_visual)[:-1]]).astype(np.int64)  # (S,)

    def layout_of(i: int) -> TokenGrid | None:
        """The stored layout of sample i (multi-tile stores), None for one raster grid."""
        if not multi_tile:
            return None
        sl = slice(int(starts[i]), int(starts[i] + n_visual[i]))
        tiles = tuple((int(r), int(c)) for r, c in tile_grids[tile_offsets[i]: tile_offsets[i] + n_tiles[i]])
        return TokenGrid(rows=rows[sl], cols=cols[sl], tiles=tiles, tile=token_tile[sl], separator=token_sep[sl])

    for i in _pick_samples(sample_ids, ok_sample, n_pictures):
        lo = int(starts[i])
        hi = lo + int(n_visual[i])
        picked.append(
            PickedSample(
                index=i, id=sample_ids[i], source=sources[i], question=questions[i],
                grid=(int(grids[i, 0]), int(grids[i, 1])), attn=np.asarray(attn[lo:hi]),  # (V, L)
                attn_pa=None if pa_full is None else pa_full[lo:hi], tokens=layout_of(i),
            )
        )
    if evaluation is not None:
        store_ids = set(sample_ids)
        ev_n: dict[str, int] = {}
        for rec in evaluation["per_sample"]:
            sid = str(rec.get("id", ""))
            if sid and sid not in store_ids and sid not in ev_n:
                ev_n[sid] = int(rec.get("n_visual") or 0)
        grid = cal_doc["model"].get("grid")
        tile = _uniform_tile(np.arange(n_tokens) - starts[token_sample], token_tile, token_sep, rows, cols,
                             tile_grids) if multi_tile else None
        unplaced = 0
        for sid, n in list(ev_n.items())[: max(0, n_pictures - 1)]:
            tokens = None
            if multi_tile:  # the layout of a sample outside the store is known only for equal raster tiles
                per = 0 if tile is None else tile[0] * tile[1]
                if not per or n <= 0 or n % per:
                    unplaced += 1
                    continue
                tokens = TokenGrid(rows=np.tile(np.arange(per) // tile[1], n // per),
                                   cols=np.tile(np.arange(per) % tile[1], n // per), tiles=(tile,) * (n // per),
                                   tile=np.repeat(np.arange(n // per), per))
            elif not grid:
                continue
            g = tile if multi_tile else (int(grid[0]), int(grid[1]))
            picked.append(PickedSample(index=-1, id=sid, source=sid.partition(":")[0], question="", grid=g, attn=None,
                                       tokens=tokens))
        if unplaced:
            missing.append((f"pictures of {unplaced} evaluation-only sample(s) (their kept lists)",
                            "their tile layout (tiles, newline separators) is in neither the store nor the evaluation "
                            "JSON; the store's own samples are drawn"))

    timings["collect"] = time.perf_counter() - t0
    return ReportData(
        store_path=Path(store_path), calibration_path=Path(calibration_path),
        evaluation_path=None if evaluation_path is None else Path(evaluation_path),
        calibration=cal, cal_doc=cal_doc, attrs=attrs, n_samples=n_samples, n_layers=n_layers, n_tokens=n_tokens,
        complete=complete, sample_ids=sample_ids, sources=sources, questions=questions, sources_count=sources_count,
        skipped=skipped, grids=grids, n_visual=n_visual.astype(np.int32), fixed_grid=fixed, domain=domain,
        shallow=shallow, deep=deep, pore_layer=pore_layer, ok_sample=ok_sample, x=x, layer_curves=layer_curves,
        curve_sums=curve_sums, curve_counts=counts, bands=bands, map_shape=map_shape,
        map_tiles_overlaid=tiles_overlaid, multi_tile=multi_tile, maps=maps, map_units=units,
        vision_map=vision_map, utr_loss=utr_loss, schedules=schedules, evaluation=evaluation, picked=picked,
        has_attn_pa=has_pa, missing=missing, n_boot=int(n_boot), timings=timings,
    )
