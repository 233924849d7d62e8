"""The quantities that are measured on the fit side and used again on the apply side, computed once.

The profiler (:mod:`posbias.profiler.capture`, :mod:`posbias.profiler.signals`), the fitters and the
runtime pruner (:mod:`posbias.runtime`) all call these functions, so a calibration is applied to exactly
the quantity it was fitted on (``tests/test_kernel_parity.py`` checks the pruner's scoring row and vision
importance against the profile store's ``/tokens/attn`` and ``/tokens/vision_importance``).

- RoPE: :func:`rotate_half`, :func:`apply_rope`, :func:`mrope_axes`, :func:`rope_rotation`, :func:`uniform_position`,
  :func:`position_agnostic_scores` (UTP's position-agnostic row).
- The last prompt token's attention row: :func:`last_token_scores`, :func:`last_token_attention`
  (softmax over all keys, per head; the head mean is what ``/tokens/attn`` stores and what the pruner scores).
- Vision importance records: :func:`cls_attention_row` ([CLS] query row, head mean; LLaVA / PosPrune Eq. 2),
  :func:`attention_column_mean` (mean attention each patch receives; VisionZip's rule for towers without [CLS]),
  :func:`vision_record` (one module's record by the architecture's kind).
- AdaptPrune's Gaussian centre weight: :func:`centre_axis`, :func:`gaussian_centre_weight`.

torch is imported inside the functions that need it (the fitters import :func:`gaussian_centre_weight`
for numpy arrays and do not load torch); nothing here imports h5py, scipy or matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from posbias.errors import PosbiasError

__all__ = [
    "rotate_half",
    "apply_rope",
    "mrope_axes",
    "rope_rotation",
    "uniform_position",
    "position_agnostic_scores",
    "last_token_scores",
    "last_token_attention",
    "cls_attention_row",
    "attention_column_mean",
    "vision_record",
    "COLMEAN_BUDGET",
    "centre_axis",
    "gaussian_centre_weight",
]

#: float32 scores held at once by :func:`attention_column_mean` (32 MiB)
COLMEAN_BUDGET = 2**23


# ------------------------------------------------------------------------------------------------ RoPE


def rotate_half(x: Any) -> Any:
    """``cat(-x2, x1)`` over the last dimension (the RoPE convention of Llama / Qwen / CLIP-free towers)."""
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Any, cos: Any, sin: Any) -> Any:
    """``x cos + rotate_half(x) sin`` (cos, sin broadcast against x (..., D))."""
    return x * cos + rotate_half(x) * sin


def mrope_axes(sections: Sequence[int], n_freq: int, *, interleaved: bool = False) -> np.ndarray:
    """(D/2,) int64: which M-RoPE position axis (0 = t, 1 = h, 2 = w) each rotary frequency follows.

    Chunked (Qwen2-VL, Qwen2.5-VL): ``sections`` (t, h, w) sum to ``n_freq``; the first ``sections[0]``
    frequencies follow t, the next ``sections[1]`` h, the rest w. Interleaved (Qwen3-VL, as its rotary module
    recomposes them): frequency ``j`` follows h when ``j % 3 == 1`` and ``j < 3 * sections[1]``, w when
    ``j % 3 == 2`` and ``j < 3 * sections[2]``, t otherwise (``[24, 20, 20]`` of 64: 24 t, 20 h, 20 w).
    """
    sec = [int(s) for s in sections]
    if not interleaved:
        if sum(sec) != int(n_freq):
            raise ValueError(f"M-RoPE sections {sections} must sum to {n_freq} frequencies")
        return np.concatenate([np.full(s, i % len(sec), dtype=np.int64) for i, s in enumerate(sec)])
    if len(sec) != 3:
        raise ValueError(f"interleaved M-RoPE needs 3 sections (t, h, w), not {sections}")
    axes = np.zeros(int(n_freq), dtype=np.int64)  # (D/2,) t unless claimed below
    for axis in (1, 2):
        axes[np.arange(axis, min(3 * sec[axis], int(n_freq)), 3)] = axis
    return axes


def rope_rotation(delta: Any, inv_freq: Any, sections: Sequence[int] | None = None, *,
                  interleaved: bool = False) -> tuple[Any, Any]:
    """cos and sin of the RoPE rotation by position offsets ``delta`` (half-split layout, as ``rotate_half``).

    Parameters
    ----------
    delta : torch.Tensor
        (V, P) position offsets per token and axis (P = 1, or 3 for M-RoPE).
    inv_freq : torch.Tensor
        (D/2,) inverse frequencies.
    sections : sequence of int, optional
        M-RoPE sections (how many of the D/2 frequencies follow axis t, h, w); required when P = 3.
    interleaved : bool
        The sections' frequencies alternate t, h, w (Qwen3-VL) instead of following each other
        (:func:`mrope_axes`).

    Returns
    -------
    cos, sin : torch.Tensor
        (V, D) float32 each, laid out ``cat(f, f)`` over the head dimension like transformers' RoPE.
    """
    import torch

    delta = delta.to(torch.float64)  # (V, P)
    freq = inv_freq.to(device=delta.device, dtype=torch.float64)  # (D/2,)
    n_axes = delta.shape[1]
    if n_axes == 1:
        angles = delta[:, :1] * freq[None, :]  # (V, D/2)
    else:
        if sections is None:
            raise ValueError(f"M-RoPE sections are needed for {n_axes} position axes")
        axes = mrope_axes(sections, int(freq.shape[0]), interleaved=interleaved) % n_axes
        axis = torch.from_numpy(axes).to(delta.device)  # (D/2,) which position axis each frequency follows
        angles = delta[:, axis] * freq[None, :]  # (V, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (V, D)
    return angles.cos().float(), angles.sin().float()


def uniform_position(first: Any, last: Any) -> Any:
    """``p' = floor((p1 + p2) / 2 + 1/2)`` per RoPE axis (UTP).

    Parameters
    ----------
    first, last : array-like of int or torch.Tensor
        (P,) positions of the first and last visual token (P = 1, or 3 for M-RoPE t, h, w).

    Returns
    -------
    np.ndarray or torch.Tensor
        (P,) int64 (a torch input gives a torch output).
    """
    if hasattr(first, "dtype") and type(first).__module__.startswith("torch"):
        import torch

        return torch.div(first.long() + last.long() + 1, 2, rounding_mode="floor")  # (P,)
    p1 = np.asarray(first, dtype=np.int64)  # (P,)
    p2 = np.asarray(last, dtype=np.int64)  # (P,)
    return (p1 + p2 + 1) // 2  # (P,) == floor((p1 + p2) / 2 + 1/2) for integers


def position_agnostic_scores(
    scores: Any,
    q_last: Any,
    keys: Any,
    visual_index: Any,
    cos: Any,
    sin: Any,
    scaling: float,
    mask_row: Any = None,
) -> Any:
    """Last-token scores with every visual key rotated to the uniform position (UTP Eq. 2, before softmax).

    Parameters
    ----------
    scores : torch.Tensor
        (H, S) float32 ordinary scores of the last query (mask applied): text columns are kept.
    q_last : torch.Tensor
        (H, D) last query after RoPE (it keeps its own position).
    keys : torch.Tensor
        (H_kv, S, D) keys after RoPE; query head h uses key head ``h // (H / H_kv)`` (``repeat_kv``).
    visual_index : torch.Tensor
        (V,) int64 sequence positions of the visual tokens.
    cos, sin : torch.Tensor
        (V, D) rotation by ``p' - p_j`` per visual token (:func:`rope_rotation`).
    scaling : float
        Score scale.
    mask_row : torch.Tensor, optional
        (S,) float32 additive mask of the last row (0 / -inf), applied to the new visual scores too.

    Returns
    -------
    torch.Tensor
        (H, S) float32 scores; ``softmax(dim=-1)`` gives the position-agnostic row.
    """
    import torch

    n_heads, n_kv = q_last.shape[0], keys.shape[0]
    groups = n_heads // n_kv
    k_vis = keys.index_select(1, visual_index).float()  # (H_kv, V, D)
    k_pa = apply_rope(k_vis, cos, sin)  # (H_kv, V, D)
    q = q_last.float().reshape(n_kv, groups, -1)  # (H_kv, G, D)
    s_vis = torch.einsum("kgd,kvd->kgv", q, k_pa).reshape(n_heads, -1) * scaling  # (H, V)
    if mask_row is not None:
        s_vis = s_vis + mask_row.index_select(0, visual_index)[None, :]
    out = scores.clone()  # (H, S)
    out[:, visual_index] = s_vis
    return out


# --------------------------------------------------------------------------- last-token attention row


def last_token_scores(query: Any, key: Any, attention_mask: Any, scaling: float) -> tuple[Any, Any]:
    """Scaled, masked scores of the last query position over all keys, per head (before softmax).

    Parameters
    ----------
    query : torch.Tensor
        (B, H, Q, D) queries after RoPE (only the last position is used).
    key : torch.Tensor
        (B, H_kv, S, D) keys after RoPE; ``H % H_kv == 0`` (each KV head repeated as ``repeat_kv`` does).
    attention_mask : torch.Tensor or None
        (B, 1 or H, Q, >=S) boolean (True = attend) or additive float mask, or None (causal; the last row
        then sees every key).
    scaling : float
        Score scale.

    Returns
    -------
    scores : torch.Tensor
        (B, H, S) float32.
    mask_row : torch.Tensor or None
        (B, S) float32 additive mask of the last row as applied (head 0 of a per-head mask), or None.
    """
    import torch

    q_last = query[:, :, -1:, :].float()  # (B, H, 1, D)
    k = key.float()  # (B, H_kv, S, D)
    n_heads, n_kv = q_last.shape[1], k.shape[1]
    if n_heads != n_kv:
        if n_heads % n_kv:
            raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
        k = k.repeat_interleave(n_heads // n_kv, dim=1)  # (B, H, S, D), same order as repeat_kv
    n_keys = k.shape[2]
    scores = torch.matmul(q_last, k.transpose(-1, -2)) * scaling  # (B, H, 1, S)
    mask_row = None
    if attention_mask is not None:
        mask_last = attention_mask[..., -1:, :n_keys]  # (B, 1|H, 1, S)
        if mask_last.dtype == torch.bool:
            add = torch.zeros(mask_last.shape, dtype=torch.float32, device=scores.device)
            add = add.masked_fill(~mask_last, float("-inf"))  # (B, 1|H, 1, S)
        else:
            add = mask_last.float()
        scores = scores + add
        mask_row = add[:, 0, 0, :]  # (B, S)
    return scores[:, :, 0, :], mask_row  # (B, H, S) float32


def last_token_attention(query: Any, key: Any, attention_mask: Any, scaling: float) -> Any:
    """(B, H, S) float32 softmax row of the last query over all keys, per head (:func:`last_token_scores`).

    ``last_token_attention(...)[0].mean(0)[visual_index]`` is the row ``/tokens/attn`` stores for a layer
    and the row the pruner scores.
    """
    import torch

    scores, _ = last_token_scores(query, key, attention_mask, scaling)  # (B, H, S)
    return torch.softmax(scores, dim=-1)


# ---------------------------------------------------------------------------------- vision importance


def cls_attention_row(query: Any, key: Any, scaling: float) -> Any:
    """(N,) float32 head-mean attention of query 0 ([CLS]) over all N keys (PosPrune Eq. 2).

    Parameters
    ----------
    query : torch.Tensor
        (H, Q, D) queries (only query 0 is used).
    key : torch.Tensor
        (H, N, D) keys (one image, no mask).
    scaling : float
    """
    import torch

    probs = torch.softmax(torch.matmul(query[:, :1].float(), key.float().transpose(-1, -2)) * scaling, dim=-1)
    return probs[:, 0, :].mean(dim=0)  # (N,)


def attention_column_mean(query: Any, key: Any, scaling: float, *, budget: int = COLMEAN_BUDGET) -> Any:
    """Mean attention each key receives, over all queries and heads, without the full (N, N) map.

    ``out[j] = 1/(H N) sum_h sum_i softmax_j(q_hi . k_h * scaling)``: the query rows (the diagonal
    included, as the attention map has it) are processed in chunks of at most ``budget`` scores.

    Parameters
    ----------
    query, key : torch.Tensor
        (H, N, D) (one image, no mask: every query sees every key).
    scaling : float
        Score scale.
    budget : int
        Maximum number of float32 scores held at once.

    Returns
    -------
    torch.Tensor
        (N,) float32; sums to 1.
    """
    import torch

    n_heads, n, _ = query.shape
    k = key.float()  # (H, N, D)
    total = torch.zeros(n, dtype=torch.float32, device=query.device)  # (N,)
    step = max(1, int(budget) // max(1, n_heads * n))
    for lo in range(0, n, step):
        q = query[:, lo : lo + step].float()  # (H, c, D)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, dim=-1)  # (H, c, N)
        total += probs.sum(dim=(0, 1))
    return total / float(n_heads * n)  # (N,)


def vision_record(kind: str, query: Any, key: Any, scaling: float, bounds: list[int] | None = None) -> Any:
    """One module's (N,) vision-importance record from its queries and keys (H, N, D), as the profiler stores
    it and the pruner's ARP uses it.

    ``kind`` is the architecture's :attr:`~posbias.models.base.Architecture.vision_importance_kind`; each
    block of ``bounds`` (independent images or crops) gets its own record: its own column mean
    (``"colmean"``), or the row of its own first token, its [CLS] (``"cls"``, LLaVA-NeXT's crops).
    """
    import torch

    if kind == "cls":
        if not bounds or len(bounds) == 2:
            return cls_attention_row(query, key, scaling)  # (N,)
        return torch.cat([cls_attention_row(query[:, a:b], key[:, a:b], scaling)
                          for a, b in zip(bounds[:-1], bounds[1:]) if b > a])  # (N,) one row per block
    if kind == "colmean":
        n = int(key.shape[1])
        bounds = bounds or [0, n]
        if len(bounds) == 2:
            return attention_column_mean(query, key, scaling)  # (N,)
        out = torch.zeros(n, dtype=torch.float32, device=query.device)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                out[a:b] = attention_column_mean(query[:, a:b], key[:, a:b], scaling)
        return out
    raise PosbiasError(f"vision importance kind {kind!r} is unknown; expected 'cls' or 'colmean'")


# ------------------------------------------------------------------------------ Gaussian centre weight


def centre_axis(n: int, *, like: Any = None) -> Any:
    """Centred coordinates of one grid axis: ``linspace(-1, 1, n)`` (``[0]`` when n == 1).

    numpy float64 by default; torch float32 (torch's own linspace, as the pruner always used) when
    ``like`` is a torch tensor.
    """
    n = int(n)
    if like is not None and type(like).__module__.startswith("torch"):
        import torch

        return torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1)  # (n,) float32
    return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)  # (n,) float64


def gaussian_centre_weight(rows: Any, cols: Any, grid: tuple[int, int], sigma: float = 1.0) -> Any:
    """AdaptPrune's centre weight ``exp(-(u^2 + v^2) / (2 sigma^2))`` per token.

    ``u = linspace(-1, 1, grid_rows)[row]``, ``v = linspace(-1, 1, grid_cols)[col]`` (0 on a 1-long axis),
    so ``sigma = 1`` is the released code's sigma 12 over ``linspace(-12, 12, 24)``.

    Parameters
    ----------
    rows, cols : np.ndarray or torch.Tensor
        Integer grid coordinates of the tokens, any equal shape.
    grid : (int, int)
        (rows, cols) of the token grid (one tile).
    sigma : float
        Width in centred units (> 0).

    Returns
    -------
    np.ndarray or torch.Tensor
        Weights in (0, 1] of the shape of ``rows``: float32 torch for torch input (the pruner), float64
        numpy for numpy input (the fitter and the report).
    """
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise PosbiasError(f"gaussian sigma={sigma!r} must be a finite number > 0 (centred units; anchors: 1.0)")
    u_axis = centre_axis(grid[0], like=rows)  # (R,)
    v_axis = centre_axis(grid[1], like=rows)  # (C,)
    if type(rows).__module__.startswith("torch"):
        import torch

        u, v = u_axis[rows.to(torch.int64)], v_axis[cols.to(torch.int64)]
        return torch.exp(-(u * u + v * v) / (2.0 * float(sigma) ** 2))  # float32
    u, v = u_axis[np.asarray(rows, dtype=np.int64)], v_axis[np.asarray(cols, dtype=np.int64)]
    return np.exp(-(u**2 + v**2) / (2.0 * float(sigma) ** 2))  # float64
