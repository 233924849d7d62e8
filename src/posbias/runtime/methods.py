"""Token-selection algorithms of the seeds, vectorised in torch (no numpy, no transformers).

Every function takes per-token tensors of one image (or one prompt) and returns int64 indices into them:

- :func:`topk_select`            plain top-k (FastV, PoRe, PBC scores), ascending indices;
- :func:`mmr_select`             PosPrune's Maximal Marginal Relevance (seed 000, Eq. 7), greedy, pick order;
- :func:`soft_nms_select`        AdaptPrune's adaptive soft-NMS (seed 004, Algorithm 1), pick order;
- :func:`arp_select`             PosPrune's Asymmetric Regional Pruning (seed 000, ARP), ascending indices;
- :func:`gaussian_centre_weight` AdaptPrune's Gaussian centre correction weight over a grid.

Greedy loops run over the k picks (not over tokens); each pick is a handful of vector operations.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import gc
import heapq
import math
from collections.abc import Iterator

import torch

from posbias.errors import PosbiasError

__all__ = [
    "single_thread",
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
    """Greedy Maximal Marginal Relevance (PosPrune, seed 000 Eq. 7).

    ``MMR(i) = lam * Rel(i) - (1 - lam) * max_{j in S} cos(f_i, f_j)``; the first pick is the token of
    highest relevance, then the token of highest MMR among those not yet picked, until ``k`` are picked.

    Parameters
    ----------
    relevance : torch.Tensor
        (N,) relevance, e.g. PBC-corrected attention.
    features : torch.Tensor
        (N, D) token features (shallow decoder hidden states); L2-normalised here.
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
        (k,) int64 indices in pick order (sort them to restore sequence order).
    """
    n = int(relevance.shape[0])
    _check_k(k, n)
    if not 0.0 <= float(lam) <= 1.0:
        raise PosbiasError(f"mmr_lambda={lam!r} must lie in [0, 1]; the seed uses 0.9")
    if features.ndim != 2 or features.shape[0] != n:
        raise PosbiasError(f"features have shape {tuple(features.shape)}; expected ({n}, D)")
    rel = minmax(relevance) if normalize_relevance else relevance.float()  # (N,) float32
    lam = float(lam)
    c = 1.0 - lam
    base = lam * rel  # (N,) float32, the relevance term of every score
    first = int(torch.argmax(rel))  # ties: the lower index
    if k == 1:
        return torch.tensor([first], dtype=torch.int64)
    raw = features.float()  # (N, D)
    # norms of all rows: one pass over (N, D) with an (N,) output; gathering the pool first allocates (P, D)
    # (page faults on every call, measured slower here)
    norms = torch.linalg.vector_norm(raw, dim=-1).clamp_min(1e-12)  # (N,) as F.normalize
    f0 = raw[first] / norms[first]  # (D,)
    # upper bounds of the scores after the first pick, padded by far more than float32 rounding of the cosines
    stale = base - c * ((raw @ f0) / norms) + 1e-5 * (c + base.abs())  # (N,)
    if 0.0 < lam < 1.0:
        # exact pruning of the candidates: a winner j at any step beats the most relevant unpicked token i,
        # so lam * (r_i - r_j) <= (1 - lam) * (cos_i - cos_j) <= 2 (1 - lam), and r_i >= the k-th largest r
        kth = torch.topk(rel, k).values[-1]
        stale = torch.where(rel >= kth - 2.0 * c / lam - 1e-6, stale, torch.tensor(float("-inf")))
    stale[first] = float("-inf")
    return _mmr_lazy(base, raw, norms, stale, k, c, first)


def _float_view(t: torch.Tensor) -> memoryview:
    """Zero-copy flat view of a contiguous float32 CPU tensor whose items read as Python floats (as ``tolist``).

    ``tolist`` of an (m, m) block costs ~0.14 ms at m = 96 while the greedy loop reads only a few of its entries.
    The view does not own the memory: the caller must keep ``t`` alive (and unchanged) while using it.
    """
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise PosbiasError("internal: _float_view needs a contiguous float32 CPU tensor")
    buf = (ctypes.c_float * t.numel()).from_address(t.data_ptr())
    return memoryview(buf).cast("B").cast("f")


#: candidates a block of the lazy MMR brings up to date at once (measured best on N=2304, k=256)
_MMR_BLOCK = 96


def _mmr_lazy(
    base: torch.Tensor, raw: torch.Tensor, norms: torch.Tensor, stale: torch.Tensor, k: int, c: float, first: int
) -> torch.Tensor:
    """Exact greedy MMR by lazy evaluation in blocks (the picks of the dense greedy, same tie-breaking).

    With ``f`` the L2-normalised features, the score of ``i`` after picks ``S`` is
    ``min_{p in S} fl(base_i - fl(c * cos(f_i, f_p)))`` (float32 rounding is monotone, so this is
    ``fl(base_i - c * max_p cos)`` of Eq. 7). It only shrinks as ``S`` grows, so a stale score is an upper bound.
    Each block takes the ``m`` tokens of highest stale score as candidates, brings their scores up to date with one
    matmul against the picks (only those not already exact as of all picks), gets their pairwise terms with one
    ``m x m`` matmul, and picks greedily among them in plain Python (a lazy max-heap) while the best exact score
    beats ``U``, the best stale score outside the block (ties go to the lower index like ``argmax``). The scores of
    the candidates left are then brought up to date with one ``amin`` over the block's picked columns (``min`` is
    idempotent, so the columns a candidate already saw in the heap do not change it). A block that cannot pick is
    doubled.

    Parameters
    ----------
    base : torch.Tensor
        (N,) float32 ``lam * Rel``.
    raw : torch.Tensor
        (N, D) float32 features, normalised as they are gathered: ``raw[i] / norms[i]`` is ``F.normalize``.
    norms : torch.Tensor
        (N,) float32 row norms clamped at 1e-12.
    stale : torch.Tensor
        (N,) float32 upper bounds of the scores after the first pick; ``-inf`` for the first pick and for tokens
        that cannot win. Updated in place (to the exact scores of the candidates of each block).
    k, c, first
        Picks, ``1 - lam``, the first pick.

    Returns
    -------
    torch.Tensor
        (k,) int64 indices in pick order.
    """
    n, d = int(raw.shape[0]), int(raw.shape[1])
    fpicks = torch.empty(k, d, dtype=torch.float32)  # (k, D) normalised features of the picks
    fpicks[0] = raw[first] / norms[first]
    picks = [first]
    live = int(torch.isfinite(stale).sum())  # tokens that can still be picked
    if live < k - 1:
        raise PosbiasError("MMR candidate pruning kept fewer tokens than the budget (non-finite relevance?)")
    upto = torch.zeros(n, dtype=torch.int64)  # picks that ``stale`` of a token is exact for (0: only a bound)
    inf = float("-inf")
    size = _MMR_BLOCK
    t = 1
    while t < k:
        m = min(size, live)
        top = torch.topk(stale, m + 1 if m < live else m)  # stale scores, best first
        cand = top.indices[:m]  # (m,)
        vals = top.values[:m]  # (m,) exact for the candidates of ``upto == t``
        bound = float(top.values[m]) if m < live else inf  # best stale score outside the block
        fc = raw.index_select(0, cand) / norms[cand, None]  # (m, D) normalised (index_select: faster than [])
        bc = base[cand][:, None]  # (m, 1)
        sct = (bc - c * (fc @ fc.T)).contiguous()  # (m, m) score of candidate a after picking candidate b
        # candidates whose scores were only bounds become exact as of all t picks (the others already are); the
        # same float32 operations as the dense greedy (no fused addmm, whose rounding differs)
        vals = torch.where(upto[cand] != t, (bc - c * (fc @ fpicks[:t].T)).amin(dim=1), vals)
        sc = _float_view(sct)  # sc[a * m + b] == sct[a, b]; sct stays alive for the block
        heap = [(-v, g, a) for a, (v, g) in enumerate(zip(vals.tolist(), cand.tolist()))]
        heapq.heapify(heap)
        seen = [0] * m
        block: list[int] = []  # candidate positions picked in this block, in order
        while t < k and heap:
            neg, g, a = heap[0]
            if seen[a] < len(block):  # stale within the block: apply the picks it has not seen
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
        vals[bt] = inf
        stale[cand] = vals
        upto[cand] = t
        torch.index_select(fc, 0, bt, out=fpicks[t - len(block) : t])
        live -= len(block)
    return torch.tensor(picks, dtype=torch.int64)


def neighbour_table(
    rows: torch.Tensor,
    cols: torch.Tensor,
    window: int,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of each token's neighbours in a square window on its own (sub-)image grid.

    Parameters
    ----------
    rows, cols : torch.Tensor
        (N,) int64 grid coordinates.
    window : int
        Odd side length of the window (5: offsets -2..2 along each axis).
    groups : torch.Tensor, optional
        (N,) int64 sub-image id of each token; neighbours never cross groups.

    Returns
    -------
    torch.Tensor
        (N, window**2) int64 neighbour indices, ``N`` (a dummy slot) where the window leaves the grid or
        the cell holds no token of the same group. The token itself is among its neighbours.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise PosbiasError(f"window={window!r} must be a positive odd int (the seed uses 5)")
    n = int(rows.shape[0])
    g = torch.zeros(n, dtype=torch.int64) if groups is None else groups.to(torch.int64)  # (N,)
    half = window // 2
    n_g, n_r, n_c = int(g.max()) + 1, int(rows.max()) + 1 + 2 * half, int(cols.max()) + 1 + 2 * half
    flat = (g * n_r + rows.to(torch.int64) + half) * n_c + cols.to(torch.int64) + half  # (N,) padded cell
    lookup = torch.full((n_g * n_r * n_c,), n, dtype=torch.int64)  # padding by the half window: no bounds checks
    lookup[flat] = torch.arange(n)
    off = torch.arange(-half, half + 1)  # (w,)
    delta = off.repeat_interleave(window) * n_c + off.repeat(window)  # (w*w,) cell offsets, row-major
    return lookup[flat[:, None] + delta[None, :]]  # (N, w*w) int64


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
) -> torch.Tensor:
    """AdaptPrune's adaptive soft-NMS (seed 004, Algorithm 1 lines 4-14).

    Repeatedly pick the highest (already corrected) score; for each neighbour ``j`` of the pick ``i`` in a
    ``window x window`` square of the same sub-image, ``s_j *= 1 - exp(-d^2 / 2 sigma_d^2) *
    exp(-(1 - cos(key_i, key_j))^2 / 2 sigma_s^2)`` with ``d`` the grid distance.

    Parameters
    ----------
    scores : torch.Tensor
        (N,) scores after the Gaussian centre correction (non-negative for the decay to suppress).
    rows, cols : torch.Tensor
        (N,) int64 grid coordinates of the tokens.
    keys : torch.Tensor
        (N, D) key vectors of the tokens at the scoring layer.
    k : int
        Tokens to pick, 1..N.
    sigma_d, sigma_s : float
        Spatial and similarity decay widths (anchors: 1.5 and 0.05).
    window : int
        Odd side length of the suppression window (anchors: 5).
    groups : torch.Tensor, optional
        (N,) sub-image id; suppression never crosses sub-images.

    Returns
    -------
    torch.Tensor
        (k,) int64 indices in pick order.
    """
    n = int(scores.shape[0])
    _check_k(k, n)
    if not (float(sigma_d) > 0 and float(sigma_s) > 0):
        raise PosbiasError(f"sigma_d={sigma_d!r} and sigma_s={sigma_s!r} must be > 0 (anchors: 1.5 and 0.05)")
    if keys.ndim != 2 or keys.shape[0] != n:
        raise PosbiasError(f"keys have shape {tuple(keys.shape)}; expected ({n}, D)")
    nbr = neighbour_table(rows, cols, window, groups)  # (N, W), N = no neighbour
    kn = torch.zeros(n + 1, int(keys.shape[1]))  # (N + 1, D): row N, the dummy neighbour, stays zero
    torch.nn.functional.normalize(keys.float(), dim=-1, out=kn[:n])
    half = window // 2
    off = torch.arange(-half, half + 1, dtype=torch.float64)
    d2 = off.repeat_interleave(window) ** 2 + off.repeat(window) ** 2  # (W,)
    spatial = torch.exp(-d2 / (2.0 * float(sigma_d) ** 2))  # (W,) float64 distance decay per window slot
    inv_ss = 1.0 / (2.0 * float(sigma_s) ** 2)
    n_w = window * window
    s64 = scores.double()  # (N,)
    orig = s64.tolist()  # original scores
    # current scores, decayed in place; an array so that torch reads them without a copy (cur_t shares its memory)
    cur = array.array("d", orig)
    cur_t = torch.frombuffer(cur, dtype=torch.float64)  # (N,) view of `cur`
    order_l = torch.sort(-s64, stable=True).indices.tolist()  # best original score first
    # Exact argmax (ties to the lower index) over a stream and a lazy heap. Tokens enter the max-heap of
    # (-key, index) in `order_l` order, each only once the heap's best key is not above the next token's original
    # score; keys are upper bounds of the current scores: a decay lowers a non-negative score, so the entry keeps
    # its old key and is re-pushed with the current score when it surfaces, and a negative score (which a decay
    # raises towards 0) is pushed again at once. An entry that surfaces with its key equal to the token's current
    # score is therefore the argmax. Only the tokens the stream reaches (a few hundred) ever get an entry.
    heap: list[tuple[float, int]] = []
    ptr = 0  # next position of `order_l` to enter the heap
    # per tabulated token: its neighbour row (N = no neighbour) and the decay factors 1 - spatial * exp(-(1 - cos)^2
    # / (2 sigma_s^2)) of Algorithm 1 (float64 from float32 cosines), flat: row r is [r * W, (r + 1) * W). A pick
    # without a row triggers a chunk: the pick plus the untabulated tokens of highest *current* score (the likely
    # next picks). With similar keys (real models: neighbour cosines ~0.95-0.99) suppression sends the picks deep
    # into the original order, so chunks in original order would tabulate most of the grid.
    row_of: dict[int, int] = {}
    nb_flat: list[int] = []
    fac_flat: list[float] = []
    tabbed = torch.zeros(n, dtype=torch.bool)  # (N,) tokens with a row
    buf = torch.empty(_NMS_SUB * n_w, int(kn.shape[1]))  # (S*W, D) gather buffer, reused by every chunk
    neg_inf = float("-inf")
    ones_w = torch.ones(n_w, dtype=torch.float64)  # (W,)

    def tabulate(i: int) -> None:
        size = _NMS_CHUNK if row_of else k  # the first chunk: the k best scores
        extra = min(size - 1, n - len(row_of) - 1)  # untabulated tokens besides i
        tabbed[i] = True
        if extra > 0:
            cand = cur_t.masked_fill(tabbed, neg_inf)  # (N,) current scores of the untabulated
            it = torch.topk(cand, extra).indices  # (B - 1,)
            tabbed[it] = True
            it = torch.cat([torch.tensor([i]), it])  # (B,)
        else:
            it = torch.tensor([i])
        b_n = int(it.shape[0])
        nb = nbr.index_select(0, it)  # (B, W) neighbour indices, N = none (kn's zero row)
        q = kn.index_select(0, it)  # (B, D)
        cs = torch.empty(b_n, n_w)  # (B, W) cos(key_i, key_j), float32
        # in sub-chunks through one reused (S*W, D) buffer: a fresh (B, W, D) gather per chunk page-faults on every
        # call (measured ~10x slower), and a batched mat-vec (bmm) is ~5x slower than the product and sum
        for s0 in range(0, b_n, _NMS_SUB):
            s1 = min(b_n, s0 + _NMS_SUB)
            g = buf[: (s1 - s0) * n_w]  # ((s1-s0)*W, D)
            torch.index_select(kn, 0, nb[s0:s1].reshape(-1), out=g)
            g3 = g.view(s1 - s0, n_w, -1)  # (s1-s0, W, D)
            g3.mul_(q[s0:s1, None, :])
            torch.sum(g3, -1, out=cs[s0:s1])
        x = cs.double().sub_(1.0).square_().mul_(-inv_ss).exp_()  # (B, W) float64 exp(-(1 - cos)^2 / (2 sigma_s^2))
        fac = torch.addcmul(ones_w, spatial, x, value=-1.0)  # (B, W) 1 - spatial * exp(.)
        base = len(row_of)
        for r, i2 in enumerate(it.tolist()):
            row_of[i2] = (base + r) * n_w
        nb_flat.extend(nb.view(-1).tolist())
        fac_flat.extend(fac.view(-1).tolist())

    taken = [False] * (n + 1)
    taken[n] = True  # the dummy neighbour slot
    picks: list[int] = []
    push, pop = heapq.heappush, heapq.heappop
    non_negative = bool((s64 >= 0).all())  # then decays only lower scores: no re-push on a decay
    while len(picks) < k:
        while ptr < n:  # stream in every token whose original score could beat the heap's best
            j = order_l[ptr]
            if heap and (heap[0][0], heap[0][1]) < (-orig[j], j):
                break
            ptr += 1
            if not taken[j]:
                push(heap, (-cur[j], j))
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
        if i not in row_of:
            tabulate(i)
        o = row_of[i]
        if non_negative:
            for j, f in zip(nb_flat[o : o + n_w], fac_flat[o : o + n_w]):
                if not taken[j]:
                    cur[j] *= f
        else:
            for j, f in zip(nb_flat[o : o + n_w], fac_flat[o : o + n_w]):
                if not taken[j]:
                    old = cur[j]
                    cur[j] = new = old * f
                    if new > old:  # a negative score moved up: its entry is no longer an upper bound
                        push(heap, (-new, j))
    return torch.tensor(picks, dtype=torch.int64)


#: rows of a soft-NMS tabulation chunk gathered at once (the (S*W, D) buffer stays in cache)
_NMS_SUB = 32

#: tokens tabulated per soft-NMS chunk: the pick that needs a row plus the best current scores without one
_NMS_CHUNK = 32


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
            raise PosbiasError(f"{name}={r!r} must lie in [0, 1) (the seed uses 0.25 centre, 0.5 edge)")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise PosbiasError(f"arp_blocks={blocks!r} must be a positive int (the seed uses 6)")
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
    """Asymmetric Regional Pruning (PosPrune, seed 000): keep the most important tokens of each block.

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


def gaussian_centre_weight(
    rows: torch.Tensor,
    cols: torch.Tensor,
    grid: tuple[int, int],
    sigma: float = 1.0,
) -> torch.Tensor:
    """AdaptPrune's centre weight ``exp(-(u^2 + v^2) / (2 sigma^2))`` per token.

    ``u = linspace(-1, 1, rows)[row]``, ``v = linspace(-1, 1, cols)[col]`` (0 on a 1-long axis), so
    ``sigma = 1`` is the anchor's sigma 12 over ``linspace(-12, 12, 24)``.

    Returns
    -------
    torch.Tensor
        (N,) float32 weight in (0, 1].
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise PosbiasError(f"gaussian sigma={sigma!r} must be a finite number > 0 (centred units; anchors: 1.0)")
    n_rows, n_cols = int(grid[0]), int(grid[1])
    u_axis = torch.linspace(-1.0, 1.0, n_rows) if n_rows > 1 else torch.zeros(1)  # (R,)
    v_axis = torch.linspace(-1.0, 1.0, n_cols) if n_cols > 1 else torch.zeros(1)  # (C,)
    u, v = u_axis[rows.to(torch.int64)], v_axis[cols.to(torch.int64)]  # (N,), (N,)
    return torch.exp(-(u * u + v * v) / (2.0 * float(sigma) ** 2))  # (N,) float32


def mmr_select(relevance: torch.Tensor, features: torch.Tensor, k: int, *, lam: float = 0.9,
               normalize_relevance: bool = True) -> torch.Tensor:
    with single_thread():
        return _mmr_select(relevance, features, k, lam=lam, normalize_relevance=normalize_relevance)


def soft_nms_select(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, keys: torch.Tensor, k: int, *,
                    sigma_d: float = 1.5, sigma_s: float = 0.05, window: int = 5,
                    groups: torch.Tensor | None = None) -> torch.Tensor:
    with single_thread():
        return _soft_nms_select(scores, rows, cols, keys, k, sigma_d=sigma_d, sigma_s=sigma_s, window=window,
                                groups=groups)


mmr_select.__doc__ = _mmr_select.__doc__
soft_nms_select.__doc__ = _soft_nms_select.__doc__
