"""Is the bias a property of the architecture? Consistency of mean bias curves across sample groups.

PosPrune (Figs. 3-4) draws disjoint random groups of equal size -- two from one data set, or one
from each of two data sets -- averages ``A_shallow - A_deep`` per position within each group, and reports
the Pearson correlation of the two mean curves as the group size grows. If the bias is architectural the
correlation rises towards 1 as the semantic noise of the individual samples averages out.

This module repeats that experiment ``n_repeats`` times per group size with fresh random groups and reports
the median r and the 2.5-97.5 percentile interval over the repeats (the interval says how much another
random split of the same store could change r). The verdict at the largest group size evaluated is:

- ``"consistent"`` when the lower end of that interval is >= ``threshold``;
- ``"not consistent"`` when the median is < ``threshold``;
- ``"inconclusive"`` otherwise.

A verdict that is not "consistent" says what would settle it. Two groups' mean curves of n samples each
share the true curve (variance s2 over positions) and carry independent noise (variance e2 / n), so their
expected correlation is r(n) = n / (n + k) with k = e2 / s2 (the Spearman-Brown relation). :func:`settle_size`
fits k by least squares on 1 / r - 1 = k / n to the median r over the group sizes evaluated; the split
interval's lower end is placed below that curve by the distance (in Fisher z, whose spread depends on the
number of positions rather than on n) measured at the largest size; the answer is the smallest n whose lower end clears the threshold. The curve
records that group size and the samples it needs (2n in the source within, n in each source across); the
result states the samples still to profile. When no median r is positive no trend can be fitted and the
advice is to double the store.

Default threshold: :data:`DEFAULT_THRESHOLD` = 0.9. The PosPrune paper calls the two groups' curves "highly
consistent" and shows r rising towards 1 with group size in Fig. 4, but gives no number; 0.9 (a "very
strong" correlation by the usual convention) is our reading of it, and it is configurable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from posbias.errors import PosbiasError
from posbias.fitters.curves import SampleCurves

__all__ = [
    "DEFAULT_GROUP_SIZES",
    "DEFAULT_THRESHOLD",
    "DEFAULT_REPEATS",
    "MIN_GROUP_SIZE",
    "ConsistencyCurve",
    "ConsistencyResult",
    "bias_consistency",
    "rowwise_pearson",
    "settle_size",
]

#: group sizes tried by default (those the store can hold)
DEFAULT_GROUP_SIZES: tuple[int, ...] = (10, 25, 50, 100, 200, 400, 800, 1600)
#: default verdict threshold on Pearson r (module docstring)
DEFAULT_THRESHOLD: float = 0.9
#: random splits per group size
DEFAULT_REPEATS: int = 200
#: smallest group size evaluated by default
MIN_GROUP_SIZE: int = 10


def _num(value: float) -> float | None:
    """A float for JSON, ``None`` when undefined (NaN: no repeat gave a defined r)."""
    return float(value) if np.isfinite(value) else None


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair over the columns where both are finite.

    Parameters
    ----------
    a, b : np.ndarray
        (R, m) float64 curves; NaN marks a missing column.

    Returns
    -------
    np.ndarray
        (R,) float64 r; NaN where fewer than 3 common columns or a curve is constant.
    """
    mask = np.isfinite(a) & np.isfinite(b)  # (R, m) bool
    n = mask.sum(axis=1).astype(np.float64)  # (R,)
    a0 = np.where(mask, a, 0.0)  # (R, m)
    b0 = np.where(mask, b, 0.0)  # (R, m)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma = a0.sum(axis=1) / n  # (R,)
        mb = b0.sum(axis=1) / n  # (R,)
        da = np.where(mask, a0 - ma[:, None], 0.0)  # (R, m)
        db = np.where(mask, b0 - mb[:, None], 0.0)  # (R, m)
        cov = (da * db).sum(axis=1)  # (R,)
        va = (da * da).sum(axis=1)  # (R,)
        vb = (db * db).sum(axis=1)  # (R,)
        r = cov / np.sqrt(va * vb)  # (R,)
    r[(n < 3) | ~np.isfinite(r)] = np.nan
    return np.clip(r, -1.0, 1.0)


@dataclass
class ConsistencyCurve:
    """Pearson r between two groups' mean bias curves, per group size.

    Attributes
    ----------
    kind : {"within", "cross"}
        Two disjoint groups of one source, or one group from each of two sources.
    sources : list of str
        The one source (within) or the two sources (cross).
    available : list of int
        Samples available in each source.
    group_sizes : list of int
        Group sizes evaluated (ascending).
    r_median, r_mean, r_low, r_high : list of float
        Median, mean and 2.5 / 97.5 percentiles of r over the repeats, per group size.
    n_repeats : list of int
        Repeats with a defined r, per group size.
    verdict : str
        "consistent", "not consistent" or "inconclusive" at the largest group size.
    """

    kind: str
    sources: list[str]
    available: list[int]
    group_sizes: list[int] = field(default_factory=list)
    r_median: list[float] = field(default_factory=list)
    r_mean: list[float] = field(default_factory=list)
    r_low: list[float] = field(default_factory=list)
    r_high: list[float] = field(default_factory=list)
    n_repeats: list[int] = field(default_factory=list)
    verdict: str = "inconclusive"
    group_size_needed: int | None = None
    samples_needed: int | None = None

    @property
    def label(self) -> str:
        """``"within embedded"`` or ``"mme vs pope"``."""
        return f"within {self.sources[0]}" if self.kind == "within" else " vs ".join(self.sources)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        return {
            "kind": self.kind,
            "sources": list(self.sources),
            "available": [int(a) for a in self.available],
            "group_sizes": [int(n) for n in self.group_sizes],
            "r_median": [_num(v) for v in self.r_median],
            "r_mean": [_num(v) for v in self.r_mean],
            "r_low": [_num(v) for v in self.r_low],
            "r_high": [_num(v) for v in self.r_high],
            "n_repeats": [int(v) for v in self.n_repeats],
            "verdict": self.verdict,
            "group_size_needed": None if self.group_size_needed is None else int(self.group_size_needed),
            "samples_needed": None if self.samples_needed is None else int(self.samples_needed),
        }


@dataclass
class ConsistencyResult:
    """Consistency of the bias across random groups (within sources) and across sources.

    Attributes
    ----------
    status : {"evaluated", "insufficient samples"}
    verdict : str
        "consistent", "not consistent", "inconclusive" or "insufficient samples".
    evidence : str
        One sentence stating the verdict with its numbers (or what is needed).
    threshold : float
    ci : float
        Coverage of the percentile interval (0.95).
    n_repeats : int
        Random splits requested per group size.
    seed : int
    curves : list of ConsistencyCurve
    """

    status: str
    verdict: str
    evidence: str
    threshold: float
    ci: float
    n_repeats: int
    seed: int
    curves: list[ConsistencyCurve] = field(default_factory=list)
    more_samples: int | None = None
    settle: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (the calibration's ``statistics.consistency``)."""
        return {
            "status": self.status,
            "verdict": self.verdict,
            "evidence": self.evidence,
            "threshold": float(self.threshold),
            "ci": float(self.ci),
            "n_repeats": int(self.n_repeats),
            "seed": int(self.seed),
            "curves": [c.to_dict() for c in self.curves],
            "more_samples": None if self.more_samples is None else int(self.more_samples),
            "settle": self.settle,
        }


#: a group size beyond this is reported as out of reach
MAX_SETTLE_SIZE = 1_000_000


def settle_size(group_sizes: list[int], r_median: list[float | None], r_low: list[float | None],
                threshold: float) -> int | None:
    """Group size at which the lower end of the split interval would reach ``threshold`` (module docstring).

    The median r over group sizes gives k of r(n) = n / (n + k) (least squares on 1/r - 1 = k/n over sizes
    with r > 0). The interval's reach below the median, in Fisher z, is taken from the largest size measured
    and kept (z's spread depends on the number of positions, not on n). Returns the smallest n with z(n/(n+k)) - width >= z(threshold);
    None when no median is positive (no trend) or n would exceed :data:`MAX_SETTLE_SIZE`.
    """
    n = np.asarray(group_sizes, dtype=np.float64)
    med = np.asarray([np.nan if v is None else v for v in r_median], dtype=np.float64)
    low = np.asarray([np.nan if v is None else v for v in r_low], dtype=np.float64)
    t = float(threshold)
    ok = np.isfinite(med) & (med > 0)
    if not ok.any() or t >= 1.0:
        return None
    inv_n = 1.0 / n[ok]
    k = max(float(np.sum((1.0 / med[ok] - 1.0) * inv_n) / np.sum(inv_n**2)), 0.0)  # least squares through 0
    both = np.flatnonzero(ok & np.isfinite(low))
    width = 0.0
    if both.size:
        j = both[-1]
        z = np.arctanh(np.clip([med[j], low[j]], -0.999999, 0.999999))
        width = max(float(z[0] - z[1]), 0.0)
    cand = np.unique(np.ceil(np.geomspace(2, MAX_SETTLE_SIZE, 4000)))  # (c,)
    z_pred = np.arctanh(np.clip(cand / (cand + k), -0.999999, 0.999999)) - width
    hit = np.flatnonzero(z_pred >= np.arctanh(np.clip(t, -0.999999, 0.999999)))
    return int(cand[hit[0]]) if hit.size else None


def _settle(results: list[ConsistencyCurve], sizes_avail: dict[str, int], threshold: float) -> tuple[int | None, str]:
    """(more samples to profile, one sentence) for the comparisons that are not yet consistent."""
    open_ = [c for c in results if c.verdict != "consistent"]
    if not open_:
        return None, ""
    more: list[int] = []
    parts: list[str] = []
    for c in open_:
        n = settle_size(c.group_sizes, c.r_median, c.r_low, threshold)
        if n is None:
            have = sum(c.available)
            more.append(have)
            parts.append(f"{c.label}: no rising trend to extrapolate (median r <= 0 at every group size); profile "
                         f"at least {have} more samples (double the store) and fit again")
            continue
        c.group_size_needed = int(n)
        per_source = 2 * n if c.kind == "within" else n
        c.samples_needed = int(per_source)
        missing = max(per_source - min(sizes_avail[s] for s in c.sources), 0)
        where = f"in {c.sources[0]}" if c.kind == "within" else "in each of " + " and ".join(c.sources)
        more.append(missing if c.kind == "within" else missing * 2)
        parts.append(f"{c.label}: the interval would clear r = {threshold:g} at groups of about {n}, "
                     f"i.e. {per_source} samples {where}")
    total = max(more) if more else None
    head = f"profile at least {total} more samples" if total else "more repeats, not more samples, may settle it"
    return total, f"{head}; {'; '.join(parts)}"


def _verdict(r_low: float, r_median: float, threshold: float) -> str:
    if not np.isfinite(r_median):
        return "inconclusive"
    if np.isfinite(r_low) and r_low >= threshold:
        return "consistent"
    if r_median < threshold:
        return "not consistent"
    return "inconclusive"


def _pair_stats(
    curves: SampleCurves,
    pool_a: np.ndarray,
    pool_b: np.ndarray | None,
    n: int,
    n_repeats: int,
    rng: np.random.Generator,
    alpha: float,
) -> tuple[float, float, float, float, int]:
    """r statistics for ``n_repeats`` random group pairs of size ``n`` (disjoint within ``pool_a`` when
    ``pool_b`` is None, else one group from each pool)."""
    s = curves.n_samples
    w = np.zeros((2 * n_repeats, s), dtype=np.float64)  # (2R, S) membership
    for k in range(n_repeats):
        if pool_b is None:
            pick = rng.permutation(pool_a)[: 2 * n]
            w[2 * k, pick[:n]] = 1.0
            w[2 * k + 1, pick[n:]] = 1.0
        else:
            w[2 * k, rng.permutation(pool_a)[:n]] = 1.0
            w[2 * k + 1, rng.permutation(pool_b)[:n]] = 1.0
    means, _ = curves.group_means(w)  # (2R, m)
    r = rowwise_pearson(means[0::2], means[1::2])  # (R,)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan"), float("nan"), float("nan"), float("nan"), 0
    lo, med, hi = np.percentile(r, [100 * alpha / 2, 50, 100 * (1 - alpha / 2)])
    return float(med), float(r.mean()), float(lo), float(hi), int(r.size)


def bias_consistency(
    curves: SampleCurves,
    *,
    group_sizes: list[int] | tuple[int, ...] | None = None,
    n_repeats: int = DEFAULT_REPEATS,
    threshold: float = DEFAULT_THRESHOLD,
    ci: float = 0.95,
    seed: int = 0,
    min_group_size: int = MIN_GROUP_SIZE,
    cross_source: bool = True,
) -> ConsistencyResult:
    """Pearson r between mean bias curves of random sample groups, within and across sources.

    Parameters
    ----------
    curves : SampleCurves
        Per-sample bias values (e.g. ``A_shallow - A_deep``) aggregated per position.
    group_sizes : sequence of int, optional
        Group sizes to evaluate. ``None``: those of :data:`DEFAULT_GROUP_SIZES` that are
        >= ``min_group_size`` and fit in the store, plus the largest size that fits. An explicit size that
        no comparison can hold raises :class:`PosbiasError` naming what is needed.
    n_repeats : int
        Random group pairs per size.
    threshold : float
        Verdict threshold on r (default 0.9; see the module docstring).
    ci : float
        Coverage of the percentile interval over repeats.
    seed : int
        Seed of the random groups (results are deterministic for a seed).
    min_group_size : int
        Smallest default group size; a store that cannot hold two groups of it gives
        ``status="insufficient samples"`` instead of an error.
    cross_source : bool
        Also compare every pair of sources.

    Returns
    -------
    ConsistencyResult
    """
    if not 0.0 < float(ci) < 1.0:
        raise PosbiasError(f"consistency: ci={ci} must be in (0, 1), e.g. 0.95")
    if not -1.0 <= float(threshold) <= 1.0:
        raise PosbiasError(f"consistency: threshold={threshold} must be a Pearson r in [-1, 1], e.g. 0.9")
    if isinstance(n_repeats, bool) or int(n_repeats) < 2:
        raise PosbiasError(f"consistency: n_repeats={n_repeats} must be >= 2 (200 is the default)")
    alpha = 1.0 - float(ci)
    pools = curves.source_indices()  # source -> (S_src,)
    sizes_avail = {name: int(idx.size) for name, idx in pools.items()}
    largest_name = max(sizes_avail, key=lambda k: (sizes_avail[k], k))
    largest = sizes_avail[largest_name]
    pairs = list(combinations(sorted(pools), 2)) if cross_source else []

    def feasible_within(n: int, name: str) -> bool:
        return 2 * n <= sizes_avail[name]

    explicit = group_sizes is not None

    def feasible_cross(n: int, a: str, b: str) -> bool:
        limit = min(sizes_avail[a], sizes_avail[b])
        return n <= (limit if explicit else limit // 2)

    if explicit:
        sizes = sorted({int(n) for n in group_sizes})  # type: ignore[union-attr]
        if not sizes or sizes[0] < 2:
            raise PosbiasError(f"group_sizes={list(group_sizes)}: every group size must be >= 2")  # type: ignore[arg-type]
        for n in sizes:
            if not any(feasible_within(n, s) for s in pools) and not any(feasible_cross(n, a, b) for a, b in pairs):
                raise PosbiasError(
                    f"group_sizes: two disjoint groups of {n} need {2 * n} samples in one source "
                    f"(largest source {largest_name!r} has {largest}); pass sizes <= {max(largest // 2, 1)} "
                    "or profile more samples"
                )
    else:
        # default sizes: the ladder plus each comparison's own largest size (half a source within, half the
        # smaller source across, so that within and cross comparisons are made at equal group sizes and the
        # groups never exhaust a source, which would collapse the split interval)
        tops = [sizes_avail[s] // 2 for s in pools] + [min(sizes_avail[a], sizes_avail[b]) // 2 for a, b in pairs]
        upper = max(tops)
        sizes = [n for n in DEFAULT_GROUP_SIZES if min_group_size <= n <= upper]
        sizes = sorted(set(sizes) | {t for t in tops if t >= min_group_size})

    if not sizes:
        need = 2 * int(min_group_size)
        evidence = (
            f"two disjoint groups of {min_group_size} need {need} samples in one source "
            f"(largest source {largest_name!r} has {largest}); profile at least {need - largest} more samples to test consistency"
        )
        return ConsistencyResult(
            more_samples=need - largest,
            settle=f"profile at least {need - largest} more samples (then {need} in {largest_name!r}) to test consistency",
            status="insufficient samples",
            verdict="insufficient samples",
            evidence=evidence,
            threshold=float(threshold),
            ci=float(ci),
            n_repeats=int(n_repeats),
            seed=int(seed),
        )

    results: list[ConsistencyCurve] = []
    jobs: list[tuple[str, list[str]]] = [("within", [name]) for name in sorted(pools)]
    jobs += [("cross", [a, b]) for a, b in pairs]
    for job_id, (kind, names) in enumerate(jobs):
        rng = np.random.default_rng([int(seed), job_id])
        curve = ConsistencyCurve(kind=kind, sources=list(names), available=[sizes_avail[s] for s in names])
        for n in sizes:
            if kind == "within":
                if not feasible_within(n, names[0]):
                    continue
                stats = _pair_stats(curves, pools[names[0]], None, n, int(n_repeats), rng, alpha)
            else:
                if not feasible_cross(n, names[0], names[1]):
                    continue
                stats = _pair_stats(curves, pools[names[0]], pools[names[1]], n, int(n_repeats), rng, alpha)
            med, mean, lo, hi, k = stats
            curve.group_sizes.append(int(n))
            curve.r_median.append(med)
            curve.r_mean.append(mean)
            curve.r_low.append(lo)
            curve.r_high.append(hi)
            curve.n_repeats.append(k)
        if curve.group_sizes:
            curve.verdict = _verdict(curve.r_low[-1], curve.r_median[-1], float(threshold))
            results.append(curve)

    if not results:
        return ConsistencyResult(
            status="insufficient samples",
            verdict="insufficient samples",
            evidence=f"no source holds two groups of {sizes[0]}; profile at least {2 * sizes[0] - largest} more samples",
            more_samples=2 * sizes[0] - largest,
            settle=f"profile at least {2 * sizes[0] - largest} more samples",
            threshold=float(threshold),
            ci=float(ci),
            n_repeats=int(n_repeats),
            seed=int(seed),
        )
    verdicts = [c.verdict for c in results]
    if all(v == "consistent" for v in verdicts):
        overall = "consistent"
    elif any(v == "not consistent" for v in verdicts):
        overall = "not consistent"
    else:
        overall = "inconclusive"
    pct = int(round(100 * float(ci)))
    parts = [
        f"{c.label}: r={c.r_median[-1]:.3f} [{c.r_low[-1]:.3f}, {c.r_high[-1]:.3f}] at n={c.group_sizes[-1]}"
        if np.isfinite(c.r_median[-1])
        else f"{c.label}: r undefined (constant mean curves) at n={c.group_sizes[-1]}"
        for c in results
    ]
    if overall == "consistent":
        head = f"bias is consistent across groups (r >= {threshold:g} at the largest n; {pct}% split interval)"
    elif overall == "not consistent":
        head = f"bias is NOT consistent across groups (median r < {threshold:g} at the largest n)"
    else:
        head = f"consistency is inconclusive (the {pct}% split interval straddles r = {threshold:g})"
    more, settle = _settle(results, sizes_avail, float(threshold))
    evidence = head + ": " + "; ".join(parts)
    if settle:
        evidence += ". To settle it: " + settle
    return ConsistencyResult(
        more_samples=more,
        settle=settle,
        status="evaluated",
        verdict=overall,
        evidence=evidence,
        threshold=float(threshold),
        ci=float(ci),
        n_repeats=int(n_repeats),
        seed=int(seed),
        curves=results,
    )
