"""Semantic density test: do central region blocks carry more information than edge blocks? (PosPrune, Fig. 2)

PosPrune divides the visual grid into ``n x n`` region blocks (6x6 of 4x4 patches on LLaVA's 24x24 grid),
computes the proxy entropy ``H = log|Σ + εI|`` of each block's token features (Eq. 1), and finds the 16
central blocks higher than the 20 edge blocks. Given ``H`` per sample and block (``(S, n, n)``), this
module reports:

- the per-block mean entropy map (``(n, n)``, mean over samples);
- per sample, ``d_s = mean(H over centre blocks) - mean(H over edge blocks)``; the Wilcoxon signed-rank
  test of ``d_s`` (paired: each image is its own control) with the rank-biserial correlation as effect
  size, and the mean difference with its t interval and Cohen's ``d_z = mean(d) / sd(d)``;
- Welch's t-test of all centre-block values against all edge-block values (unequal variances) with
  Hedges' g. Blocks of one image are correlated, so Welch's p-value is optimistic; the Wilcoxon test is
  the primary one.

Blocks with NaN/inf are dropped; a sample without any finite centre or edge block is excluded and counted.
When the store has no region data the result says so: ``"not profiled; run profile with region density"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from posbias.errors import PosbiasError

__all__ = [
    "NOT_PROFILED",
    "LOGDET_DATASET",
    "EDGE_DATASET",
    "DensityResult",
    "default_edge_mask",
    "density_test",
    "read_region_density",
]

NOT_PROFILED = "not profiled; run profile with region density"
#: (S, n, n) float proxy entropy per sample and block
LOGDET_DATASET = "samples/region_logdet"
#: (n, n) bool, True for edge blocks
EDGE_DATASET = "samples/region_is_edge"


def default_edge_mask(n: int) -> np.ndarray:
    """(n, n) bool: the outermost ring of blocks (20 of 36 for n = 6, as in the seed)."""
    if int(n) < 3:
        raise PosbiasError(f"region grid {n}x{n} has no central block; need n >= 3")
    mask = np.zeros((int(n), int(n)), dtype=bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


@dataclass
class DensityResult:
    """Centre-vs-edge entropy statistics (module docstring); ``status`` "not profiled" when absent."""

    status: str
    message: str = ""
    n_samples: int = 0
    n_excluded: int = 0
    n_blocks: int = 0
    block_mean: list[list[float]] = field(default_factory=list)
    is_edge: list[list[bool]] = field(default_factory=list)
    centre_mean: float = 0.0
    edge_mean: float = 0.0
    mean_diff: float = 0.0
    diff_ci: list[float] = field(default_factory=list)
    cohens_dz: float = 0.0
    wilcoxon: dict[str, float] = field(default_factory=dict)
    welch: dict[str, float] = field(default_factory=dict)
    verdict: str = ""
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (the calibration's ``statistics.density``)."""
        if self.status != "evaluated":
            return {"status": self.status, "message": self.message}
        return {
            "status": self.status,
            "message": self.message,
            "n_samples": int(self.n_samples),
            "n_excluded": int(self.n_excluded),
            "n_blocks": int(self.n_blocks),
            "block_mean": [[_f(v) for v in row] for row in self.block_mean],
            "is_edge": [[bool(v) for v in row] for row in self.is_edge],
            "centre_mean": float(self.centre_mean),
            "edge_mean": float(self.edge_mean),
            "mean_diff": float(self.mean_diff),
            "diff_ci": [float(v) for v in self.diff_ci],
            "cohens_dz": _f(self.cohens_dz),
            "wilcoxon": {k: _num(k, v) for k, v in self.wilcoxon.items()},
            "welch": {k: _num(k, v) for k, v in self.welch.items()},
            "verdict": self.verdict,
            "level": float(self.level),
        }


def _f(v: float) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _num(key: str, v: float) -> float | int | None:
    """A statistic for JSON: counts (``n_*``) as integers, the rest as finite floats or None."""
    if key.startswith("n_") and v is not None and np.isfinite(v):
        return int(round(float(v)))
    return _f(v)


def density_test(logdet: Any, is_edge: Any = None, *, level: float = 0.95) -> DensityResult:
    """Centre vs edge proxy entropy (module docstring).

    Parameters
    ----------
    logdet : array-like
        (S, n, n) proxy entropy ``log|Σ + εI|`` per sample and region block.
    is_edge : array-like, optional
        (n, n) bool, True for edge blocks (default: the outer ring, :func:`default_edge_mask`).
    level : float
        Confidence level of the mean-difference interval.

    Returns
    -------
    DensityResult
    """
    from scipy import stats

    h = np.asarray(logdet, dtype=np.float64)
    if h.ndim != 3 or h.shape[1] != h.shape[2]:
        raise PosbiasError(f"region_logdet must be (S, n, n), got shape {h.shape}; re-profile with region density")
    n = h.shape[1]
    edge = default_edge_mask(n) if is_edge is None else np.asarray(is_edge, dtype=bool)
    if edge.shape != (n, n):
        raise PosbiasError(f"region_is_edge has shape {edge.shape}, expected ({n}, {n}) to match region_logdet")
    if edge.all() or not edge.any():
        raise PosbiasError("region_is_edge must mark some blocks as edge and some as centre")
    flat = h.reshape(h.shape[0], -1)  # (S, n*n)
    e = edge.ravel()  # (n*n,)
    fin = np.isfinite(flat)  # (S, n*n)
    cen_vals = np.where(fin & ~e, flat, 0.0)  # (S, n*n)
    edg_vals = np.where(fin & e, flat, 0.0)  # (S, n*n)
    n_c = (fin & ~e).sum(axis=1)  # (S,)
    n_e = (fin & e).sum(axis=1)  # (S,)
    usable = (n_c > 0) & (n_e > 0)  # (S,)
    n_excluded = int((~usable).sum())
    n_used = int(usable.sum())
    if n_used < 2:
        return DensityResult(
            status="insufficient samples",
            message=f"density test needs at least 2 samples with finite centre and edge blocks, have {n_used} "
            f"({n_excluded} excluded for NaN/inf); profile more samples",
            n_samples=n_used,
            n_excluded=n_excluded,
        )
    c_mean = cen_vals[usable].sum(axis=1) / n_c[usable]  # (S',)
    e_mean = edg_vals[usable].sum(axis=1) / n_e[usable]  # (S',)
    d = c_mean - e_mean  # (S',)
    with np.errstate(invalid="ignore"):
        block_mean = np.nanmean(np.where(fin, flat, np.nan)[usable], axis=0).reshape(n, n)  # (n, n)
    sd = float(np.std(d, ddof=1))
    mean_d = float(d.mean())
    q = float(stats.t.ppf(0.5 + level / 2.0, n_used - 1))
    half = q * sd / np.sqrt(n_used)
    dz = mean_d / sd if sd > 0 else (np.inf if mean_d > 0 else (-np.inf if mean_d < 0 else 0.0))
    nonzero = d[d != 0]
    if nonzero.size:
        w = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
        ranks = stats.rankdata(np.abs(nonzero))
        w_plus = float(ranks[nonzero > 0].sum())
        w_minus = float(ranks[nonzero < 0].sum())
        wil = {
            "statistic": float(w.statistic),
            "p_value": float(w.pvalue),
            "w_plus": w_plus,
            "w_minus": w_minus,
            "rank_biserial": (w_plus - w_minus) / (w_plus + w_minus),
            "n_nonzero": int(nonzero.size),
        }
    else:
        wil = {"statistic": 0.0, "p_value": 1.0, "w_plus": 0.0, "w_minus": 0.0, "rank_biserial": 0.0, "n_nonzero": 0}
    cen_all = flat[usable][:, ~e][fin[usable][:, ~e]]  # (Nc,)
    edg_all = flat[usable][:, e][fin[usable][:, e]]  # (Ne,)
    welch_t = stats.ttest_ind(cen_all, edg_all, equal_var=False)
    v1, v2 = float(np.var(cen_all, ddof=1)), float(np.var(edg_all, ddof=1))
    n1, n2 = cen_all.size, edg_all.size
    pooled = np.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2)) if n1 + n2 > 2 else 0.0
    g = (float(cen_all.mean()) - float(edg_all.mean())) / pooled if pooled > 0 else 0.0
    g *= 1.0 - 3.0 / (4.0 * (n1 + n2) - 9.0) if n1 + n2 > 3 else 1.0
    df = (v1 / n1 + v2 / n2) ** 2 / ((v1 / n1) ** 2 / max(n1 - 1, 1) + (v2 / n2) ** 2 / max(n2 - 1, 1)) if (v1 + v2) > 0 else float("nan")
    welch = {"t": float(welch_t.statistic), "df": float(df), "p_value": float(welch_t.pvalue), "hedges_g": float(g),
             "n_centre_blocks": int(n1), "n_edge_blocks": int(n2)}
    p = wil["p_value"]
    if p < 1.0 - level and mean_d > 0:
        verdict = f"centre blocks have higher entropy than edge blocks (Wilcoxon p={p:.2g}, rank-biserial {wil['rank_biserial']:.2f})"
    elif p < 1.0 - level and mean_d < 0:
        verdict = f"edge blocks have higher entropy than centre blocks (Wilcoxon p={p:.2g}, rank-biserial {wil['rank_biserial']:.2f})"
    else:
        verdict = f"no significant centre-edge difference (Wilcoxon p={p:.2g})"
    return DensityResult(
        status="evaluated",
        message=verdict,
        n_samples=n_used,
        n_excluded=n_excluded,
        n_blocks=n,
        block_mean=block_mean.tolist(),
        is_edge=edge.tolist(),
        centre_mean=float(c_mean.mean()),
        edge_mean=float(e_mean.mean()),
        mean_diff=mean_d,
        diff_ci=[mean_d - half, mean_d + half],
        cohens_dz=float(dz),
        wilcoxon=wil,
        welch=welch,
        verdict=verdict,
        level=float(level),
    )


def read_region_density(store: Any, sample_index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Region entropy data of a store, or ``None`` when the store has none.

    Reads through :class:`~posbias.profiler.store.ProfileStore`, so the committed segments of an
    interrupted run count like the compacted file.

    Parameters
    ----------
    store : path or ProfileStore
        A profile store (file, run folder, or an open ``ProfileStore``).
    sample_index : np.ndarray, optional
        (S',) rows of ``/samples/region_logdet`` to read (default: all).

    Returns
    -------
    (logdet, is_edge) or None
        ``logdet`` (S', n, n) float64; ``is_edge`` (n, n) bool or None when the store does not say.
    """
    from posbias.profiler.store import ProfileStore

    if not isinstance(store, ProfileStore):
        with ProfileStore(store) as opened:
            return read_region_density(opened, sample_index)
    if not store.has(LOGDET_DATASET):
        return None
    full = np.asarray(_store_dataset(store, LOGDET_DATASET), dtype=np.float64)  # (S_all, n, n)
    if full.ndim != 3:
        raise PosbiasError(f"store {store.path}: {LOGDET_DATASET} has shape {full.shape}, expected (S, n, n); re-profile")
    if sample_index is not None:
        idx = np.asarray(sample_index, dtype=np.int64)
        if idx.size and idx.max() >= full.shape[0]:
            raise PosbiasError(
                f"store {store.path}: {LOGDET_DATASET} has {full.shape[0]} rows for more samples; re-profile with region density"
            )
        full = full[idx]
    edge = np.asarray(_store_dataset(store, EDGE_DATASET), dtype=bool) if store.has(EDGE_DATASET) else None  # (n, n)
    return full, edge


def _store_dataset(store: Any, path: str) -> np.ndarray:
    """``samples/<name>`` of a ProfileStore: the static dataset at that path, or the per-sample one."""
    if path in store.static_names():
        return np.asarray(store.static(path))
    return np.asarray(store.sample_data(path))
