"""Paired comparison of each pruning method with a baseline (FastV) on the same evaluation samples.

For a (method, keep) and the baseline at the same keep, every sample evaluated by both gives one difference
``d_s = x_s(method) - x_s(baseline)`` of a per-sample measure: ``kl`` (KL(full || pruned), lower is better),
``top1`` / ``exact`` (agreement with the full model, 0/1, higher is better). From the S differences:

- ``mean``: the mean difference;
- ``ci``: a percentile bootstrap interval of the mean (``n_boot`` resamples of the samples, seeded);
- ``p``: the two-sided Wilcoxon signed-rank p-value (scipy; zero differences dropped, ``"wilcox"`` zero
  method; 1.0 when every difference is zero);
- ``verdict``: ``"better"`` when the interval excludes 0 on the good side AND ``p < alpha``, ``"worse"`` when it
  excludes 0 on the bad side AND ``p < alpha``, else ``"not distinguishable"``;
- ``n_needed``: samples a paired test would need to decide at this effect size, ``((z_{1-alpha/2} + z_{power}) sd
  / |mean|)^2`` (normal approximation, power 0.8), ``None`` when the mean is 0.

KL and agreement measure fidelity to the full model, not task quality; see docs/evaluation.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["MEASURES", "VERDICTS", "paired_stats", "paired_comparisons"]

#: per-sample field, direction (-1: lower is better, +1: higher is better)
MEASURES: dict[str, tuple[str, int]] = {"kl": ("kl", -1), "top1": ("top1_agree", +1), "exact": ("exact_agree", +1)}

VERDICTS: tuple[str, ...] = ("better", "not distinguishable", "worse")


def paired_stats(diff: Any, *, direction: int, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0,
                 power: float = 0.8) -> dict[str, Any]:
    """Mean, bootstrap CI, Wilcoxon p, verdict and samples needed for paired differences ``diff`` (S,).

    ``direction`` is -1 when a negative difference is an improvement (KL), +1 when a positive one is.
    """
    from scipy.stats import norm, wilcoxon

    d = np.asarray(diff, dtype=np.float64)  # (S,)
    n = int(d.size)
    out: dict[str, Any] = {"n": n, "mean": None, "ci": [None, None], "p": None, "verdict": "not distinguishable",
                           "n_needed": None, "level": 1.0 - alpha}
    if n == 0:
        return out
    mean = float(d.mean())
    out["mean"] = mean
    if n >= 2:
        rng = np.random.default_rng([int(seed), 104729])
        idx = rng.integers(0, n, size=(int(n_boot), n))  # (B, S)
        boots = d[idx].mean(axis=1)  # (B,)
        lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
        out["ci"] = [float(lo), float(hi)]
        sd = float(d.std(ddof=1))
        if mean != 0.0:
            z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
            out["n_needed"] = int(math.ceil((z * sd / abs(mean)) ** 2)) if sd > 0 else 2
    nz = d[d != 0.0]
    if nz.size == 0:
        p = 1.0
    else:
        p = float(wilcoxon(nz, zero_method="wilcox", alternative="two-sided").pvalue)
    out["p"] = p
    lo, hi = out["ci"]
    if lo is not None and p < alpha:
        good_side = (hi < 0.0) if direction < 0 else (lo > 0.0)
        bad_side = (lo > 0.0) if direction < 0 else (hi < 0.0)
        out["verdict"] = "better" if good_side else ("worse" if bad_side else "not distinguishable")
    return out


def paired_comparisons(per_sample: list[dict[str, Any]], *, baseline: str = "fastv", alpha: float = 0.05,
                       n_boot: int = 2000, seed: int = 0) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(method, keep): {"baseline", "kl": stats, "top1": stats, "exact": stats, "verdict"}}`` for every
    method evaluated at a keep where the baseline was too (the baseline itself is left out).

    ``verdict`` is the KL verdict (the primary measure); the agreement verdicts are in their own stats.
    """
    rows: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in per_sample:
        rows.setdefault((r["method"], int(r["keep"])), {})[r["id"]] = r
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for (method, keep), by_id in rows.items():
        base = rows.get((baseline, keep))
        if method == baseline or base is None:
            continue
        ids = [i for i in by_id if i in base]
        entry: dict[str, Any] = {"baseline": baseline}
        for name, (field, direction) in MEASURES.items():
            diff = [float(by_id[i][field]) - float(base[i][field]) for i in ids]
            entry[name] = paired_stats(diff, direction=direction, alpha=alpha, n_boot=n_boot, seed=seed)
        entry["verdict"] = entry["kl"]["verdict"]
        out[(method, keep)] = entry
    return out
