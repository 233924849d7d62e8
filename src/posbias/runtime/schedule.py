"""Apply a UTP retention schedule: progressive, nested top-k over decoder layers (torch only).

Layer 0 keeps all V visual tokens; layer i >= 1 keeps the ``schedule[i]`` tokens with the highest
layer-(i-1) score among those layer i-1 kept (ties: lower index first), so kept sets are nested.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["next_keep", "schedule_masks"]


def next_keep(alive: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices kept at the next layer.

    Parameters
    ----------
    alive : torch.Tensor
        (n,) int64 ascending indices of the visual tokens kept at the previous layer.
    scores : torch.Tensor
        (n,) float scores of those tokens at the previous layer (e.g. its last-token attention,
        position-agnostic in the first layers when configured).
    keep : int
        Tokens to keep, ``0 <= keep <= n``.

    Returns
    -------
    torch.Tensor
        (keep,) int64 ascending subset of ``alive``.
    """
    n = int(alive.shape[0])
    if not 0 <= int(keep) <= n or scores.shape != alive.shape:
        raise ValueError(f"keep={keep} must lie in [0, {n}] and scores must match alive {tuple(alive.shape)}")
    order = torch.sort(-scores.double(), stable=True).indices  # (n,) best first, ties by position
    return torch.sort(alive[order[: int(keep)]]).values  # (keep,)


def schedule_masks(scores: torch.Tensor, schedule: Sequence[int]) -> torch.Tensor:
    """(L, V) bool keep masks of a schedule given every layer's scores over all V tokens (offline use).

    Parameters
    ----------
    scores : torch.Tensor
        (V, L) per-layer scores; column i-1 ranks the tokens for layer i.
    schedule : sequence of int
        (L,) kept tokens per layer, non-increasing, ``schedule[0] == V``.
    """
    v, n_layers = scores.shape
    if len(schedule) != n_layers or int(schedule[0]) != v:
        raise ValueError(f"schedule of length {len(schedule)} starting {schedule[0]} does not fit scores {tuple(scores.shape)}")
    masks = torch.zeros(n_layers, v, dtype=torch.bool)  # (L, V)
    alive = torch.arange(v)  # (n,)
    masks[0] = True
    for i in range(1, n_layers):
        alive = next_keep(alive, scores[alive, i - 1], int(schedule[i]))
        masks[i, alive] = True
    return masks
