"""Selection algorithms of the seeds (MMR, adaptive soft-NMS, ARP, Gaussian centre weight) against references."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from posbias.errors import PosbiasError
from posbias.runtime.methods import (
    arp_quota,
    arp_select,
    gaussian_centre_weight,
    mmr_select,
    neighbour_table,
    soft_nms_select,
    topk_select,
)


def _grid(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(rows * cols)
    return idx // cols, idx % cols


def mmr_reference(rel: list[float], feats: list[list[float]], k: int, lam: float) -> list[int]:
    """Eq. 7 greedy in plain Python (min-max relevance, cosine of L2-normalised features)."""
    lo, hi = min(rel), max(rel)
    r = [(x - lo) / (hi - lo) for x in rel]
    norm = [[v / math.sqrt(sum(u * u for u in f)) for v in f] for f in feats]

    def cos(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(norm[i], norm[j]))

    picks = [max(range(len(r)), key=lambda i: (r[i], -i))]
    while len(picks) < k:
        best, best_s = -1, -float("inf")
        for i in range(len(r)):
            if i in picks:
                continue
            s = lam * r[i] - (1 - lam) * max(cos(i, j) for j in picks)
            if s > best_s:
                best, best_s = i, s
        picks.append(best)
    return picks


def test_mmr_matches_python_reference():
    g = torch.Generator().manual_seed(0)
    rel = torch.rand(40, generator=g, dtype=torch.float64)
    feats = torch.randn(40, 6, generator=g, dtype=torch.float64)
    for lam in (0.9, 0.5, 0.0):
        got = mmr_select(rel, feats, 12, lam=lam).tolist()
        assert got == mmr_reference(rel.tolist(), feats.tolist(), 12, lam)


def test_mmr_first_pick_is_relevance_and_diversity_skips_duplicates():
    rel = torch.tensor([0.1, 1.0, 0.95, 0.3, 0.2])
    base = torch.eye(5)
    feats = base.clone()
    feats[2] = feats[1]  # token 2 duplicates token 1
    picks = mmr_select(rel, feats, 2, lam=0.5).tolist()
    assert picks[0] == 1 and picks[1] != 2  # relevance alone (lam=1) would take the duplicate
    assert mmr_select(rel, feats, 2, lam=1.0).tolist() == [1, 2]
    with pytest.raises(PosbiasError, match="mmr_lambda"):
        mmr_select(rel, feats, 2, lam=1.5)
    with pytest.raises(PosbiasError, match="keep"):
        mmr_select(rel, feats, 6)


def soft_nms_reference(scores, rows, cols, keys, k, sd, ss, window, groups=None):
    s = [float(x) for x in scores]
    n = len(s)
    kn = [[v / math.sqrt(sum(u * u for u in f)) for v in f] for f in keys]
    g = groups or [0] * n
    half = window // 2
    picks: list[int] = []
    while len(picks) < k:
        i = max((j for j in range(n) if j not in picks), key=lambda j: (s[j], -j))
        picks.append(i)
        for j in range(n):
            if g[j] != g[i] or abs(rows[j] - rows[i]) > half or abs(cols[j] - cols[i]) > half:
                continue
            d2 = (rows[j] - rows[i]) ** 2 + (cols[j] - cols[i]) ** 2
            c = sum(a * b for a, b in zip(kn[i], kn[j]))
            s[j] *= 1 - math.exp(-d2 / (2 * sd * sd)) * math.exp(-((1 - c) ** 2) / (2 * ss * ss))
    return picks


@pytest.mark.parametrize("sd,ss,window", [(1.5, 0.05, 5), (1.0, 0.5, 3), (2.0, 1.0, 7)])
def test_soft_nms_matches_algorithm_1(sd, ss, window):
    g = torch.Generator().manual_seed(1)
    rows, cols = _grid(6, 7)
    scores = torch.rand(42, generator=g, dtype=torch.float64)
    keys = torch.randn(42, 5, generator=g, dtype=torch.float64)
    keys[1::2] = keys[0::2][:21] + 0.01 * keys[1::2]  # near-duplicate keys make the similarity term matter
    got = soft_nms_select(scores, rows, cols, keys, 15, sigma_d=sd, sigma_s=ss, window=window).tolist()
    ref = soft_nms_reference(scores.tolist(), rows.tolist(), cols.tolist(), keys.tolist(), 15, sd, ss, window)
    assert got == ref


def test_soft_nms_spreads_picks_and_never_crosses_subimages():
    rows, cols = _grid(8, 8)
    scores = torch.zeros(64)
    scores[27], scores[28], scores[36] = 1.0, 0.99, 0.98  # a hot cluster in the middle
    scores[0] = 0.5
    keys = torch.ones(64, 4)  # identical keys: full similarity, suppression by distance only
    picks = soft_nms_select(scores, rows, cols, keys, 2, sigma_d=1.5, sigma_s=0.05, window=5).tolist()
    assert picks == [27, 0]  # plain top-2 would be [27, 28]
    # two sub-images side by side: a pick in one must not suppress the other
    groups = (cols >= 4).long()
    r2, c2 = rows, cols % 4
    scores = torch.zeros(64)
    scores[3], scores[4] = 1.0, 0.99  # adjacent on the grid, different sub-images
    picks = soft_nms_select(scores, r2, c2, keys, 2, groups=groups).tolist()
    assert picks == [3, 4]
    nbr = neighbour_table(r2, c2, 5, groups)
    assert set(nbr[3].tolist()) - {64} <= set(torch.nonzero(groups == 0).flatten().tolist())


def test_arp_quota_reproduces_the_seed_count_and_keeps_top_per_block():
    rows, cols = _grid(24, 24)
    block, quota = arp_quota(rows, cols, (24, 24))
    assert quota.shape == (36,) and int(quota.sum()) == 352  # seed Table 3: 576 -> 352
    assert sorted(set(quota.tolist())) == [8, 12]
    imp = torch.rand(576, generator=torch.Generator().manual_seed(0))
    kept = arp_select(imp, rows, cols, (24, 24))
    assert kept.shape == (352,) and bool((kept[1:] > kept[:-1]).all())
    for b in range(36):
        members = torch.nonzero(block == b).flatten()
        want = members[torch.argsort(imp[members], descending=True)[: int(quota[b])]]
        assert set(want.tolist()) == set(kept[block[kept] == b].tolist())
    with pytest.raises(PosbiasError, match="arp_edge_ratio"):
        arp_select(imp, rows, cols, (24, 24), edge_ratio=1.0)


def test_gaussian_weight_matches_the_anchor_mask():
    rows, cols = _grid(24, 24)
    w = gaussian_centre_weight(rows, cols, (24, 24), 1.0)
    x = torch.linspace(-12, 12, 24)
    ref = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 12.0 ** 2)).flatten()  # anchor: sigma 12
    torch.testing.assert_close(w, ref)
    with pytest.raises(PosbiasError, match="sigma"):
        gaussian_centre_weight(rows, cols, (24, 24), 0.0)


def test_topk_ties_and_order():
    s = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1])
    assert topk_select(s, 3).tolist() == [0, 1, 3]
    assert list(itertools.chain(topk_select(s, 1).tolist())) == [1]


def test_runtime_modules_import_no_heavy_modules():
    code = textwrap.dedent(
        """
        import sys
        import posbias.runtime, posbias.runtime.prune, posbias.runtime.vision, posbias.runtime.spec
        import posbias.runtime.methods, torch
        from posbias.runtime.methods import mmr_select
        mmr_select(torch.rand(50), torch.rand(50, 8), 5)
        heavy = ('h5py', 'scipy', 'statsmodels', 'highspy', 'matplotlib', 'sklearn', 'transformers', 'posbias.fitters',
                 'posbias.models', 'posbias.profiler', 'posbias.data')
        print(sorted(m for m in heavy if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
