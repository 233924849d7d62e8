"""Per-sample aggregated bias curves: the common input of the statistics (consistency, CV, bootstrap).

Every statistic in posbias that resamples *samples* (random groups, k-fold splits, cluster bootstrap)
needs, per sample, the sum and count of its values at each position. :class:`SampleCurves` holds them as
two ``(S, m)`` matrices over ``m`` position columns, so that the mean curve of any weighted set of samples
is one matrix product: ``(w @ total) / (w @ count)``.

Columns are:

- fixed grids: one column per raster index ``0..V-1`` (exact: the count-weighted least-squares fit on the
  column means equals the pooled fit on all points);
- dynamic grids, 1-D: equal-width bins of ``i / N`` (``n_bins``, default :data:`NORMALIZED_BINS`);
- dynamic grids, 2-D: equal-width ``b x b`` bins of the centred grid coordinates ``(u, v)``.

Each column carries the count-weighted mean of the 1-D position ``x`` and of the centred coordinates
``u = 2 row / (R - 1) - 1``, ``v = 2 col / (C - 1) - 1`` (0 for a grid of one row/column) of its members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from posbias.errors import PosbiasError
from posbias.fitters.base import NORMALIZED_BINS

__all__ = ["SampleCurves", "build_sample_curves", "centred_coords", "token_geometry", "uv_key", "SURFACE_BINS"]

#: bins per axis of the 2-D (u, v) binning used for dynamic grids
SURFACE_BINS: int = 24


def centred_coords(rows: np.ndarray, cols: np.ndarray, grid_rows: np.ndarray, grid_cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid coordinates mapped to [-1, 1] per axis (``linspace(-1, 1, R)[row]``), 0 on a 1-long axis.

    Parameters
    ----------
    rows, cols : np.ndarray
        (T,) integer grid row / column of each token.
    grid_rows, grid_cols : np.ndarray
        (T,) rows R and columns C of each token's grid.

    Returns
    -------
    u, v : np.ndarray
        (T,) float64 centred coordinates.
    """
    r = np.asarray(rows, dtype=np.float64)  # (T,)
    c = np.asarray(cols, dtype=np.float64)  # (T,)
    gr = np.asarray(grid_rows, dtype=np.float64)  # (T,)
    gc = np.asarray(grid_cols, dtype=np.float64)  # (T,)
    u = np.where(gr > 1, 2.0 * r / np.maximum(gr - 1.0, 1.0) - 1.0, 0.0)  # (T,) float64
    v = np.where(gc > 1, 2.0 * c / np.maximum(gc - 1.0, 1.0) - 1.0, 0.0)  # (T,) float64
    return u, v


def token_geometry(store: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the fit and the report place each stored token: (position index, own grid, candidate flag).

    One-tile stores: ``store.token_index()`` (the raster index), the sample's grid, every token a candidate.
    Multi-tile stores (any-resolution layouts such as LLaVA-NeXT): the token's place along its sample's visual
    run (separators counted, so that ``index / n_visual`` is the pruner's ``i / N``), the grid of its own tile,
    and separators flagged as non-candidates (the pruner always keeps them; they are not fitted).

    Parameters
    ----------
    store : posbias.profiler.store.ProfileStore
        An open store.

    Returns
    -------
    index : np.ndarray
        (T,) int64.
    grid : np.ndarray
        (T, 2) int64 (rows, cols) of the grid each token's row/col refer to.
    candidate : np.ndarray
        (T,) bool.
    """
    token_sample = store.token_sample()  # (T,)
    n_visual = np.asarray(store.n_visual, dtype=np.int64)  # (S,)
    if not store.multi_tile:
        grid = np.asarray(store.grids, dtype=np.int64)[token_sample]  # (T, 2)
        return store.token_index(), grid, np.ones(token_sample.shape[0], dtype=bool)
    starts = np.concatenate([[0], np.cumsum(n_visual)[:-1]]).astype(np.int64)  # (S,)
    index = np.arange(token_sample.shape[0], dtype=np.int64) - starts[token_sample]  # (T,)
    tile_row = np.repeat(np.asarray(store.tile_offsets, dtype=np.int64), n_visual) + store.token_tile  # (T,)
    grid = np.asarray(store.tile_grids, dtype=np.int64)[tile_row]  # (T, 2)
    return index, grid, ~np.asarray(store.token_separator, dtype=bool)


def uv_key(uv: np.ndarray) -> np.ndarray:
    """(n,) int64 key identifying each distinct (u, v) pair to 1e-6 (for fast ``np.unique``).

    Parameters
    ----------
    uv : np.ndarray
        (n, 2) float64 centred coordinates in [-1, 1].
    """
    q = np.round((np.asarray(uv, dtype=np.float64) + 2.0) * 1e6).astype(np.int64)  # (n, 2) in [1e6, 3e6]
    return q[:, 0] * 4_000_001 + q[:, 1]  # (n,) int64


def fit_points(
    uv: np.ndarray, y: Any, sample_weight: Any, owner: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Checked, finite, positively weighted points of a 2-D fit (shared by the surface fitters).

    Parameters
    ----------
    uv : np.ndarray
        (n, 2) float64 centred coordinates, already shape-checked.
    y, sample_weight : array-like
        (n,) values and optional (n,) non-negative weights.
    owner : str
        ``"<Fitter>.fit"``, for messages.

    Returns
    -------
    uv, y, w : np.ndarray
        The kept points: (k, 2), (k,), (k,) float64.
    keep : np.ndarray
        (n,) bool mask of the kept points.
    n_excluded : int
        Points dropped for a non-finite coordinate or value.
    """
    yv = np.asarray(y, dtype=np.float64).ravel()  # (n,)
    if yv.size != uv.shape[0]:
        raise PosbiasError(f"{owner}: X has {uv.shape[0]} rows but y has {yv.size} values")
    w = np.ones_like(yv) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
    if w.shape != yv.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise PosbiasError(f"{owner}: sample_weight must be (n,) finite and >= 0")
    finite = np.all(np.isfinite(uv), axis=1) & np.isfinite(yv)  # (n,)
    n_excluded = int(yv.size - finite.sum())
    keep = finite & (w > 0)
    uv, yv, w = uv[keep], yv[keep], w[keep]
    if yv.size == 0:
        raise PosbiasError(f"{owner}: no finite points ({n_excluded} non-finite excluded)")
    return uv, yv, w, keep, n_excluded


def count_samples(groups: Any, keep: np.ndarray, uv: np.ndarray, owner: str) -> int:
    """Samples behind the kept points of a 2-D fit: distinct ``groups[keep]`` when given, else the largest
    number of points at one (u, v) position (one point per sample and position)."""
    if groups is not None:
        g = np.asarray(groups).ravel()
        if g.size != keep.size:
            raise PosbiasError(f"{owner}: groups must have one sample id per point")
        return int(np.unique(g[keep]).size)
    _, cnt = np.unique(uv_key(uv), return_counts=True)
    return int(cnt.max())


@dataclass
class SampleCurves:
    """Per-sample sums and counts of a value over position columns.

    Attributes
    ----------
    total : np.ndarray
        (S, m) float64 sum of the value of sample s's points in column j.
    count : np.ndarray
        (S, m) float64 number of those points.
    x : np.ndarray
        (m,) float64 mean 1-D position (raster index or i/N) of each column.
    u, v : np.ndarray
        (m,) float64 mean centred row / column coordinate of each column.
    sources : list of str
        (S,) source name of each sample.
    sample_index : np.ndarray
        (S,) int64 index of each sample in the store.
    layout : str
        ``"grid"`` (one column per raster position), ``"bins1d"`` or ``"bins2d"``.
    grid : tuple of int or None
        (rows, cols) for ``layout == "grid"``.
    """

    total: np.ndarray
    count: np.ndarray
    x: np.ndarray
    u: np.ndarray
    v: np.ndarray
    sources: list[str]
    sample_index: np.ndarray
    layout: str
    grid: tuple[int, int] | None = None
    _uniform_count: bool | None = field(default=None, repr=False, compare=False)

    @property
    def n_samples(self) -> int:
        """S."""
        return int(self.total.shape[0])

    @property
    def n_columns(self) -> int:
        """m."""
        return int(self.total.shape[1])

    def group_means(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean curve of weighted sets of samples.

        Parameters
        ----------
        weights : np.ndarray
            (G, S) non-negative weight of each sample in each group (0/1 membership, bootstrap counts).

        Returns
        -------
        means : np.ndarray
            (G, m) float64 count-weighted mean per column; NaN where a group has no point in a column.
        counts : np.ndarray
            (G, m) float64 points per column.
        """
        w = np.asarray(weights, dtype=np.float64)  # (G, S)
        sums = w @ self.total  # (G, m)
        if self._uniform_count is None:
            self._uniform_count = bool(np.all(self.count == self.count[:1]))
        if self._uniform_count:  # every sample covers every column equally (fixed grids): skip a matmul
            counts = np.outer(w.sum(axis=1), self.count[0])  # (G, m)
        else:
            counts = w @ self.count  # (G, m)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, sums / np.where(counts > 0, counts, 1.0), np.nan)  # (G, m)
        return means, counts

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        """(m,) mean curve and (m,) counts over all samples."""
        means, counts = self.group_means(np.ones((1, self.n_samples)))
        return means[0], counts[0]

    def source_indices(self) -> dict[str, np.ndarray]:
        """Source name -> (S_src,) int64 row indices into this object, sorted by name."""
        names = np.asarray(self.sources)
        return {name: np.flatnonzero(names == name) for name in sorted(set(self.sources))}


def build_sample_curves(
    values: np.ndarray,
    token_sample: np.ndarray,
    sample_keep: np.ndarray,
    sources: list[str],
    *,
    x: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    layout: str,
    raster_index: np.ndarray | None = None,
    grid: tuple[int, int] | None = None,
    n_bins: int | None = None,
) -> SampleCurves:
    """Aggregate per-token values into a :class:`SampleCurves`.

    Parameters
    ----------
    values : np.ndarray
        (T,) float value of every token (non-finite values are only allowed in excluded samples).
    token_sample : np.ndarray
        (T,) int sample index of every token in the store.
    sample_keep : np.ndarray
        (S_store,) bool, samples to include (False for samples excluded for NaN/inf).
    sources : list of str
        (S_store,) source of each store sample.
    x : np.ndarray
        (T,) float64 1-D position of each token (raster index or i/N).
    u, v : np.ndarray
        (T,) float64 centred coordinates (:func:`centred_coords`).
    layout : {"grid", "bins1d", "bins2d"}
        Column definition (module docstring).
    raster_index : np.ndarray, optional
        (T,) int raster index; required for ``layout="grid"``.
    grid : tuple of int, optional
        (rows, cols) of the fixed grid for ``layout="grid"``.
    n_bins : int, optional
        Bins of ``x`` (``bins1d``, default 100) or per axis of ``(u, v)`` (``bins2d``, default 24).

    Returns
    -------
    SampleCurves
    """
    sample_keep = np.asarray(sample_keep, dtype=bool)  # (S_store,)
    kept = np.flatnonzero(sample_keep)  # (S,)
    if kept.size == 0:
        raise PosbiasError("no samples left after excluding NaN/inf rows; re-profile in float32")
    new_id = -np.ones(sample_keep.size, dtype=np.int64)  # (S_store,)
    new_id[kept] = np.arange(kept.size)
    tok_new = new_id[np.asarray(token_sample, dtype=np.int64)]  # (T,)
    ok = tok_new >= 0  # (T,) bool
    vals = np.asarray(values, dtype=np.float64)[ok]  # (T',)
    if not np.all(np.isfinite(vals)):
        raise PosbiasError("build_sample_curves: NaN/inf values in kept samples; exclude those samples first")
    xs, us, vs, tn = x[ok], u[ok], v[ok], tok_new[ok]  # (T',) each
    if layout == "grid":
        if raster_index is None or grid is None:
            raise PosbiasError("build_sample_curves: layout='grid' needs raster_index and grid")
        col = np.asarray(raster_index, dtype=np.int64)[ok]  # (T',)
        m = int(grid[0]) * int(grid[1])
    elif layout == "bins1d":
        nb = NORMALIZED_BINS if n_bins is None else int(n_bins)
        col = np.clip((xs * nb).astype(np.int64), 0, nb - 1)  # (T',) x = i/N in [0, 1)
        m = nb
    elif layout == "bins2d":
        nb = SURFACE_BINS if n_bins is None else int(n_bins)
        bu = np.clip(((us + 1.0) * 0.5 * nb).astype(np.int64), 0, nb - 1)  # (T',)
        bv = np.clip(((vs + 1.0) * 0.5 * nb).astype(np.int64), 0, nb - 1)  # (T',)
        col = bu * nb + bv
        m = nb * nb
    else:
        raise PosbiasError(f"build_sample_curves: unknown layout {layout!r}")
    s = kept.size
    flat = tn * m + col  # (T',)
    total = np.bincount(flat, weights=vals, minlength=s * m).reshape(s, m)  # (S, m)
    count = np.bincount(flat, minlength=s * m).astype(np.float64).reshape(s, m)  # (S, m)
    ccount = np.bincount(col, minlength=m).astype(np.float64)  # (m,)
    used = ccount > 0  # (m,) bool
    denom = np.where(used, ccount, 1.0)
    cx = np.bincount(col, weights=xs, minlength=m) / denom  # (m,)
    cu = np.bincount(col, weights=us, minlength=m) / denom  # (m,)
    cv = np.bincount(col, weights=vs, minlength=m) / denom  # (m,)
    return SampleCurves(
        total=total[:, used],
        count=count[:, used],
        x=cx[used],
        u=cu[used],
        v=cv[used],
        sources=[sources[i] for i in kept],
        sample_index=kept.astype(np.int64),
        layout=layout,
        grid=None if grid is None else (int(grid[0]), int(grid[1])),
    )
