"""Top-k selection of visual tokens from bias-corrected scores (torch only)."""

from __future__ import annotations

import torch

from posbias.artifacts.calibration import Calibration
from posbias.errors import PosbiasError
from posbias.runtime.scoring import _prepare, score_tokens

__all__ = ["select_tokens"]


def select_tokens(
    method: str,
    attn: torch.Tensor,
    calibration: Calibration | None,
    *,
    keep: int,
    n_visual: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the ``keep`` highest-scoring visual tokens, ascending.

    Parameters
    ----------
    method : {"fastv", "pore", "posprune-pbc"}
    attn : torch.Tensor
        (V,) or (B, V) last-token attention over visual tokens (see :func:`score_tokens`).
    calibration : Calibration or None
    keep : int
        Number of tokens to keep, 1..V.
    n_visual, positions
        As in :func:`score_tokens`.

    Returns
    -------
    torch.Tensor
        (keep,) or (B, keep) int64 indices into the last axis of ``attn``, sorted ascending (so kept
        tokens stay in their original order).
    """
    _prepare(method, attn, calibration, n_visual, positions)
    v = int(attn.shape[-1])
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= v:
        raise PosbiasError(f"keep={keep!r} must be an int in 1..{v} (the number of visual tokens)")
    scores = score_tokens(method, attn, calibration, n_visual=n_visual, positions=positions)  # like attn
    top = torch.topk(scores, keep, dim=-1, largest=True, sorted=False).indices  # (..., keep) int64
    return torch.sort(top, dim=-1).values.to(torch.int64)
