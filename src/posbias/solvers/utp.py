"""UTP layer-wise retention schedules (section 3.3, Eqs. 3-5), solved exactly.

Indexing: decoder layers are 0-based here, ``i = 0..L-1`` (UTP's ``l = i + 1``). Layer 0 keeps all
``V`` visual tokens (UTP's ``r_1 = V``); a schedule is ``r = (r_0 = V, r_1, ..., r_{L-1})`` with
``V >= r_1 >= ... >= r_{L-1} >= min_keep`` and ``sum_{i>=1} r_i = B`` where
``B = round(V * L / c) - V`` for compression ratio ``c`` (:func:`retention_budget`).

Inputs per sample: a ranking metric ``m`` (V, L) (last-token attention per layer, position-agnostic in the
first layers when available, see :func:`ranking_metric`) and the information loss ``ell`` (L,)
(``ell[i]``: arccos deviation of the final feature when all visual tokens are removed from layer i on,
:mod:`posbias.profiler.utr`). The loss of layer i >= 1 is ``t_i = ell[i] * m[pruned_i, i].sum() / m[:, i].sum()``
where ``pruned_i`` are the tokens dropped at layer i; the tokens kept at layer i are the top ``r_i`` of the
tokens kept at layer i-1 by ``m[:, i-1]`` (ties: lower index first). :func:`simulate_loss` evaluates this
progressive top-k pruning for a given schedule.

Three formulations (docs/utp.md derives them and says what is exact):

``"tokens"``
    UTP's Eqs. 4-5 exactly: binary ``x[i, j]`` (token j kept at layer i), nesting ``x[i] <= x[i-1]``, and
    the top-k rule linearised with one monotone threshold vector per layer (``x[i,j] = x[i-1,j] AND z[i, rank(j)]``).
    Optimal for progressive top-k pruning; ``O(V L)`` binaries per sample, practical only for small V L.
``"compact"`` (default)
    Each layer measures its pruned mass over a prefix of its own ranking, so the objective separates into
    per-layer tables ``f_i(r_i)`` (:func:`compact_tables`); summed over samples for the joint program
    (:func:`summed_tables`), so S does not change the program's size. Its proven optimum over every keep level
    comes from an exact dynamic program (:func:`compact_optimum`, no MILP; ~0.5 s at L=32, V=576, c=4).
``"pwl"``
    The compact tables interpolated linearly between ``levels`` shared keep levels (:func:`keep_levels`),
    incremental (delta) formulation with one binary per segment and an integer ``r_i`` solved with HiGHS, so
    ``r_i`` stays integral and the budget is met exactly. With every level a breakpoint (V small) it is the
    compact model.

Modes: ``"joint"`` solves one program for one schedule shared by all samples (sum of their losses);
``"per_sample"`` solves each sample alone and aggregates: the schedule is the feasible one (budget met
exactly, non-increasing, bounds) nearest in L1 to the mean per-sample schedule, itself found with HiGHS.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from posbias.errors import PosbiasError
from posbias.solvers.milp import MilpResult, solve_milp

__all__ = [
    "FORMULATIONS",
    "MODES",
    "retention_budget",
    "ranking_metric",
    "simulate_loss",
    "iter_schedules",
    "compact_tables",
    "summed_tables",
    "keep_levels",
    "pwl_cost",
    "compact_optimum",
    "check_schedule",
    "UTPSolver",
]

FORMULATIONS: tuple[str, ...] = ("compact", "pwl", "tokens")

#: largest S * (L-1) * V (binaries x of the token-level program) for which ``token_bound="auto"`` also solves the
#: UTP's token-level program (Eqs. 4-5) next to the compact optimum (V=64, L=8, S=3: 1344, a few seconds)
TOKEN_BOUND_MAX = 2048

#: seconds the token-level program may take when solved as a bound next to another formulation
TOKEN_BOUND_SECONDS = 30.0
MODES: tuple[str, ...] = ("joint", "per_sample")


# ------------------------------------------------------------------------------------------- basics


def retention_budget(n_visual: int, n_layers: int, ratio: float, *, min_keep: int = 1) -> int:
    """Tokens to keep over layers 1..L-1, ``B = round(V * L / ratio) - V`` (UTP Eq. 3).

    Parameters
    ----------
    n_visual : int
        V, visual tokens entering the decoder.
    n_layers : int
        L, decoder layers (>= 2).
    ratio : float
        Compression ratio c >= 1 (UTP's CR as a factor: 4 for "400%").
    min_keep : int
        Tokens every layer keeps at least.

    Raises
    ------
    PosbiasError
        For c < 1, or a budget below ``min_keep`` tokens per layer (c too high for this V and L).
    """
    if not np.isfinite(ratio) or ratio < 1:
        raise PosbiasError(f"compression ratio {ratio!r} is below 1; pass ratios >= 1 (e.g. ratios 2, 4, 8)")
    if n_layers < 2:
        raise PosbiasError(f"a schedule needs at least 2 decoder layers, the model has {n_layers}")
    if n_visual < 1:
        raise PosbiasError("samples have no visual tokens; profile samples with an image")
    budget = int(round(n_visual * n_layers / float(ratio))) - int(n_visual)
    budget = min(budget, n_visual * (n_layers - 1))
    floor = min_keep * (n_layers - 1)
    if budget < floor:
        c_max = n_visual * n_layers / (n_visual + floor)
        raise PosbiasError(
            f"compression ratio {ratio:g} leaves {budget} tokens for {n_layers - 1} layers (V={n_visual}), "
            f"below {min_keep} per layer; pass a ratio <= {c_max:.3g}"
        )
    return budget


def ranking_metric(attn: np.ndarray, attn_pa: np.ndarray | None = None, *, pa_layers: int = 3) -> np.ndarray:
    """The per-layer ranking metric ``a^i`` (V, L): position-agnostic rows for the first ``pa_layers``
    layers when given, the ordinary attention rows elsewhere.

    Parameters
    ----------
    attn : np.ndarray
        (V, L) float last-token attention (head mean) of one sample.
    attn_pa : np.ndarray or None
        (V, L) or (V, k) float position-agnostic attention of the first layers (UTP Eq. 2), or None.
    pa_layers : int
        How many leading layers use ``attn_pa`` (seed default 3).
    """
    attn = np.asarray(attn, dtype=np.float64)  # (V, L)
    if attn.ndim != 2:
        raise PosbiasError(f"attention rows have shape {attn.shape}; expected (V, L)")
    out = attn.copy()  # (V, L)
    if attn_pa is not None and pa_layers > 0:
        pa = np.asarray(attn_pa, dtype=np.float64)  # (V, k)
        k = min(pa_layers, pa.shape[1], attn.shape[1])
        out[:, :k] = pa[:, :k]
    return out


def _normalised(metric: np.ndarray) -> np.ndarray:
    """(V, L) columns divided by their sums (zero columns stay zero)."""
    tot = metric.sum(axis=0, keepdims=True)  # (1, L)
    return np.divide(metric, tot, out=np.zeros_like(metric), where=tot > 0)


def _rank_order(col: np.ndarray) -> np.ndarray:
    """(V,) int64 token indices sorted by descending score, ties by lower index."""
    return np.argsort(-col, kind="stable")


def check_schedule(schedule: Sequence[int], n_visual: int, budget: int, *, min_keep: int = 1) -> np.ndarray:
    """Validate a schedule (L,) and return it as int64; raise PosbiasError naming the broken rule."""
    r = np.asarray(schedule)
    if r.ndim != 1 or r.shape[0] < 2 or not np.all(np.equal(np.round(r), r)):
        raise PosbiasError(f"schedule {list(r)} must be a list of integers, one per layer")
    r = r.astype(np.int64)  # (L,)
    if r[0] != n_visual:
        raise PosbiasError(f"schedule starts with {r[0]}, layer 0 must keep all V={n_visual} tokens")
    if np.any(np.diff(r) > 0):
        raise PosbiasError(f"schedule {r.tolist()} increases somewhere; kept sets are nested, so it must not")
    if r[-1] < min_keep:
        raise PosbiasError(f"schedule {r.tolist()} keeps fewer than {min_keep} token(s) at some layer")
    if int(r[1:].sum()) != budget:
        raise PosbiasError(f"schedule {r.tolist()} keeps {int(r[1:].sum())} tokens over layers 1.., budget is {budget}")
    return r


def simulate_loss(metric: np.ndarray, info_loss: np.ndarray, schedule: Sequence[int]) -> float:
    """Objective of one sample under progressive top-k pruning (the exact model, UTP Eqs. 3-4).

    Parameters
    ----------
    metric : np.ndarray
        (V, L) ranking metric / attention mass per layer.
    info_loss : np.ndarray
        (L,) information loss ``ell`` per layer (entry 0 unused).
    schedule : sequence of int
        (L,) kept tokens per layer, ``schedule[0] == V``.
    """
    metric = np.asarray(metric, dtype=np.float64)  # (V, L)
    norm = _normalised(metric)  # (V, L)
    v, n_layers = metric.shape
    alive = np.arange(v)  # (n,) kept token ids, current
    total = 0.0
    for i in range(1, n_layers):
        order = alive[_rank_order(metric[alive, i - 1])]  # (n,)
        keep = order[: int(schedule[i])]
        pruned = order[int(schedule[i]) :]
        total += float(info_loss[i]) * float(norm[pruned, i].sum())
        alive = np.sort(keep)
    return total


def iter_schedules(n_visual: int, n_layers: int, budget: int, *, min_keep: int = 1) -> Iterator[np.ndarray]:
    """Every admissible schedule (L,) int64: ``r_0 = V``, non-increasing, ``>= min_keep``, budget met.

    Exponential; for tests and tiny instances only.
    """

    def rec(prefix: list[int], remaining: int, layers_left: int) -> Iterator[list[int]]:
        if layers_left == 0:
            if remaining == 0:
                yield prefix
            return
        hi = min(prefix[-1], remaining - min_keep * (layers_left - 1))
        for r in range(min_keep, hi + 1):
            if r * layers_left < remaining:  # later layers keep <= r each
                continue
            yield from rec(prefix + [r], remaining - r, layers_left - 1)

    for sched in rec([n_visual], budget, n_layers - 1):
        yield np.asarray(sched, dtype=np.int64)


def compact_tables(metric: np.ndarray, info_loss: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-layer cost tables of the compact formulation.

    Returns
    -------
    f : np.ndarray
        (L-1, V+1) float64, ``f[i-1, k]`` the part of the objective that depends on ``r_i = k``:
        ``-ell_i G_i(k) + ell_{i+1} G_{i+1}(k)`` where ``G_i(k)`` is the normalised layer-i mass of the
        top-k tokens by the layer-(i-1) metric (``G_L = 0``).
    const : float
        ``ell_1 * G_1(V) = ell_1`` (layer 1 always starts from all V tokens).
    """
    metric = np.asarray(metric, dtype=np.float64)  # (V, L)
    ell = np.asarray(info_loss, dtype=np.float64)  # (L,)
    v, n_layers = metric.shape
    norm = _normalised(metric)  # (V, L)
    g = np.zeros((n_layers + 1, v + 1))  # (L+1, V+1); g[i, k] = G_i(k), rows 0 and L stay 0
    for i in range(1, n_layers):
        order = _rank_order(metric[:, i - 1])  # (V,)
        g[i, 1:] = np.cumsum(norm[order, i])
    ell_ext = np.concatenate([ell, [0.0]])  # (L+1,)
    f = -ell_ext[1:n_layers, None] * g[1:n_layers] + ell_ext[2 : n_layers + 1, None] * g[2 : n_layers + 1]
    return f, float(ell[1] * g[1, v])  # (L-1, V+1), scalar


def summed_tables(metrics: Sequence[np.ndarray], losses: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`compact_tables` summed over samples: (L-1, V+1) float64 tables and the constant.

    The joint objective over samples sharing one schedule is the sum of the per-sample objectives, so
    the joint program has the size of one sample's whatever S is. Vectorised over layers and over blocks of
    :data:`TABLE_BLOCK` samples (one (S, L, V) float64 stack of 500 samples is ~74 MB per temporary: page
    faults alone made the whole-stack version 4x slower, measured in ``benchmarks/bench_utp.py``).
    """
    ells = np.asarray(losses, dtype=np.float64)  # (S, L)
    if len(metrics) == 0:
        raise PosbiasError("no samples to build cost tables from")
    n_s = len(metrics)
    v, n_layers = np.asarray(metrics[0]).shape
    f = np.zeros((n_layers - 1, v + 1))  # (L-1, V+1)
    const = 0.0
    g = np.zeros((min(TABLE_BLOCK, n_s), n_layers + 1, v + 1))  # (b, L+1, V+1), g[:, i, k] = G_i(k); reused
    for a in range(0, n_s, TABLE_BLOCK):
        e = ells[a : a + TABLE_BLOCK]  # (b, L)
        mets = np.stack([np.asarray(m, dtype=np.float64).T for m in metrics[a : a + TABLE_BLOCK]])  # (b, L, V)
        nb = mets.shape[0]
        tot = mets.sum(axis=2, keepdims=True)  # (b, L, 1)
        norm = np.divide(mets, tot, out=np.zeros_like(mets), where=tot > 0)  # (b, L, V)
        neg = -mets[:, :-1]  # (b, L-1, V) scores of layer i-1, best first after sorting
        order = np.argsort(neg, axis=2)  # (b, L-1, V) quicksort: ties in arbitrary order
        srt = np.take_along_axis(neg, order, axis=2)  # (b, L-1, V)
        tied = (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)  # (b, L-1) rows with ties
        if tied.any():  # ties: lower index first, as in simulate_loss and the runtime
            order[tied] = np.argsort(neg[tied], axis=1, kind="stable")
        gb = g[:nb]
        gb[:, 0] = 0.0
        gb[:, n_layers] = 0.0
        gb[:, :, 0] = 0.0
        np.cumsum(np.take_along_axis(norm[:, 1:], order, axis=2), axis=2, out=gb[:, 1:n_layers, 1:])
        ell_ext = np.concatenate([e, np.zeros((nb, 1))], axis=1)  # (b, L+1)
        f += np.einsum("sl,slk->lk", -ell_ext[:, 1:n_layers], gb[:, 1:n_layers]) + np.einsum(
            "sl,slk->lk", ell_ext[:, 2:], gb[:, 2:]
        )  # (L-1, V+1)
        const += float((e[:, 1] * gb[:, 1, v]).sum())
    return f, const


#: samples per block in :func:`summed_tables`
TABLE_BLOCK = 16


# ----------------------------------------------------------------------------------- program builders


def keep_levels(f: np.ndarray, min_keep: int, levels: int | None) -> np.ndarray:
    """Breakpoints (keep levels) of the piecewise-linear model, shared by all layers.

    Parameters
    ----------
    f : np.ndarray
        (L-1, V+1) float64 summed cost tables (:func:`compact_tables`).
    min_keep : int
        Smallest admissible ``r_i``; always a breakpoint, as is ``V``.
    levels : int or None
        Number of breakpoints (>= 2). None, or at least ``V - min_keep + 1``: every integer level is a
        breakpoint and the interpolation is the table itself (exact compact costs).

    Returns
    -------
    np.ndarray
        (G,) int64 ascending breakpoints, ``G = min(levels, V - min_keep + 1)``.

    Notes
    -----
    Greedy adaptive placement: start from ``{min_keep, V}`` and repeatedly add the level where the
    interpolation error summed over layers, ``sum_i |f_i(k) - interp_i(k)|``, is largest (it is zero at
    breakpoints, so each step adds a new level). Deterministic (ties: lowest level).
    """
    n_rows, vp1 = f.shape  # L-1, V+1
    v = vp1 - 1
    if levels is not None and levels < 2:
        raise PosbiasError(f"levels={levels} must be at least 2 (or None for every keep level)")
    if levels is None or v - min_keep + 1 <= levels:
        return np.arange(min_keep, v + 1, dtype=np.int64)
    ks = np.arange(min_keep, v + 1)  # (K,)
    vals = f[:, ks]  # (L-1, K)
    pts = np.zeros(ks.size, dtype=bool)  # (K,) breakpoint flags
    pts[[0, -1]] = True
    for _ in range(levels - 2):
        idx = np.flatnonzero(pts)  # (G,)
        seg = np.clip(np.searchsorted(idx, np.arange(ks.size), side="right") - 1, 0, idx.size - 2)  # (K,)
        a, b = idx[seg], idx[seg + 1]
        w = (np.arange(ks.size) - a) / (b - a)  # (K,)
        err = np.abs(vals[:, a] * (1 - w) + vals[:, b] * w - vals).sum(axis=0)  # (K,)
        err[pts] = -1.0
        pts[int(np.argmax(err))] = True
    return ks[pts].astype(np.int64)


def pwl_cost(f: np.ndarray, points: np.ndarray, schedule_tail: np.ndarray) -> np.ndarray:
    """Per-layer piecewise-linear cost ``g_i(r_i)`` (L-1,) of ``r = schedule_tail`` (layers 1..L-1)."""
    r = np.asarray(schedule_tail, dtype=np.float64)  # (L-1,)
    return np.array([np.interp(r[i], points, f[i, points]) for i in range(f.shape[0])])  # (L-1,)


def compact_optimum(f: np.ndarray, const: float, budget: int, *, min_keep: int = 1) -> tuple[np.ndarray, float]:
    """The exact optimum of the compact model: ``min const + sum_i f_i(r_i)`` over admissible schedules.

    Dynamic program over layers, keep levels and tokens used so far: ``D_i[k, b]`` is the least cost of layers
    1..i with ``r_i = k`` and ``r_1 + ... + r_i = b``; ``D_i[k, b] = f_i(k) + min_{k' >= k} D_{i-1}[k', b - k]``
    (``D_0`` is 0 at ``k = V, b = 0``). Each layer is one suffix minimum over ``k'`` and one skewed add (a strided
    view); rows and columns that cannot reach the budget (``i k <= b <= min(i V, B - (L-1-i) min_keep)``,
    ``b >= B - (L-1-i) kmax_{i+1}``) are never built.
    The schedule is read back from the last layer's column ``b = B``; only every ``~sqrt(L)``-th layer's table
    is kept and the others are recomputed block by block while reading it back (memory ~2 sqrt(L) tables).
    Exact: every admissible schedule is a path, so the minimum over paths is the optimum (ties: the lowest
    ``k'``). Tested against enumeration (tests/test_utp.py).

    Parameters
    ----------
    f : np.ndarray
        (L-1, V+1) float64 tables (:func:`compact_tables` / :func:`summed_tables`), ``f[i-1, k]`` for ``r_i = k``.
    const : float
        Constant term of the objective.
    budget : int
        ``B = sum_{i>=1} r_i``.
    min_keep : int
        Smallest admissible ``r_i``.

    Returns
    -------
    tail : np.ndarray
        (L-1,) int64 optimal ``r_1 .. r_{L-1}``.
    objective : float
        ``const + sum_i f_i(r_i)``.
    """
    f = np.asarray(f, dtype=np.float64)  # (m, V+1)
    m, vp1 = f.shape
    v, b_tot, lo = vp1 - 1, int(budget), int(min_keep)
    if m < 1 or not (m * lo <= b_tot <= m * v):
        raise PosbiasError(f"budget {budget} cannot be split over {m} layers keeping {lo}..{v} tokens each")
    # rows (r_i = k) and columns (b = r_1 + .. + r_i) that can still lead to the budget: i k <= b,
    # b <= min(i V, B - (m - i) min_keep) and b >= max(i min_keep, B - (m - i) kmax[i+1]) (later layers keep at most
    # kmax[i+1] each); table i holds columns first[i] .. last[i]
    last = [0] + [min(i * v, b_tot - (m - i) * lo) for i in range(1, m + 1)]
    kmax = [v] + [min(v, last[i] // i) for i in range(1, m + 1)]
    first = [0] + [max(i * lo, b_tot - (m - i) * (kmax[i + 1] if i < m else 0)) for i in range(1, m + 1)]
    if any(first[i] > last[i] for i in range(m + 1)):
        raise PosbiasError(f"no admissible schedule for budget {budget}; check min_keep")
    item = np.dtype(np.float64).itemsize

    def step(prev: np.ndarray, i: int) -> np.ndarray:
        """D_i (kmax[i]+1, last[i]-first[i]+1) from D_{i-1}; out[k, j] is b = first[i] + j."""
        n_k, w, w_prev = kmax[i] + 1, last[i] - first[i] + 1, prev.shape[1]
        shift = first[i] - first[i - 1]
        t_lo = shift - (n_k - 1)  # prev column held by pad column 0
        pad = np.empty((n_k, w + n_k - 1))  # pad[k, q] = min_{k' >= k} D_{i-1}[k', t_lo + q]
        ta, tb = max(t_lo, 0), min(shift + w, w_prev)  # prev columns that exist and are read
        qa, qb = ta - t_lo, max(tb - t_lo, ta - t_lo)
        pad[:, :qa] = np.inf
        pad[:, qb:] = np.inf
        if qb > qa:
            run = pad[:, qa:qb]  # (n_k, .) suffix minima over k', one contiguous row op per level
            np.minimum.reduce(prev[n_k - 1 :, ta:tb], axis=0, out=run[n_k - 1])
            for k in range(n_k - 2, -1, -1):
                np.minimum(prev[k, ta:tb], run[k + 1], out=run[k])
        # out[k, j] = f_i(k) + pad[k, n_k - 1 + j - k]: prev column first[i] + j - k - first[i-1] (a skewed view)
        skew = np.lib.stride_tricks.as_strided(pad.ravel()[n_k - 1 :], shape=(n_k, w),
                                               strides=((w + n_k - 2) * item, item))
        out = np.add(skew, f[i - 1, :n_k, None])  # (n_k, w)
        out[:lo] = np.inf
        return out

    d0 = np.full((v + 1, 1), np.inf)  # D_0: r_0 = V, nothing used yet (column b = 0)
    d0[v, 0] = 0.0
    every = max(1, int(np.ceil(np.sqrt(m))))
    marks: dict[int, np.ndarray] = {0: d0}
    cur = d0
    for i in range(1, m + 1):
        cur = step(cur, i)
        if i % every == 0 and i < m:
            marks[i] = cur
    final = cur[:, b_tot - first[m]]  # (kmax[m]+1,) the last table holds the single column b = B
    k = int(np.argmin(final))
    best = float(final[k])
    if not np.isfinite(best):
        raise PosbiasError(f"no admissible schedule for budget {budget}; check min_keep")
    tail = np.empty(m, dtype=np.int64)
    tail[m - 1] = k
    b = b_tot - k
    hi = m  # tables D_start..D_{hi-1} are rebuilt per block, last block first
    while hi > 1:
        start = max(j for j in marks if j < hi)
        tabs = [marks[start]]
        for i in range(start + 1, hi):
            tabs.append(step(tabs[-1], i))
        for i in range(hi - 1, start - 1, -1):  # r_i from D_i's column b, rows >= r_{i+1}
            if i == 0:
                break
            col = tabs[i - start][:, b - first[i]]
            k_next = int(tail[i])
            pick = k_next + int(np.argmin(col[k_next:]))
            tail[i - 1] = pick
            b -= pick
        hi = start
    if b != 0:  # pragma: no cover - the path reaches D_0[V, 0] by construction
        raise RuntimeError("compact_optimum lost the budget while reading back the schedule")
    return tail, float(const) + best


#: seconds the incumbent sub-MIP of the pwl/compact solve may take (the proof that follows is exact either way)
INCUMBENT_SECONDS = 0.4

#: HiGHS options of the pwl/compact proof solve (started from the incumbent); see :meth:`_PwlProgram.solve`
PROOF_OPTIONS: dict[str, Any] = {
    "presolve": "off",
    "mip_detect_symmetry": False,
    "mip_allow_cut_separation_at_nodes": False,
    "mip_pool_soft_limit": 10,
    "mip_heuristic_effort": 0.0,
    "mip_heuristic_run_feasibility_jump": False,
    "mip_heuristic_run_rins": False,
    "mip_heuristic_run_rens": False,
    "mip_heuristic_run_root_reduced_cost": False,
}


class _PwlProgram:
    """Incremental (delta) piecewise-linear program of the compact costs over shared keep levels.

    Columns: ``delta[i, s]`` in [0, 1] (fill of segment s of layer i, continuous), ``z[i, s]`` binary
    (segment s of layer i is full), and integer ``r[i] = p_0 + sum_s d_s delta[i, s]``.
    Rows: ``delta[i, s+1] <= z[i, s] <= delta[i, s]`` (kinks), the ``r`` definition, monotone order
    ``delta[i, s] <= delta[i-1, s]`` (implies ``r_i <= r_{i-1}``; with shared levels it is exact, not a
    relaxation) and ``z[i, s] <= z[i-1, s]`` where both exist (a valid tightening), the budget
    ``sum_i r_i = B``.
    """

    def __init__(self, f: np.ndarray, const: float, budget: int, points: np.ndarray, *, z_order: bool = True) -> None:
        m = f.shape[0]  # L-1 layers with a choice
        p = np.asarray(points, dtype=np.int64)  # (G,)
        n_seg = p.size - 1
        self.m, self.points, self.f, self.budget = m, p, f, int(budget)
        if n_seg == 0:  # min_keep == V: a single admissible level
            self.n_seg = 0
            d = np.zeros(0)
        else:
            self.n_seg = n_seg
            d = np.diff(p).astype(np.float64)  # (M,)
        fp = f[:, p]  # (L-1, G) costs at breakpoints
        rise = np.diff(fp, axis=1)  # (L-1, M)
        # (L-1, M-1) a binary at every interior breakpoint: dropping those at convex kinks is NOT valid here
        # (a later concave stretch can make skipping an earlier segment cheaper; caught by enumeration tests)
        need = np.ones((m, max(n_seg - 1, 0)), dtype=bool)
        nd = m * n_seg
        nz = int(need.sum())
        dcol = np.arange(nd).reshape(m, n_seg)  # (L-1, M)
        zcol = -np.ones((m, max(n_seg - 1, 0)), dtype=np.int64)  # (L-1, M-1), -1: no binary
        zcol[need] = nd + np.arange(nz)
        rcol = nd + nz + np.arange(m)  # (L-1,)
        n = nd + nz + m
        self.dcol, self.zcol, self.rcol, self.need, self.d, self.n = dcol, zcol, rcol, need, d, n
        cost = np.zeros(n)
        cost[dcol.ravel()] = rise.ravel()
        self.cost = cost
        self.offset = float(const + fp[:, 0].sum())
        rr: list[np.ndarray] = []
        cc: list[np.ndarray] = []
        vv: list[np.ndarray] = []
        lo: list[np.ndarray] = []
        hi: list[np.ndarray] = []
        row = 0

        def diff_rows(a: np.ndarray, b: np.ndarray) -> None:  # a - b <= 0
            nonlocal row
            k = a.size
            rows = row + np.arange(k)
            rr.extend([rows, rows])
            cc.extend([a, b])
            vv.extend([np.ones(k), -np.ones(k)])
            lo.append(np.full(k, -np.inf))
            hi.append(np.zeros(k))
            row += k

        ii, ss = np.nonzero(need)
        diff_rows(dcol[ii, ss + 1], zcol[ii, ss])
        diff_rows(zcol[ii, ss], dcol[ii, ss])
        rows = row + np.arange(m)  # r_i - sum_s d_s delta[i, s] = p_0
        rr.extend([rows, np.repeat(rows, n_seg)])
        cc.extend([rcol, dcol.ravel()])
        vv.extend([np.ones(m), -np.tile(d, m)])
        lo.append(np.full(m, float(p[0])))
        hi.append(np.full(m, float(p[0])))
        row += m
        if m > 1 and n_seg:
            diff_rows(dcol[1:].ravel(), dcol[:-1].ravel())
            if z_order:
                both = need[1:] & need[:-1]
                a, b = np.nonzero(both)
                diff_rows(zcol[a + 1, b], zcol[a, b])
        rr.append(np.full(m, row))
        cc.append(rcol)
        vv.append(np.ones(m))
        lo.append(np.array([float(budget)]))
        hi.append(np.array([float(budget)]))
        row += 1
        self.matrix = sp.csr_matrix(
            (np.concatenate(vv), (np.concatenate(rr), np.concatenate(cc))), shape=(row, n)
        )
        self.row_lower = np.concatenate(lo)
        self.row_upper = np.concatenate(hi)
        self.col_lower = np.zeros(n)
        self.col_upper = np.ones(n)
        self.col_lower[rcol] = float(p[0])
        self.col_upper[rcol] = float(p[-1])
        self.integer = np.zeros(n, dtype=bool)
        self.integer[nd : nd + nz] = True
        self.integer[rcol] = True

    def vector(self, tail: np.ndarray) -> np.ndarray:
        """(n,) column values representing the schedule tail ``r`` (L-1,) (a MIP start)."""
        r = np.asarray(tail, dtype=np.float64)  # (L-1,)
        x = np.zeros(self.n)
        if self.n_seg:
            p = self.points.astype(np.float64)
            x[self.dcol.ravel()] = np.clip((r[:, None] - p[None, :-1]) / self.d[None], 0.0, 1.0).ravel()
            z = r[:, None] >= p[None, 1:-1]  # (L-1, M-1)
            x[self.zcol[self.need]] = z[self.need]
        x[self.rcol] = r
        return x

    def interpolated(self) -> np.ndarray:
        """(L-1, V+1) the program's cost ``g_i(k)`` at every integer keep level (``inf`` below ``p_0``)."""
        p = self.points
        v = int(p[-1])
        g = np.full((self.m, v + 1), np.inf)  # (L-1, V+1)
        ks = np.arange(int(p[0]), v + 1)
        for i in range(self.m):
            g[i, ks] = np.interp(ks, p, self.f[i, p])
        return g

    def lagrangian_start(self) -> np.ndarray | None:
        """A feasible schedule tail (L-1,) from the Lagrangian relaxation of the budget row: a primal heuristic.

        For a multiplier ``lam`` the program without its budget row, ``min sum_i g_i(r_i) + lam r_i`` over
        non-increasing ``r``, is a shortest path over (layer, keep) solved by one pass of suffix minima. A
        bisection on ``lam`` brackets the budget; each bracketing schedule is then repaired to the budget
        exactly by one-token steps of least cost increase that keep ``r`` non-increasing, and the cheaper one
        is returned. It is only a MIP start (HiGHS checks it and proves optimality itself); on the real demo
        store at ratio 12 it was 4% above the optimum where the capped sub-MIP's incumbent was 8% above,
        which cut the proof from 4.8 s to 1.9 s.
        """
        p = self.points
        v, lo_keep, m = int(p[-1]), int(p[0]), self.m
        if m == 0 or not (m * lo_keep <= self.budget <= m * v):
            return None
        g = self.interpolated()  # (L-1, V+1)
        ks = np.arange(v + 1)

        def path(lam: float) -> np.ndarray:
            cost = g + lam * ks[None, :]  # (L-1, V+1)
            arg = np.empty((m, v + 1), dtype=np.int64)  # best r_{i-1} >= k for each r_i = k
            prev = np.full(v + 1, np.inf)
            prev[v] = 0.0  # r_0 = V
            for i in range(m):
                rev = prev[::-1]
                run = np.minimum.accumulate(rev)  # suffix minima, reversed
                pos = np.maximum.accumulate(np.where(rev <= run, ks, 0))  # where each is attained
                arg[i] = (v - pos)[::-1]
                prev = cost[i] + run[::-1]
            r = np.empty(m, dtype=np.int64)
            r[-1] = int(np.argmin(prev))
            for i in range(m - 1, 0, -1):
                r[i - 1] = arg[i, r[i]]
            return r

        def repair(r: np.ndarray) -> np.ndarray:
            r = r.copy()
            rows = np.arange(m)
            while True:
                area = int(r.sum())
                if area == self.budget:
                    return r
                if area > self.budget:  # lower one layer whose successor stays below it
                    nxt = np.append(r[1:], lo_keep)
                    ok = r - 1 >= nxt
                    step = np.where(ok, g[rows, np.maximum(r - 1, 0)] - g[rows, r], np.inf)
                    r[int(np.argmin(step))] -= 1
                else:  # raise one layer whose predecessor stays above it
                    prv = np.insert(r[:-1], 0, v)
                    ok = r + 1 <= prv
                    step = np.where(ok, g[rows, np.minimum(r + 1, v)] - g[rows, r], np.inf)
                    r[int(np.argmin(step))] += 1

        lo, hi = -1.0, 1.0  # the area of path(lam) does not increase with lam
        for _ in range(64):
            if path(lo).sum() >= self.budget:
                break
            lo *= 2.0
        for _ in range(64):
            if path(hi).sum() <= self.budget:
                break
            hi *= 2.0
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if path(mid).sum() >= self.budget:
                lo = mid
            else:
                hi = mid
        cands = [repair(path(lo)), repair(path(hi))]
        vals = [float(g[np.arange(m), c].sum()) for c in cands]
        best = cands[int(np.argmin(vals))]
        return best if np.isfinite(min(vals)) else None

    def solve(self, *, time_limit: float, mip_rel_gap: float, threads: int | None) -> MilpResult:
        """LP relaxation -> sub-MIP with the LP-integral binaries fixed (incumbent) -> full MIP from it.

        All three are HiGHS solves; the first two only produce a starting incumbent (RENS-style: at most
        :data:`INCUMBENT_SECONDS`, to a 1e-4 gap; :meth:`lagrangian_start` offers a second one and the cheaper
        is used), the last one is the proof. The proof runs with presolve,
        symmetry detection, node cut separation and HiGHS's primal heuristics off and a small cut pool: with
        the incumbent in hand only the bound has to move, and on this model those components cost more time
        than they save (measured, docs/utp.md).
        """
        t0 = time.perf_counter()
        args = (self.cost, self.matrix, self.row_lower, self.row_upper)
        quick = {"presolve": "off", "mip_detect_symmetry": False}
        start = None
        zc = np.flatnonzero(self.integer)
        zc = zc[~np.isin(zc, self.rcol)]
        if zc.size:
            lp = solve_milp(*args, self.col_lower, self.col_upper, np.zeros(self.n, bool), offset=self.offset,
                            time_limit=time_limit, threads=threads, options=quick)
            if lp.x is not None:
                fixed = zc[np.abs(lp.x[zc] - np.round(lp.x[zc])) < 1e-9]
                lo_, hi_ = self.col_lower.copy(), self.col_upper.copy()
                lo_[fixed] = hi_[fixed] = np.round(lp.x[fixed])
                left = max(1e-3, min(INCUMBENT_SECONDS, time_limit - (time.perf_counter() - t0)))
                sub = solve_milp(*args, lo_, hi_, self.integer, offset=self.offset, time_limit=left,
                                 mip_rel_gap=max(mip_rel_gap, 1e-4), threads=threads)
                start = sub.x
        tail = self.lagrangian_start()
        if tail is not None:  # the cheaper of the two starts
            x_l = self.vector(tail)
            if start is None or float(self.cost @ x_l) < float(self.cost @ start) - 1e-12:
                start = x_l
        left = max(1e-3, time_limit - (time.perf_counter() - t0))
        res = solve_milp(*args, self.col_lower, self.col_upper, self.integer, offset=self.offset, time_limit=left,
                         mip_rel_gap=mip_rel_gap, threads=threads, options=PROOF_OPTIONS, start=start)
        return MilpResult(status=res.status, objective=res.objective, gap=res.gap, x=res.x,
                          seconds=time.perf_counter() - t0)


def _token_block(metric: np.ndarray, info_loss: np.ndarray, min_keep: int, col0: int, row0: int):
    """Rows/columns of the exact token model of one sample, columns from ``col0``, rows from ``row0``.

    Columns: x[i, j] (i = 1..L-1, j = 0..V-1), then z[i, p] (threshold over rank p of layer i-1's metric).
    """
    metric = np.asarray(metric, dtype=np.float64)  # (V, L)
    ell = np.asarray(info_loss, dtype=np.float64)  # (L,)
    v, n_layers = metric.shape
    m = n_layers - 1
    norm = _normalised(metric)  # (V, L)
    nx = m * v
    x = col0 + np.arange(nx).reshape(m, v)  # (L-1, V)
    z = col0 + nx + np.arange(nx).reshape(m, v)  # (L-1, V)
    cost = np.zeros(2 * nx)
    c = -ell[1:, None] * norm[:, 1:].T  # (L-1, V): -ell_i a^i_j
    c[:-1] += ell[2:, None] * norm[:, 2:].T  # + ell_{i+1} a^{i+1}_j
    cost[:nx] = c.ravel()
    offset = float(ell[1] * norm[:, 1].sum())
    pos = np.empty((m, v), dtype=np.int64)  # rank of token j in layer (i-1)'s metric
    for i in range(1, n_layers):
        pos[i - 1, _rank_order(metric[:, i - 1])] = np.arange(v)
    zj = z[np.arange(m)[:, None], pos]  # (L-1, V) z column of token j's rank

    rr, cc, vv, lo, hi = [], [], [], [], []
    row = row0

    def add(cols: list[np.ndarray], vals: list[float], low: float, high: float) -> None:
        nonlocal row
        k = cols[0].size
        rows = row + np.arange(k)
        for col, val in zip(cols, vals, strict=True):
            rr.append(rows)
            cc.append(col.ravel())
            vv.append(np.full(k, val))
        lo.append(np.full(k, low))
        hi.append(np.full(k, high))
        row += k

    add([z[:, :-1].ravel(), z[:, 1:].ravel()], [1.0, -1.0], 0.0, np.inf)  # z monotone over ranks
    add([x.ravel(), zj.ravel()], [1.0, -1.0], -np.inf, 0.0)  # x <= z
    add([x[0], zj[0]], [1.0, -1.0], 0.0, np.inf)  # layer 1: x = z (all alive)
    if m > 1:
        add([x[1:].ravel(), x[:-1].ravel()], [1.0, -1.0], -np.inf, 0.0)  # nesting
        add([x[1:].ravel(), x[:-1].ravel(), zj[1:].ravel()], [1.0, -1.0, -1.0], -1.0, np.inf)  # x >= prev AND z
    # at least min_keep per layer
    rows = row + np.repeat(np.arange(m), v)
    rr.append(rows)
    cc.append(x.ravel())
    vv.append(np.ones(nx))
    lo.append(np.full(m, float(min_keep)))
    hi.append(np.full(m, np.inf))
    row += m
    return cost, offset, x, (rr, cc, vv, lo, hi), row


def _token_program(metrics: Sequence[np.ndarray], losses: np.ndarray, budget: int, min_keep: int, joint: bool):
    """Exact token model for one sample (``joint=False``, one metric) or S samples sharing r (joint)."""
    v, n_layers = np.asarray(metrics[0]).shape
    m = n_layers - 1
    per = 2 * m * v
    s = len(metrics)
    n_r = m if joint else 0
    n = s * per + n_r
    cost = np.zeros(n)
    offset = 0.0
    rr, cc, vv, lo, hi = [], [], [], [], []
    row = 0
    xs = []
    for k, (metric, ell) in enumerate(zip(metrics, losses, strict=True)):
        c, off, x, (r1, c1, v1, l1, h1), row = _token_block(metric, ell, min_keep, k * per, row)
        cost[k * per : (k + 1) * per] = c
        offset += off
        rr += r1
        cc += c1
        vv += v1
        lo += l1
        hi += h1
        xs.append(x)
    if joint:
        rcols = s * per + np.arange(m)
        for x in xs:  # sum_j x[i, j] - r_i = 0
            rows = row + np.repeat(np.arange(m), v)
            rr += [rows, row + np.arange(m)]
            cc += [x.ravel(), rcols]
            vv += [np.ones(m * v), -np.ones(m)]
            lo.append(np.zeros(m))
            hi.append(np.zeros(m))
            row += m
        rr.append(np.full(m, row))
        cc.append(rcols)
        vv.append(np.ones(m))
    else:
        rr.append(np.full(m * v, row))
        cc.append(xs[0].ravel())
        vv.append(np.ones(m * v))
    lo.append(np.array([float(budget)]))
    hi.append(np.array([float(budget)]))
    row += 1
    matrix = sp.csr_matrix((np.concatenate(vv), (np.concatenate(rr), np.concatenate(cc))), shape=(row, n))
    col_lo = np.zeros(n)
    col_hi = np.ones(n)
    integer = np.zeros(n, dtype=bool)
    for x in xs:
        integer[x.ravel()] = True
    if joint:
        col_hi[s * per :] = v
        integer[s * per :] = True
    return cost, matrix, np.concatenate(lo), np.concatenate(hi), col_lo, col_hi, integer, offset, xs


# ------------------------------------------------------------------------------------------ estimator


def _project_schedule(target: np.ndarray, n_visual: int, budget: int, min_keep: int, time_limit: float) -> MilpResult:
    """Nearest (L1) admissible schedule to ``target`` (L-1,) for layers 1..L-1, solved with HiGHS.

    Columns: r (L-1, integer), d (L-1, continuous) with ``d >= |r - target|``.
    """
    m = target.shape[0]
    n = 2 * m
    cost = np.concatenate([np.zeros(m), np.ones(m)])
    rows, cols, vals, lo, hi = [], [], [], [], []
    row = 0
    for i in range(m):  # d_i - r_i >= -t_i ; d_i + r_i >= t_i
        rows += [row, row, row + 1, row + 1]
        cols += [m + i, i, m + i, i]
        vals += [1.0, -1.0, 1.0, 1.0]
        lo += [-float(target[i]), float(target[i])]
        hi += [np.inf, np.inf]
        row += 2
    for i in range(1, m):  # r_{i-1} - r_i >= 0
        rows += [row, row]
        cols += [i - 1, i]
        vals += [1.0, -1.0]
        lo.append(0.0)
        hi.append(np.inf)
        row += 1
    rows += [row] * m
    cols += list(range(m))
    vals += [1.0] * m
    lo.append(float(budget))
    hi.append(float(budget))
    row += 1
    matrix = sp.csr_matrix((vals, (rows, cols)), shape=(row, n))
    col_lo = np.concatenate([np.full(m, float(min_keep)), np.zeros(m)])
    col_hi = np.concatenate([np.full(m, float(n_visual)), np.full(m, np.inf)])
    integer = np.concatenate([np.ones(m, bool), np.zeros(m, bool)])
    return solve_milp(cost, matrix, np.asarray(lo), np.asarray(hi), col_lo, col_hi, integer, time_limit=time_limit)


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _from_num(x: Any) -> float:
    return float("nan") if x is None else float(x)


class UTPSolver:
    """Layer-wise retention schedule for one compression ratio (UTP's UTR), solved with HiGHS.

    Parameters
    ----------
    ratio : float
        Compression ratio c >= 1.
    formulation : {"compact", "pwl", "tokens"}
        See the module docstring and docs/utp.md. Default ``"compact"``: the proven optimum of the compact
        tables by :func:`compact_optimum` (exact dynamic program, no MILP).
    levels : int or None
        Keep levels (breakpoints) of the ``"pwl"`` formulation (default 33, chosen so that L=32, V=576
        solves in under a second here; 65 takes 1-3.5 s; None: every level, i.e. ``"compact"``). Ignored
        by the other formulations.
    mode : {"joint", "per_sample"}
        One program over all samples with a shared schedule, or one per sample then aggregation.
    min_keep : int
        Tokens every layer keeps at least.
    time_limit : float
        Seconds per HiGHS solve.
    mip_rel_gap : float
        Relative gap at which HiGHS may stop (0: prove optimality).
    threads : int or None
        HiGHS threads.
    evaluate : bool
        Also score the schedule under the other models (``objective_compact_``, ``objective_progressive_``).
    token_bound : "auto" or bool
        Also solve UTP's token-level program (exact for progressive top-k, HiGHS, at most
        :data:`TOKEN_BOUND_SECONDS`) as a reference for the chosen schedule's progressive loss (joint mode, not for
        ``"tokens"`` itself); ``"auto"``: only when S (L-1) V <= :data:`TOKEN_BOUND_MAX`.

    Attributes
    ----------
    schedule_ : list of int or None
        (L,) kept tokens per layer, ``schedule_[0] = V``; None when no solve produced a schedule within budget.
    n_visual_, n_layers_, budget_ : int
    objective_ : float
        Summed model loss of ``schedule_`` over the samples used (the solver's objective for ``joint``;
        for ``per_sample`` the summed loss of the aggregated schedule under the same formulation).
    objective_compact_ : float
        The same schedule's summed loss under the exact compact tables (NaN unless ``evaluate``).
    objective_progressive_ : float
        The same schedule's summed loss under progressive top-k pruning, UTP's model
        (:func:`simulate_loss`; NaN unless ``evaluate``).
    levels_ : list of int or None
        Breakpoints used by ``"pwl"``/``"compact"`` (last solve; None for ``"tokens"``).
    status_ : str
        ``"optimal"``, ``"time_limit"``, ``"infeasible"``, ... (worst over the solves made).
    gap_ : float
        Relative MIP gap (largest over the solves made).
    solve_seconds_ : float
        Wall time of all HiGHS runs.
    n_samples_ : int
        Samples used.
    per_sample_ : list of list of int or None
        (S, L) per-sample optimal schedules (``per_sample`` mode only).
    objective_tokens_ : float
        Best progressive loss the token-level program found (its optimum when ``tokens_status_ == "optimal"``),
        NaN when it was not run.
    tokens_bound_ : float
        HiGHS's lower bound on the progressive loss of ANY schedule (the token-level optimum when proven), NaN
        when not run.
    tokens_status_ : str or None
        Status of that solve.
    """

    def __init__(
        self,
        *,
        ratio: float,
        formulation: str = "compact",
        levels: int | None = 33,
        mode: str = "joint",
        min_keep: int = 1,
        time_limit: float = 60.0,
        mip_rel_gap: float = 0.0,
        threads: int | None = None,
        evaluate: bool = True,
        token_bound: bool | str = "auto",
    ) -> None:
        self.ratio = ratio
        self.formulation = formulation
        self.levels = levels
        self.evaluate = evaluate
        self.mode = mode
        self.min_keep = min_keep
        self.time_limit = time_limit
        self.mip_rel_gap = mip_rel_gap
        self.threads = threads
        self.token_bound = token_bound

    # -- fitting

    def _validate(self, metrics: Sequence[np.ndarray], losses: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        if self.formulation not in FORMULATIONS:
            raise PosbiasError(f"formulation {self.formulation!r} is unknown; use one of {', '.join(FORMULATIONS)}")
        if self.mode not in MODES:
            raise PosbiasError(f"mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, (int, np.integer)) or self.min_keep < 0:
            raise PosbiasError(f"min_keep={self.min_keep!r} must be an int >= 0")
        if self.levels is not None and (
            isinstance(self.levels, bool) or not isinstance(self.levels, (int, np.integer)) or self.levels < 2
        ):
            raise PosbiasError(f"levels={self.levels!r} must be an int >= 2 or None (every keep level)")
        mets = [np.asarray(m, dtype=np.float64) for m in metrics]  # each (V, L)
        ells = np.asarray(losses, dtype=np.float64)  # (S, L)
        if not mets:
            raise PosbiasError("no samples to solve over; profile samples (with utr_loss) first")
        if ells.ndim != 2 or ells.shape[0] != len(mets):
            raise PosbiasError(f"losses have shape {ells.shape}; expected (S, L) with S={len(mets)} metrics")
        shapes = {m.shape for m in mets}
        if len(shapes) != 1 or next(iter(shapes))[1] != ells.shape[1]:
            raise PosbiasError(
                f"metric shapes {sorted(shapes)} differ or disagree with losses {ells.shape}; "
                "pass samples with one visual-token count (see select_samples)"
            )
        for k, (m, ell) in enumerate(zip(mets, ells, strict=True)):
            if not (np.isfinite(m).all() and np.isfinite(ell[1:]).all()) or (m < 0).any():
                raise PosbiasError(f"sample {k} has non-finite or negative attention/utr_loss; drop it")
        return mets, ells

    def _solve_one(self, mets: list[np.ndarray], ells: np.ndarray, budget: int, joint: bool,
                   tables: tuple[np.ndarray, float] | None = None) -> tuple[MilpResult, np.ndarray | None]:
        v, n_layers = mets[0].shape
        if self.formulation == "compact":
            f, const = summed_tables(mets, ells) if tables is None else tables
            t0 = time.perf_counter()
            tail, obj = compact_optimum(f, const, budget, min_keep=int(self.min_keep))
            self.levels_ = None
            res = MilpResult(status="optimal", objective=obj, gap=0.0, x=None, seconds=time.perf_counter() - t0)
            r = tail.astype(np.float64)
        elif self.formulation == "pwl":
            f, const = summed_tables(mets, ells) if tables is None else tables
            levels = self.levels
            points = keep_levels(f, int(self.min_keep), levels)
            self.levels_ = [int(x) for x in points]
            prog = _PwlProgram(f, const, budget, points)
            res = prog.solve(time_limit=self.time_limit, mip_rel_gap=self.mip_rel_gap, threads=self.threads)
            if res.x is None:
                return res, None
            r = np.round(res.x[prog.rcol])  # (L-1,)
        else:
            self.levels_ = None
            cost, matrix, lo, hi, clo, chi, integer, offset, xs = _token_program(
                mets, ells, budget, int(self.min_keep), joint
            )
            res = solve_milp(
                cost, matrix, lo, hi, clo, chi, integer, offset=offset, time_limit=self.time_limit,
                mip_rel_gap=self.mip_rel_gap, threads=self.threads,
            )
            if res.x is None:
                return res, None
            r = np.round(res.x[xs[0]]).sum(axis=1)  # (L-1,)
        sched = np.concatenate([[v], r]).astype(np.int64)  # (L,)
        try:
            check_schedule(sched, v, budget, min_keep=int(self.min_keep))
        except PosbiasError:
            return res, None  # never hand out a schedule that breaks the budget
        return res, sched

    def objective(self, metrics: Sequence[np.ndarray], losses: np.ndarray, schedule: Sequence[int],
                  formulation: str | None = None) -> float:
        """Summed loss of ``schedule`` over samples under a formulation's model.

        Parameters
        ----------
        metrics, losses
            As in :meth:`fit`.
        schedule : sequence of int
            (L,) schedule, ``schedule[0] = V``.
        formulation : {"pwl", "compact", "tokens"} or None
            Model to evaluate (None: this solver's). ``"tokens"`` is the exact progressive top-k loss
            (:func:`simulate_loss`), ``"compact"`` the per-layer tables, ``"pwl"`` their interpolation
            over the fitted :attr:`levels_` (or over :func:`keep_levels` of these samples when unfitted).
        """
        which = self.formulation if formulation is None else formulation
        ells = np.asarray(losses, dtype=np.float64)  # (S, L)
        tail = np.asarray(schedule[1:], dtype=np.int64)  # (L-1,)
        if which == "tokens":
            return float(sum(simulate_loss(m, e, schedule) for m, e in zip(metrics, ells, strict=True)))
        f, const = summed_tables(metrics, ells)
        if which == "compact":
            return const + float(f[np.arange(f.shape[0]), tail].sum())
        points = getattr(self, "levels_", None)
        if points is None:
            points = keep_levels(f, int(self.min_keep), self.levels)
        return const + float(pwl_cost(f, np.asarray(points), tail).sum())

    def fit(self, metrics: Sequence[np.ndarray], losses: np.ndarray) -> UTPSolver:
        """Solve for the schedule.

        Parameters
        ----------
        metrics : sequence of np.ndarray
            S arrays (V, L) of the ranking metric per sample (:func:`ranking_metric`).
        losses : np.ndarray
            (S, L) information loss per sample and layer (``/samples/utr_loss``; column 0 unused).

        Returns
        -------
        self
        """
        mets, ells = self._validate(metrics, losses)
        v, n_layers = mets[0].shape
        budget = retention_budget(v, n_layers, float(self.ratio), min_keep=int(self.min_keep))
        t0 = time.perf_counter()
        statuses: list[str] = []
        gaps: list[float] = []
        seconds = 0.0
        per_sample: list[list[int]] | None = None
        tables: tuple[np.ndarray, float] | None = None
        if self.mode == "joint":
            tables = None if self.formulation == "tokens" else summed_tables(mets, ells)
            res, sched = self._solve_one(mets, ells, budget, joint=True, tables=tables)
            statuses.append(res.status)
            gaps.append(res.gap)
            seconds += res.seconds
        else:
            per_sample = []
            for k in range(len(mets)):
                res, s_k = self._solve_one(mets[k : k + 1], ells[k : k + 1], budget, joint=False)
                statuses.append(res.status)
                gaps.append(res.gap)
                seconds += res.seconds
                if s_k is None:
                    per_sample = None
                    break
                per_sample.append(s_k.tolist())
            sched = None
            if per_sample is not None:
                mean = np.asarray(per_sample, dtype=np.float64)[:, 1:].mean(axis=0)  # (L-1,)
                proj = _project_schedule(mean, v, budget, int(self.min_keep), self.time_limit)
                seconds += proj.seconds
                if proj.x is not None:
                    r = np.round(proj.x[: n_layers - 1])
                    cand = np.concatenate([[v], r]).astype(np.int64)
                    try:
                        sched = check_schedule(cand, v, budget, min_keep=int(self.min_keep))
                    except PosbiasError:
                        sched = None
                if proj.status != "optimal":
                    statuses.append(proj.status)
        order = ["optimal", "time_limit"]
        worst = max(statuses, key=lambda s: order.index(s) if s in order else len(order))
        self.n_visual_ = int(v)
        self.n_layers_ = int(n_layers)
        self.budget_ = int(budget)
        self.n_samples_ = len(mets)
        self.status_ = worst
        finite_gaps = [g for g in gaps if np.isfinite(g)]
        self.gap_ = float(max(finite_gaps)) if len(finite_gaps) == len(gaps) else float("inf")
        self.solve_seconds_ = float(seconds)
        self.wall_seconds_ = float(time.perf_counter() - t0)
        self.per_sample_ = per_sample
        self.schedule_ = None if sched is None else [int(x) for x in sched]
        if tables is None and sched is not None:
            tables = summed_tables(mets, ells)
        if self.mode == "per_sample" and self.formulation == "pwl" and tables is not None:  # joint tables' levels
            self.levels_ = [int(x) for x in keep_levels(tables[0], int(self.min_keep), self.levels)]
        nan = float("nan")
        if sched is not None and tables is not None and self.formulation != "tokens":
            f, const = tables
            tail = np.asarray(sched[1:], dtype=np.int64)  # (L-1,)
            if self.formulation == "pwl":
                self.objective_ = const + float(pwl_cost(f, np.asarray(self.levels_), tail).sum())
            else:
                self.objective_ = const + float(f[np.arange(f.shape[0]), tail].sum())
        else:
            self.objective_ = nan if sched is None else float(self.objective(mets, ells, sched))
        self.objective_compact_ = nan
        self.objective_progressive_ = nan
        if sched is not None and self.evaluate:
            f, const = tables
            self.objective_compact_ = const + float(f[np.arange(f.shape[0]), np.asarray(sched[1:])].sum())
            self.objective_progressive_ = float(self.objective(mets, ells, sched, "tokens"))
        self.objective_tokens_ = nan
        self.tokens_bound_ = nan
        self.tokens_status_ = None
        size = len(mets) * (n_layers - 1) * v
        run_tokens = self.token_bound is True or (self.token_bound == "auto" and size <= TOKEN_BOUND_MAX)
        if run_tokens and self.formulation != "tokens" and self.mode == "joint":
            cost, matrix, lo, hi, clo, chi, integer, offset, _ = _token_program(
                mets, ells, budget, int(self.min_keep), True)
            res_t = solve_milp(cost, matrix, lo, hi, clo, chi, integer, offset=offset,
                               time_limit=min(float(self.time_limit), TOKEN_BOUND_SECONDS), threads=self.threads)
            self.tokens_status_ = res_t.status
            if res_t.x is not None:
                self.objective_tokens_ = float(res_t.objective)
                g = res_t.gap if np.isfinite(res_t.gap) else np.inf
                self.tokens_bound_ = float(res_t.objective - g * abs(res_t.objective)) if np.isfinite(g) else nan
        return self

    # -- serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON description: parameters and, when fitted, the schedule and solve report."""
        out: dict[str, Any] = {
            "ratio": float(self.ratio),
            "formulation": self.formulation,
            "levels": None if self.levels is None else int(self.levels),
            "mode": self.mode,
            "min_keep": int(self.min_keep),
            "time_limit": float(self.time_limit),
            "mip_rel_gap": float(self.mip_rel_gap),
        }
        if hasattr(self, "status_"):
            out.update(
                schedule=self.schedule_,
                n_visual=self.n_visual_,
                n_layers=self.n_layers_,
                budget=self.budget_,
                objective=_num(self.objective_),
                objective_compact=_num(self.objective_compact_),
                objective_progressive=_num(self.objective_progressive_),
                keep_levels=self.levels_,
                status=self.status_,
                gap=None if not np.isfinite(self.gap_) else float(self.gap_),
                solve_seconds=float(self.solve_seconds_),
                n_samples=int(self.n_samples_),
                objective_tokens=_num(getattr(self, "objective_tokens_", float("nan"))),
                tokens_bound=_num(getattr(self, "tokens_bound_", float("nan"))),
                tokens_status=getattr(self, "tokens_status_", None),
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UTPSolver:
        """Inverse of :meth:`to_dict`."""
        try:
            obj = cls(
                ratio=float(data["ratio"]),
                formulation=str(data.get("formulation", "compact")),
                levels=None if data.get("levels", 33) is None else int(data.get("levels", 33)),
                mode=str(data.get("mode", "joint")),
                min_keep=int(data.get("min_keep", 1)),
                time_limit=float(data.get("time_limit", 60.0)),
                mip_rel_gap=float(data.get("mip_rel_gap", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PosbiasError(f"UTP schedule entry {data!r} is malformed ({exc}); re-run profile-bias solve") from exc
        if "status" in data:
            obj.schedule_ = None if data.get("schedule") is None else [int(x) for x in data["schedule"]]
            obj.n_visual_ = int(data["n_visual"])
            obj.n_layers_ = int(data["n_layers"])
            obj.budget_ = int(data["budget"])
            obj.objective_ = _from_num(data.get("objective"))
            obj.objective_compact_ = _from_num(data.get("objective_compact"))
            obj.objective_progressive_ = _from_num(data.get("objective_progressive"))
            obj.levels_ = None if data.get("keep_levels") is None else [int(x) for x in data["keep_levels"]]
            obj.status_ = str(data["status"])
            obj.gap_ = float("inf") if data.get("gap") is None else float(data["gap"])
            obj.solve_seconds_ = float(data["solve_seconds"])
            obj.n_samples_ = int(data["n_samples"])
            obj.per_sample_ = None
            obj.objective_tokens_ = _from_num(data.get("objective_tokens"))
            obj.tokens_bound_ = _from_num(data.get("tokens_bound"))
            obj.tokens_status_ = data.get("tokens_status")
        return obj

