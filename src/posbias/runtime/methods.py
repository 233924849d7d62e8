"""Token-selection algorithms of the seeds, vectorised in torch (no numpy, no transformers).

Every function takes per-token tensors of one image (or one prompt) and returns int64 indices into them:

- :func:`topk_select`            plain top-k (FastV, PoRe, PBC scores), ascending indices;
- :func:`mmr_select`             PosPrune's Maximal Marginal Relevance (Eq. 7), greedy, pick order;
- :func:`soft_nms_select`        AdaptPrune's adaptive soft-NMS (Algorithm 1), pick order;
- :func:`arp_select`             PosPrune's Asymmetric Regional Pruning (ARP), ascending indices;
- :func:`gaussian_centre_weight` AdaptPrune's Gaussian centre correction weight over a grid.

Greedy loops run over the k picks (not over tokens); each pick is a handful of vector operations.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import functools
import gc
import heapq
import math
import threading
from collections.abc import Iterator
from typing import NamedTuple

import torch

from posbias.errors import PosbiasError
from posbias.kernels import gaussian_centre_weight  # AdaptPrune's centre weight: the shared kernel

__all__ = [
    "single_thread",
    "release_workspace",
    "topk_select",
    "minmax",
    "mmr_select",
    "soft_nms_select",
    "neighbour_table",
    "arp_quota",
    "arp_select",
    "gaussian_centre_weight",
]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, with Python's cyclic garbage collector paused, inside the block.

    The greedy selectors issue hundreds of tiny ops; on a loaded CPU each multi-threaded op waits for the
    thread pool (measured here: soft-NMS 7.7 ms on one thread vs 284 ms on two busy cores). They also build
    thousands of small tuples and lists (heaps, tabulated rows), which trigger collections that walk every
    object of the process (torch and transformers hold hundreds of thousands). The selectors create no
    reference cycles, so pausing the collector loses nothing; it is re-enabled (if it was on) on exit.
    """
    n = torch.get_num_threads()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if n == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)
    finally:
        if was_enabled:
            gc.enable()


#: this thread's scratch buffers, kept between selector calls (see :func:`_scratch`)
_WORKSPACE = threading.local()

#: largest scratch buffer kept between calls, in bytes; bigger ones are allocated per call
_WORKSPACE_MAX_BYTES = 64 << 20


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` from this thread's workspace, reused by later calls.

    A fresh buffer of a few MB costs a page fault per 4 KB on first touch whenever the allocator hands memory back
    to the OS between calls (glibc does so once the free top of the heap passes its trim threshold): measured here
    ~1.5 ms of a 4 ms soft-NMS call at N = 2304. Buffers up to ``_WORKSPACE_MAX_BYTES`` stay mapped per thread
    (a few MB at the demo sizes; :func:`release_workspace` frees them). The selectors are not re-entrant within a
    thread, and nothing they return is a view of a scratch buffer.
    """
    numel = math.prod(shape)
    cache = getattr(_WORKSPACE, "buffers", None)
    if cache is None:
        cache = _WORKSPACE.buffers = {}
    buf = cache.get((name, dtype))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in place both inside and outside inference mode
            buf = torch.empty(numel, dtype=dtype)
        if numel * buf.element_size() <= _WORKSPACE_MAX_BYTES:
            cache[(name, dtype)] = buf
    return buf[:numel].view(shape)


def release_workspace() -> None:
    """Free the scratch buffers the selectors keep for the calling thread (they are re-created on demand)."""
    _WORKSPACE.buffers = {}


def _check_k(k: int, n: int, what: str = "keep") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise PosbiasError(f"{what}={k!r} must be an int in 1..{n} (the number of candidate visual tokens)")
    return k


def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending; ties go to the lower index.

    Parameters
    ----------
    scores : torch.Tensor
        (N,) float scores.
    k : int
        1..N.

    Returns
    -------
    torch.Tensor
        (k,) int64 ascending.
    """
    _check_k(k, int(scores.shape[0]))
    order = torch.sort(-scores.double(), stable=True).indices  # (N,) best first, ties by index
    return torch.sort(order[:k]).values.to(torch.int64)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Rescale (N,) to [0, 1] (all zeros when constant), in float32."""
    x = x.float()
    lo, hi = x.min(), x.max()
    span = hi - lo
    if float(span) <= 0.0:
        return torch.zeros_like(x)
    return (x - lo) / span  # (N,) float32


def _mmr_select(
    relevance: torch.Tensor,
    features: torch.Tensor,
    k: int,
    *,
    lam: float = 0.9,
    normalize_relevance: bool = True,
) -> torch.Tensor:
    """Greedy Maximal Marginal Relevance (PosPrune, Eq. 7).

    ``MMR(i) = lam * Rel(i) - (1 - lam) * max_{j in S} cos(f_i, f_j)``; the first pick is the token of
    highest relevance, then the token of highest MMR among those not yet picked, until ``k`` are picked.

    Parameters
    ----------
    relevance : torch.Tensor
        (N,) relevance, e.g. PBC-corrected attention.
    features : torch.Tensor
        (N, D) token features (shallow decoder hidden states), any float dtype (scored in float32);
        L2-normalised here.
    k : int
        Tokens to pick, 1..N.
    lam : float
        Relevance weight in [0, 1] (seed: 0.9).
    normalize_relevance : bool
        Min-max rescale the relevance to [0, 1] first so that it is commensurate with cosine similarity
        (attention values are ~1e-3; without it the diversity term alone would decide).

    Returns
    -------
    torch.Tensor
        (k,) int64 CPU indices in pick order (sort them to restore sequence order). The picks are those of the
        dense greedy; two candidates whose scores agree to float32 rounding may come in either order.

    Raises
    ------
    PosbiasError
        ``k`` outside 1..N, ``lam`` outside [0, 1], features not (N, D), NaN or inf in relevance or features.
    """
    n = int(relevance.shape[0])
    _check_k(k, n)
    if not 0.0 <= float(lam) <= 1.0:
        raise PosbiasError(f"mmr_lambda={lam!r} must lie in [0, 1]; PosPrune uses 0.9")
    if features.ndim != 2 or features.shape[0] != n:
        raise PosbiasError(f"features have shape {tuple(features.shape)}; expected ({n}, D)")
    if not bool(torch.isfinite(relevance).all()):
        raise PosbiasError("MMR relevance must be finite (got NaN or inf); leave masked tokens out instead")
    rel = minmax(relevance) if normalize_relevance else relevance.float()  # (N,) float32
    lam = float(lam)
    c = 1.0 - lam
    base = lam * rel  # (N,) float32, the relevance term of every score
    first = int(torch.argmax(rel))  # ties: the lower index
    if k == 1:
        return torch.tensor([first], dtype=torch.int64)
    raw = features  # (N, D), any float dtype: chunks and the kept rows are converted to float32 as they are read
    # (real models hand over bfloat16 hidden states; a float32 copy of all of them would be N x D x 4 bytes)
    f0 = raw[first].float()  # (D,)
    f0 /= torch.linalg.vector_norm(f0).clamp_min(1e-12)
    # norms and products with the first pick of all rows, in chunks that stay in the L2 cache between the two ops
    # (the mat-vec reads memory slowly when cold; two whole passes measured ~15% slower here)
    norms, cos0 = torch.empty(n), torch.empty(n)  # (N,), (N,)
    for lo in range(0, n, _MMR_CHUNK):
        rows = raw[lo : lo + _MMR_CHUNK].float()  # (<= chunk, D) float32 (no copy when already float32)
        torch.linalg.vector_norm(rows, dim=-1, out=norms[lo : lo + _MMR_CHUNK])
        torch.mv(rows, f0, out=cos0[lo : lo + _MMR_CHUNK])
    norms.clamp_min_(1e-12)  # as F.normalize
    if not bool(torch.isfinite(norms).all()):  # a NaN or inf anywhere in a row makes its norm NaN or inf
        raise PosbiasError("MMR features must be finite (got NaN or inf in the hidden states)")
    cos0 /= norms  # (N,) cosine with the first pick
    if 0.0 < lam < 1.0:
        # exact pruning of the candidates: at any step the winner j scores at least as high as an unpicked token i
        # among the k most relevant (fewer than k are picked), and the first pick is among j's picks, so
        # lam * r_j - c * cos(j, first) >= lam * r_j - c * M_j >= lam * r_i - c * M_i >= lam * kth - c, i.e.
        # r_j >= kth - (c / lam) * (1 - cos(j, first)). Real features are similar (cosines ~0.6-0.99), so this keeps
        # ~10-20% of the tokens; the slack 1e-5 is far above float32 rounding of the scores.
        kth = float(torch.topk(rel, k).values[-1])
        keep = rel >= (kth - 1e-5) - (c / lam) * (1.0 - cos0)  # (N,) bool
    else:
        keep = torch.ones(n, dtype=torch.bool)
    keep[first] = False
    live = torch.nonzero(keep).squeeze(1)  # (L,) ascending: the tokens that can still be picked
    n_live, d = int(live.shape[0]), int(raw.shape[1])
    if n_live < k - 1:
        raise PosbiasError("internal: MMR candidate pruning kept fewer tokens than the budget")
    feats = _scratch("mmr_live", (n_live, d))  # (L, D) float32
    if raw.dtype == torch.float32:
        torch.index_select(raw, 0, live, out=feats)
    else:
        feats.copy_(torch.index_select(raw, 0, live))
    feats /= norms.index_select(0, live).unsqueeze(1)  # normalised as F.normalize
    base_live = base.index_select(0, live)  # (L,)
    # upper bounds of the scores after the first pick, padded by far more than float32 rounding of the cosines
    cos_live = cos0.index_select(0, live)  # (L,)
    stale = base_live - c * cos_live + 1e-5 * (c + base_live.abs())  # (L,)
    screen = float(cos_live.mean()) * 100.0 >= _MMR_SCREEN
    picked = _mmr_lazy(base_live, feats, stale, k, c, f0, screen)  # (k - 1,) positions in live
    return torch.cat([torch.tensor([first], dtype=torch.int64), live.index_select(0, picked)])


_VIEW_FORMATS = {torch.float32: "f", torch.float64: "d", torch.int64: "q"}


def _flat_view(t: torch.Tensor) -> memoryview:
    """Zero-copy flat view of a contiguous CPU tensor whose items read as Python numbers (as ``tolist``).

    ``tolist`` of a table costs ~0.1 ms per 10,000 items while the greedy loops read only a few of them. The view
    does not own the memory: the caller must keep ``t`` alive while using it. float32, float64 and int64 only.
    """
    fmt = _VIEW_FORMATS.get(t.dtype)
    if fmt is None or t.device.type != "cpu" or not t.is_contiguous():
        raise PosbiasError("internal: _flat_view needs a contiguous float32, float64 or int64 CPU tensor")
    buf = (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    return memoryview(buf).cast("B").cast(fmt)


#: candidates a block of the lazy MMR brings up to date at once (measured best on N=2304, k=256)
_MMR_BLOCK = 96

#: a block first checks its candidates against the most recent 1/_MMR_STAGE of the picks (see :func:`_mmr_lazy`)
_MMR_STAGE = 4

#: rows per chunk of the first pass over the features (~0.6 MB at D = 576)
_MMR_CHUNK = 256

#: mean cosine (in percent) of the kept tokens with the first pick from which every bound is brought up to date
#: after the first block (see :func:`_mmr_lazy`)
_MMR_SCREEN = 50


def _mmr_lazy(base: torch.Tensor, feats: torch.Tensor, stale: torch.Tensor, k: int, c: float,
              f0: torch.Tensor, screen: bool = False) -> torch.Tensor:
    """Exact greedy MMR by lazy evaluation in blocks (the picks of the dense greedy, same tie-breaking).

    With ``f`` the L2-normalised features, the score of ``i`` after picks ``S`` is
    ``min_{p in S} fl(base_i - fl(c * cos(f_i, f_p)))`` (float32 rounding is monotone, so this is
    ``fl(base_i - c * max_p cos)`` of Eq. 7). It only shrinks as ``S`` grows, so a stale score is an upper bound.
    Each block takes the ``m`` tokens of highest stale score as candidates and ``U``, the best stale score outside
    the block. It brings their scores up to date with matmuls against the picks so far (a min with the stale score,
    so exact ones stay): first against the most recent quarter of the picks, which on real features already pushes
    most late candidates to ``U`` or below (they cannot be picked in this block: they go back with that tighter
    bound), then the survivors against the older picks. It gets the survivors' pairwise terms with one matmul and
    picks greedily among them in plain Python (a lazy max-heap) while the best exact score beats ``U`` (ties go to
    the lower index like ``argmax``). The scores of the candidates left are then brought up to date with one
    ``amin`` over the block's picked columns (``min`` is idempotent, so the columns a candidate already saw in the
    heap do not change it). A block that cannot pick is doubled.

    With ``screen`` (similar features, as real hidden states: the bounds after the first pick alone are then far
    too loose), every bound is brought up to date after the first block with one ``(L, t)`` matmul: later blocks
    refresh their candidates against the newer picks only, and ``U`` is tight, so blocks run longer (3 blocks
    instead of 3-7 on the demo photos at N=2304). Near-orthogonal features lose more to it than they gain.

    Parameters
    ----------
    base : torch.Tensor
        (L,) float32 ``lam * Rel`` of the tokens that can be picked (the first pick excluded), in token order.
    feats : torch.Tensor
        (L, D) float32 L2-normalised features of the same tokens.
    stale : torch.Tensor
        (L,) float32 upper bounds of their scores after the first pick. Updated in place.
    k, c
        Picks (the first included), ``1 - lam``.
    f0 : torch.Tensor
        (D,) normalised features of the first pick.
    screen : bool
        Bring every bound up to date after the first block.

    Returns
    -------
    torch.Tensor
        (k - 1,) int64 positions in the L tokens, in pick order.
    """
    n_live, d = int(feats.shape[0]), int(feats.shape[1])
    fpicks = _scratch("mmr_picks", (k, d))  # (k, D) normalised features of the picks
    fpicks[0] = f0
    picks: list[int] = []
    rem = n_live  # tokens not picked yet (finite stale scores)
    inf = float("-inf")
    size = _MMR_BLOCK
    t = 1
    floor = 0  # every stale score is exact as of the picks before fpicks[floor]
    while t < k:
        m = min(size, rem)
        top_vals, top_idx = torch.topk(stale, m + 1 if m < rem else m)  # stale scores, best first
        cand = top_idx[:m]  # (m,)
        vals = top_vals[:m]  # (m,) stale scores: exact for the candidates left by the last block, else bounds
        bound = float(top_vals[m]) if m < rem else inf  # best stale score outside the block
        fc = torch.index_select(feats, 0, cand, out=_scratch("mmr_block", (m, d)))  # (m, D)
        bc = torch.index_select(base, 0, cand).unsqueeze(1)  # (m, 1)
        # the same float32 operations as the dense greedy (no fused addmm, whose rounding differs)
        recent = (t - floor) // _MMR_STAGE if m < rem else 0
        if recent >= 8:
            vals = torch.minimum(vals, (bc - c * (fc @ fpicks[t - recent : t].T)).amin(dim=1))  # (m,) bounds
            stale.index_copy_(0, cand, vals)
            alive = torch.nonzero(vals > bound).squeeze(1)  # (m',) candidates that can still be picked here
            m = int(alive.shape[0])
            if m == 0:
                size *= 2  # every candidate fell to U or below: their bounds are tighter now; widen the block
                continue
            cand, fc, bc, vals = (x.index_select(0, alive) for x in (cand, fc, bc, vals))
            older = fpicks[floor : t - recent]
        else:
            older = fpicks[floor:t]
        if older.shape[0]:
            vals = torch.minimum(vals, (bc - c * (fc @ older.T)).amin(dim=1))  # (m,) exact as of all t picks
        sct = (bc - c * (fc @ fc.T)).contiguous()  # (m, m) score of candidate a after picking candidate b
        sc = _flat_view(sct)  # sc[a * m + b] == sct[a, b]; sct stays alive for the block
        # the lowest score another candidate's pick can leave candidate a with (a's own column is never read for
        # a): once a's score is at or below it, no pick of this block changes it and the scan below is skipped
        sct.diagonal().fill_(float("inf"))
        low = sct.amin(dim=1).tolist()
        heap = [(-v, g, a) for a, (v, g) in enumerate(zip(vals.tolist(), cand.tolist()))]
        heapq.heapify(heap)
        seen = [0] * m
        block: list[int] = []  # candidate positions picked in this block, in order
        while t < k and heap:
            neg, g, a = heap[0]
            if seen[a] < len(block) and low[a] < -neg:  # stale within the block: apply the picks it has not seen
                v, o = -neg, a * m
                for b in block[seen[a] :]:
                    if sc[o + b] < v:
                        v = sc[o + b]
                seen[a] = len(block)
                heapq.heapreplace(heap, (-v, g, a))
                continue
            if -neg <= bound:  # an outside token might score as high: refresh the block
                break
            heapq.heappop(heap)
            block.append(a)
            picks.append(g)
            t += 1
        if not block:
            size *= 2  # no progress: the stale bound outside ties or beats the block; widen it
            continue
        bt = torch.tensor(block, dtype=torch.int64)
        vals = torch.minimum(vals, sct.index_select(1, bt).amin(dim=1))  # (m,) exact as of all picks
        vals.index_fill_(0, bt, inf)
        stale.index_copy_(0, cand, vals)
        torch.index_select(fc, 0, bt, out=fpicks[t - len(block) : t])
        rem -= len(block)
        if screen and floor == 0 and t < k and rem > size:
            # every stale bound brought up to date with the picks so far: later blocks only need the newer picks
            torch.minimum(stale, base - c * (feats @ fpicks[:t].T).amax(dim=1), out=stale)  # (L, t) products
            floor = t
    return torch.tensor(picks, dtype=torch.int64)


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise PosbiasError(f"window={window!r} must be a positive odd int (e.g. 11 with radius 5, or 5 for a 5x5 square)")


#: a neighbourhood: the (row, col) offsets of its slots, row-major, point-symmetric (the centre in the middle)
Slots = tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=32)
def _slots(window: int, radius: float | None = None) -> Slots:
    """Offsets of the cells in a ``window x window`` square, or only those within Euclidean ``radius`` of the centre.

    ``radius=None``: the whole square; ``radius=5`` with ``window=11``: every cell at distance <= 5 (81 cells), the
    neighbourhood of AdaptPrune's released ``adapt_nms_2d`` (``distance_limit=5``).
    """
    _check_window(window)
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, (int, float))
                               or not math.isfinite(radius) or radius < 0):
        raise PosbiasError(f"radius={radius!r} must be a finite number >= 0 (the released AdaptPrune uses 5)")
    half = window // 2
    r2 = None if radius is None else float(radius) ** 2
    return tuple((dr, dc) for dr in range(-half, half + 1) for dc in range(-half, half + 1)
                 if r2 is None or dr * dr + dc * dc <= r2)


class _NmsLayout(NamedTuple):
    """Where each token's window lives in a flat cell layout (see :func:`_nms_layout`)."""

    rows: torch.Tensor  # (N,) int64 the grid coordinates the layout was built for
    cols: torch.Tensor  # (N,) int64
    cell: torch.Tensor | None  # (N,) int64 cell of each token; None: token i is cell i (a dense row-major grid)
    n_cells: int
    shifts: list[int]  # cell offset of each window slot, row-major (the centre is 0)
    where: torch.Tensor  # (N * W,) int64 item of the per-slot table (see _nms_tables) read for slot w of token i
    nbr: torch.Tensor  # (N * W,) int64 neighbour token of slot w of token i, N where there is none
    dots: torch.Tensor  # (P * cells,) int64 item of the tiled products (see _nms_cosines) of slot o at cell x


def _padded_cells(
    rows: torch.Tensor, cols: torch.Tensor, slots: Slots, groups: torch.Tensor | None
) -> tuple[torch.Tensor, int, list[int]]:
    """Padded cell of each token: every (sub-)image grid padded by half a window on each side, row-major.

    Returns ``flat`` ((N,) int64 cell of each token), the number of cells and the cell offset of each window slot
    (row-major, the centre slot 0). Padding by half a window means that the window of a token never leaves its own
    padded grid (no bounds checks, no crossing of sub-images).
    """
    n = int(rows.shape[0])
    g = torch.zeros(n, dtype=torch.int64) if groups is None else groups.to(torch.int64)  # (N,)
    half = _half(slots)
    n_g, n_r, n_c = int(g.max()) + 1, int(rows.max()) + 1 + 2 * half, int(cols.max()) + 1 + 2 * half
    flat = (g * n_r + rows.to(torch.int64) + half) * n_c + cols.to(torch.int64) + half  # (N,) padded cell
    if int(torch.bincount(flat, minlength=1).max()) > 1:
        raise PosbiasError("two visual tokens share a grid cell (same row, col and sub-image); each token needs its "
                           "own cell: check the rows/cols/groups of the layout")
    return flat, n_g * n_r * n_c, _window_offsets(n_c, slots)


def _half(slots: Slots) -> int:
    """Reach of a neighbourhood along either axis."""
    return max(max(abs(dr), abs(dc)) for dr, dc in slots)


def _window_offsets(width: int, slots: Slots) -> list[int]:
    """Cell offset of each slot of a neighbourhood, row-major (the centre 0), in rows ``width`` wide."""
    return [dr * width + dc for dr, dc in slots]


def neighbour_table(
    rows: torch.Tensor,
    cols: torch.Tensor,
    window: int,
    groups: torch.Tensor | None = None,
    radius: float | None = None,
) -> torch.Tensor:
    """Indices of each token's neighbours in a square window (or a disc) on its own (sub-)image grid.

    Parameters
    ----------
    rows, cols : torch.Tensor
        (N,) int64 grid coordinates.
    window : int
        Odd side length of the window (5: offsets -2..2 along each axis).
    groups : torch.Tensor, optional
        (N,) int64 sub-image id of each token; neighbours never cross groups.
    radius : float, optional
        Keep only the slots within this Euclidean distance of the centre (see :func:`_slots`).

    Returns
    -------
    torch.Tensor
        (N, W) int64 neighbour indices (W = window**2 without a radius), ``N`` (a dummy slot) where the window
        leaves the grid or the cell holds no token of the same group. The token itself is among its neighbours.
    """
    return _window_neighbours(*_padded_cells(rows, cols, _slots(window, radius), groups))  # (N, W) int64


def _window_neighbours(flat: torch.Tensor, n_cells: int, offsets: list[int]) -> torch.Tensor:
    """(N, W) int64 token at each window slot of each token (``N`` where the padded cell is empty)."""
    n = int(flat.shape[0])
    lookup = torch.full((n_cells,), n, dtype=torch.int64)  # (cells,) token of each cell, N = none
    lookup[flat] = torch.arange(n)
    return lookup[flat[:, None] + torch.tensor(offsets)[None, :]]


def _nms_layout(rows: torch.Tensor, cols: torch.Tensor, slots: Slots, groups: torch.Tensor | None,
                dense: bool) -> _NmsLayout:
    """The flat cell layout of the soft-NMS tables: the tokens' own order for a dense grid, else the padded grid.

    In a dense row-major grid token ``i`` is cell ``i`` and a window slot is a fixed index offset (a window that
    wraps around a row end reads a wrong cell, but that slot has no neighbour, so its factor is never applied).
    The table holds one row per slot after the centre (``P = (W - 1) / 2`` rows of ``cells`` items): slot ``s`` of
    the token at cell ``x`` is item ``x`` of its row, the mirrored slot ``-s`` is item ``x - s`` of the same row
    (``x - s >= 0`` whenever that neighbour exists; clamped to 0 where it does not, like the centre slot, whose
    factor only ever multiplies the pick itself).
    """
    n = int(rows.shape[0])
    n_w = len(slots)
    centre = n_w // 2
    flat, n_padded, offsets = _padded_cells(rows, cols, slots, groups)
    nbr = _window_neighbours(flat, n_padded, offsets).view(-1)  # (N * W,)
    if dense:
        cell, n_cells, at = None, n, torch.arange(n)
        shifts = _window_offsets(int(cols.max()) + 1, slots)
    else:
        cell, n_cells, at, shifts = flat, n_padded, flat, offsets
    base = [0] * n_w  # item of slot w for the token at cell x: base[w] + x
    for w in range(centre + 1, n_w):
        base[w] = (w - centre - 1) * n_cells
        base[n_w - 1 - w] = (w - centre - 1) * n_cells - shifts[w]  # the mirror reads cell x - s
    where = (torch.tensor(base)[None, :] + at[:, None]).clamp_min_(0)  # (N, W)
    dots = []  # per slot after the centre: item b * T * W' + t * W' + (t + q) of its run's (nb, T, W') products
    if centre:
        x = torch.arange(n_cells)
        t_n, start = _NMS_TILE, 0
        nb = -(-n_cells // t_n)
        for _, c in _slot_groups(shifts, slots):
            span = t_n + c - 1
            for q in range(c):
                dots.append(start + x * span + x % t_n + q)
            start += nb * t_n * span
    dots_t = torch.cat(dots) if dots else torch.zeros(0, dtype=torch.int64)
    return _NmsLayout(rows, cols, cell, n_cells, shifts, where.view(-1), nbr, dots_t)


@functools.lru_cache(maxsize=8)
def _dense_layout(n_rows: int, n_cols: int, slots: Slots) -> _NmsLayout:
    """Cached layout of a dense row-major ``n_rows x n_cols`` grid (the common single-image case).

    About 0.5 KB per token for a 5 x 5 window (1.2 MB at 48 x 48), 1.6 KB for the radius-5 disc; the last 8 grid
    shapes are kept.
    """
    idx = torch.arange(n_rows * n_cols)
    return _nms_layout(idx // n_cols, idx % n_cols, slots, None, dense=True)


@functools.lru_cache(maxsize=16)
def _slot_spatial(slots: Slots, sigma_d: float) -> torch.Tensor:
    """(P, 1) float64 spatial decay ``exp(-d^2 / 2 sigma_d^2)`` of the slots after the centre."""
    d2 = [float(dr * dr + dc * dc) for dr, dc in slots]
    return torch.exp(-torch.tensor(d2[len(d2) // 2 + 1 :], dtype=torch.float64) / (2.0 * sigma_d**2))[:, None]


#: cells per tile of the soft-NMS cosine products (see :func:`_nms_cosines`)
_NMS_TILE = 4


def _slot_groups(shifts: list[int], slots: Slots) -> list[tuple[int, int]]:
    """(first offset, count) of each run of consecutive cell offsets among the slots after the centre.

    In row-major order the slots after the centre are the rest of the centre row, then each following row of the
    neighbourhood (a square: ``window`` consecutive offsets per row; a disc: fewer towards its edge), consecutive in a
    layout whose rows are at least a window wide.
    """
    centre = len(slots) // 2
    runs: list[tuple[int, int]] = []
    last_row = None
    for w in range(centre + 1, len(slots)):
        if slots[w][0] != last_row:
            runs.append((shifts[w], 0))
            last_row = slots[w][0]
        runs[-1] = (runs[-1][0], runs[-1][1] + 1)
    return runs


def _nms_cosines(kp: torch.Tensor, lay: _NmsLayout, m: int, slots: Slots) -> torch.Tensor:
    """(P, cells) float32 ``kp[x] . kp[x + s_o]`` for the slots after the centre, by tiled batched matmuls.

    The cells are cut into tiles of ``T = _NMS_TILE`` consecutive cells; for a run of ``c`` consecutive offsets
    starting at ``s``, tile ``b`` needs the ``T + c - 1`` consecutive cells from ``b * T + s`` on, an overlapping
    strided view of ``kp`` (no copy). One ``bmm`` per run (3 for a 5 x 5 window) computes every product the tiles
    need, about twice the useful ones, at matmul speed: far faster than per-slot mul + sum passes for the wide keys
    of 7B models (D = 512-4096), and about as fast at D = 192. The wanted diagonals are then read with one gather
    (its index is part of the cached layout).
    """
    t_n = _NMS_TILE
    nb = -(-m // t_n)
    d = int(kp.shape[1])
    heads = kp[: nb * t_n].view(nb, t_n, d)  # (nb, T, D)
    runs = _slot_groups(lay.shifts, slots)
    sizes = [nb * t_n * (t_n + c - 1) for _, c in runs]
    out = _scratch("nms_dots", (sum(sizes),))
    pos = 0
    for (s, c), size in zip(runs, sizes):
        span = kp.as_strided((nb, t_n + c - 1, d), (t_n * d, d, 1), kp.storage_offset() + s * d)
        torch.bmm(heads, span.transpose(1, 2), out=out[pos : pos + size].view(nb, t_n, t_n + c - 1))
        pos += size
    return out[lay.dots].view(-1, m)


def _nms_tables(
    rows: torch.Tensor,
    cols: torch.Tensor,
    keys: torch.Tensor,
    slots: Slots,
    sigma_d: float,
    sigma_s: float,
    groups: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS decay factors and neighbours of every token's window: (N * W) float64 and (N * W) int64.

    Slot ``w`` of token ``i`` is item ``i * W + w`` (row-major window, the centre is the token itself); its
    neighbour is ``N`` where the window leaves the (sub-)image or the cell is empty. Every factor is tabulated up
    front, so the greedy loop issues no tensor op per pick. cos and the spatial decay are symmetric, so only the
    ``P = (W - 1) / 2`` slots after the centre are computed (``E[o, x] = k(x) . k(x + s_o)``, tiled batched
    matmuls, :func:`_nms_cosines`); the slot ``-s_o`` of the token at cell ``x`` is slot ``s_o`` of cell
    ``x - s_o``. Dense single-image grids reuse a cached layout; sub-images, holes or another token
    order are copied into a padded grid whose empty cells hold zero keys.
    """
    n = int(rows.shape[0])
    rows, cols = rows.to(torch.int64), cols.to(torch.int64)
    lay = None
    if groups is None:
        n_r, n_c = int(rows.max()) + 1, int(cols.max()) + 1
        if n_r * n_c == n and n_c >= 2 * _half(slots) + 1:  # (a narrower row: slot offsets would not be ordered)
            cached = _dense_layout(n_r, n_c, slots)
            if torch.equal(rows, cached.rows) and torch.equal(cols, cached.cols):
                lay = cached
    if lay is None:
        lay = _nms_layout(rows, cols, slots, groups, dense=False)
    m, n_w = lay.n_cells, len(slots)
    centre, far = n_w // 2, lay.shifts[-1]
    if centre == 0:  # a 1 x 1 window: only the pick itself, which is never read again
        return torch.ones(n, dtype=torch.float64), lay.nbr
    d = int(keys.shape[1])
    keys = keys.float()
    rows_kp = -(-m // _NMS_TILE) * _NMS_TILE + far  # whole tiles of cells, then the reach of the last slot
    kp = _scratch("nms_keys", (rows_kp, d))  # L2-normalised key of each cell; zero rows past the last cell
    kp[m:].zero_()
    norms = torch.linalg.vector_norm(keys, dim=-1, keepdim=True).clamp_min_(1e-12)  # (N, 1) as F.normalize
    if lay.cell is None:
        torch.div(keys, norms, out=kp[:m])
    else:
        kp[:m].zero_()
        kp.index_copy_(0, lay.cell, keys / norms)
    e = _nms_cosines(kp, lay, m, slots)  # (P, cells) float32 cos of slot centre + 1 + o at cell x
    x = _scratch("nms_fac", (centre, m), torch.float64)
    x.copy_(e).sub_(1.0).square_().mul_(-1.0 / (2.0 * sigma_s**2)).exp_()  # exp(-(1 - cos)^2 / 2 sigma_s^2)
    x.mul_(_slot_spatial(slots, sigma_d)).neg_().add_(1.0)  # (P, cells) 1 - spatial * exp(.)
    fac = torch.index_select(x.view(-1), 0, lay.where, out=_scratch("nms_slots", (n * n_w,), torch.float64))
    return fac, lay.nbr  # (N * W,) float64 factor of slot w of token i at i * W + w, (N * W,) int64 neighbour


def _soft_nms_select(
    scores: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    sigma_d: float = 1.5,
    sigma_s: float = 0.05,
    window: int = 5,
    groups: torch.Tensor | None = None,
    radius: float | None = None,
) -> torch.Tensor:
    """AdaptPrune's adaptive soft-NMS (Algorithm 1 lines 4-14).

    Repeatedly pick the highest (already corrected) score; for each neighbour ``j`` of the pick ``i`` in a
    ``window x window`` square (with ``radius``: only those within that Euclidean grid distance, as the released
    ``adapt_nms_2d``'s ``distance_limit``) of the same sub-image, ``s_j *= 1 - exp(-d^2 / 2 sigma_d^2) *
    exp(-(1 - cos(key_i, key_j))^2 / 2 sigma_s^2)`` with ``d`` the grid distance.

    Parameters
    ----------
    scores : torch.Tensor
        (N,) finite scores after the Gaussian centre correction (non-negative for the decay to suppress).
    rows, cols : torch.Tensor
        (N,) int64 grid coordinates of the tokens.
    keys : torch.Tensor
        (N, D) key vectors of the tokens at the scoring layer.
    k : int
        Tokens to pick, 1..N.
    sigma_d, sigma_s : float
        Spatial and similarity decay widths (anchors: 1.5 and 0.05).
    window : int
        Odd side length of the suppression square (AdaptPrune's text: 5; 11 holds the released radius 5).
    groups : torch.Tensor, optional
        (N,) sub-image id; suppression never crosses sub-images.
    radius : float, optional
        Suppress only within this Euclidean distance (the released code: 5 with ``window=11``); None: the square.

    Returns
    -------
    torch.Tensor
        (k,) int64 CPU indices in pick order.
    """
    n = int(scores.shape[0])
    _check_k(k, n)
    if not (float(sigma_d) > 0 and float(sigma_s) > 0):
        raise PosbiasError(f"sigma_d={sigma_d!r} and sigma_s={sigma_s!r} must be > 0 (anchors: 1.5 and 0.05)")
    if keys.ndim != 2 or keys.shape[0] != n:
        raise PosbiasError(f"keys have shape {tuple(keys.shape)}; expected ({n}, D)")
    if not bool(torch.isfinite(scores).all()):
        raise PosbiasError("soft-NMS scores must be finite (got NaN or inf); mask tokens by leaving them out instead")
    slots = _slots(window, radius)
    fac_t, nbr_t = _nms_tables(rows, cols, keys, slots, float(sigma_d), float(sigma_s), groups)
    fac, nbr = _flat_view(fac_t), _flat_view(nbr_t)  # fac_t and nbr_t stay alive until the function returns
    n_w = len(slots)
    s64 = scores.double()  # (N,)
    cur = s64.tolist()  # current scores, decayed in place
    cur.append(0.0)  # the dummy neighbour N: decayed freely, never read
    picks: list[int] = []
    push, pop = heapq.heappush, heapq.heappop
    if min(cur) >= 0.0:
        # Exact argmax (ties to the lower index, as argmax) over a stream and a lazy max-heap. Decays only lower a
        # non-negative score, so a token's original score bounds its current one: tokens enter the heap of
        # (-score, index) in order of original score, only once one could tie or beat the heap's best. Heap keys
        # are upper bounds (an entry keeps its key when its token decays), so an entry that surfaces with its key
        # equal to its token's current score is the argmax; one that surfaces decayed is pushed back at its current
        # score. Only the tokens the stream reaches ever get an entry; each has at most one at a time.
        srt = torch.sort(s64.neg(), stable=True)  # best original score first, ties to the lower index
        negs, order = srt.values.tolist(), srt.indices.tolist()
        heap: list[tuple[float, int]] = []
        ptr = 0  # next position of `order` to enter the heap
        replace = heapq.heapreplace
        t = 0
        while t < k:
            if not heap or (ptr < n and negs[ptr] <= heap[0][0]):
                hi = bisect.bisect_right(negs, negs[ptr] if not heap else heap[0][0], ptr)
                for j in order[ptr:hi]:
                    push(heap, (-cur[j], j))
                ptr = hi
                continue
            neg, i = heap[0]
            v = cur[i]
            if -neg != v:  # decayed since pushed: back in at its current score
                replace(heap, (-v, i))
                continue
            pop(heap)
            picks.append(i)
            t += 1
            o = i * n_w
            for j, f in zip(nbr[o : o + n_w], fac[o : o + n_w]):  # picked tokens decay too: never read again
                cur[j] *= f
    else:
        # A decay raises a negative score towards 0: every token starts in the heap, and a neighbour whose score
        # moved up is pushed again at once (its old entry is no longer an upper bound; the stale one is skipped).
        heap = list(zip(s64.neg().tolist(), range(n)))
        heapq.heapify(heap)
        taken = [False] * (n + 1)
        taken[n] = True  # the dummy neighbour
        while len(picks) < k:
            neg, i = pop(heap)
            if taken[i]:
                continue
            v = cur[i]
            if -neg != v:
                if -neg > v:  # decayed since pushed: back in at its current score
                    push(heap, (-v, i))
                continue  # (else a newer entry with the raised score exists)
            taken[i] = True
            picks.append(i)
            o = i * n_w
            for j, f in zip(nbr[o : o + n_w], fac[o : o + n_w]):
                if not taken[j]:
                    old = cur[j]
                    cur[j] = new = old * f
                    if new > old:
                        push(heap, (-new, j))
    return torch.tensor(picks, dtype=torch.int64)


def arp_quota(
    rows: torch.Tensor,
    cols: torch.Tensor,
    grid: tuple[int, int],
    *,
    blocks: int = 6,
    centre_ratio: float = 0.25,
    edge_ratio: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block id of each token and tokens kept per block under ARP.

    The grid is cut into ``blocks x blocks`` regions (fewer along an axis shorter than ``2 * blocks``, so that
    a block spans at least 2 tokens a side); the
    outer ring is the edge, pruned at ``edge_ratio``, the rest the centre, pruned at ``centre_ratio``.
    A block keeps ``round(n_b * (1 - ratio))`` tokens, at least 1.

    Returns
    -------
    block : torch.Tensor
        (N,) int64 block id (row-major).
    quota : torch.Tensor
        (n_blocks,) int64 tokens kept per block.
    """
    for name, r in (("arp_centre_ratio", centre_ratio), ("arp_edge_ratio", edge_ratio)):
        if not 0.0 <= float(r) < 1.0:
            raise PosbiasError(f"{name}={r!r} must lie in [0, 1) (PosPrune uses 0.25 centre, 0.5 edge)")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise PosbiasError(f"arp_blocks={blocks!r} must be a positive int (PosPrune uses 6)")
    n_rows, n_cols = int(grid[0]), int(grid[1])
    br_n, bc_n = max(1, min(blocks, n_rows // 2)), max(1, min(blocks, n_cols // 2))  # blocks of >= 2 tokens a side
    br = (rows.to(torch.int64) * br_n) // n_rows  # (N,)
    bc = (cols.to(torch.int64) * bc_n) // n_cols  # (N,)
    block = br * bc_n + bc  # (N,)
    counts = torch.bincount(block, minlength=br_n * bc_n)  # (n_blocks,)
    idx = torch.arange(br_n * bc_n)
    b_r, b_c = idx // bc_n, idx % bc_n
    edge = (b_r == 0) | (b_r == br_n - 1) | (b_c == 0) | (b_c == bc_n - 1)  # (n_blocks,)
    if br_n <= 2 and bc_n <= 2:
        edge = torch.ones_like(edge)
    ratio = torch.where(edge, torch.tensor(float(edge_ratio)), torch.tensor(float(centre_ratio)))
    quota = torch.round(counts.double() * (1.0 - ratio.double())).to(torch.int64)
    quota = torch.where(counts > 0, quota.clamp(min=1), torch.zeros_like(quota))
    return block, quota


def arp_select(
    importance: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    grid: tuple[int, int],
    *,
    blocks: int = 6,
    centre_ratio: float = 0.25,
    edge_ratio: float = 0.5,
) -> torch.Tensor:
    """Asymmetric Regional Pruning (PosPrune): keep the most important tokens of each block.

    Parameters
    ----------
    importance : torch.Tensor
        (N,) vision importance ([CLS] attention for LLaVA, mean attention received for Qwen2.5-VL).
    rows, cols : torch.Tensor
        (N,) int64 grid coordinates.
    grid : tuple of int
        (rows, cols) of the grid.
    blocks, centre_ratio, edge_ratio
        See :func:`arp_quota` (seed: 6, 0.25, 0.5: 576 -> 352 tokens on LLaVA's 24x24 grid).

    Returns
    -------
    torch.Tensor
        (M,) int64 ascending indices of the kept tokens.
    """
    n = int(importance.shape[0])
    block, quota = arp_quota(rows, cols, grid, blocks=blocks, centre_ratio=centre_ratio, edge_ratio=edge_ratio)
    order = torch.sort(-importance.double(), stable=True).indices  # (N,) most important first
    order = order[torch.sort(block[order], stable=True).indices]  # (N,) grouped by block, importance desc
    b_sorted = block[order]  # (N,)
    starts = torch.cumsum(torch.bincount(b_sorted, minlength=quota.shape[0]), 0) - torch.bincount(
        b_sorted, minlength=quota.shape[0]
    )  # (n_blocks,) first slot of each block
    rank = torch.arange(n) - starts[b_sorted]  # (N,) rank within its block
    kept = order[rank < quota[b_sorted]]
    return torch.sort(kept).values.to(torch.int64)


def mmr_select(relevance: torch.Tensor, features: torch.Tensor, k: int, *, lam: float = 0.9,
               normalize_relevance: bool = True) -> torch.Tensor:
    # the greedy loops read tables through CPU memory views: inputs on another device are copied once. Indices are
    # not differentiable, and out= ops refuse tensors needing grad: inference mode (fewer per-op checks than
    # no_grad: MMR 4-8% faster here); the clone outside it returns a normal tensor
    with single_thread(), torch.inference_mode():
        picks = _mmr_select(relevance.cpu(), features.cpu(), k, lam=lam, normalize_relevance=normalize_relevance)
    return picks.clone()


def soft_nms_select(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, keys: torch.Tensor, k: int, *,
                    sigma_d: float = 1.5, sigma_s: float = 0.05, window: int = 5,
                    groups: torch.Tensor | None = None, radius: float | None = None) -> torch.Tensor:
    with single_thread(), torch.inference_mode():  # as mmr_select
        picks = _soft_nms_select(scores.cpu(), rows.cpu(), cols.cpu(), keys.cpu(), k, sigma_d=sigma_d,
                                 sigma_s=sigma_s, window=window, groups=None if groups is None else groups.cpu(),
                                 radius=radius)
    return picks.clone()


mmr_select.__doc__ = _mmr_select.__doc__
soft_nms_select.__doc__ = _soft_nms_select.__doc__
