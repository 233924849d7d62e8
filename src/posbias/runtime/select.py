"""Top-k selection of visual tokens from bias-corrected scores (torch only)."""

from __future__ import annotations

import torch

from posbias.artifacts.calibration import Calibration
from posbias.errors import PosbiasError
from posbias.runtime.registry import Selection, get_method
from posbias.runtime.scoring import _prepare, score_tokens
from posbias.runtime.spec import MethodSpec

__all__ = ["select_tokens", "select_stored"]


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


def select_stored(
    method: str,
    attn: torch.Tensor,
    calibration: Calibration | None,
    *,
    keep: int,
    grid: tuple[int, int],
) -> torch.Tensor | None:
    """Replay a registered method on one prompt's stored attention (the report's kept-token pictures).

    Only a method that scores one layer's attention row is replayed (``score`` without ``select`` or ``plan``,
    no vision side): its layer rule, default parameters and calibration entry are used as the pruner uses them.

    Parameters
    ----------
    method : str
        A registered method.
    attn : torch.Tensor
        (V, L) float last-token attention over the V visual tokens (raster order) at every decoder layer.
    calibration : Calibration or None
    keep : int
        Tokens to keep, 1..V.
    grid : (rows, cols)

    Returns
    -------
    torch.Tensor or None
        (keep,) int64 ascending raster indices, or None when the method cannot be replayed from attention rows
        (it selects with hidden states or keys, prunes at several layers, or its calibration entry is absent).
    """
    spec_of = get_method(method)
    if spec_of.select is not None or spec_of.plan is not None or spec_of.vision_side is not None:
        return None
    entry: dict = {}
    if spec_of.entry is not None:
        if calibration is None or spec_of.entry not in calibration.methods:
            return None
        entry = calibration.method(spec_of.entry)
    layer = spec_of.default_layer(calibration, entry)
    v = int(attn.shape[0])
    if not 0 <= layer < int(attn.shape[1]):
        return None
    spec = MethodSpec(method=method, layer=layer, keep=int(keep), ratio=None, params=dict(spec_of.params), entry=entry)
    row = attn[:, layer].float()  # (V,)

    def attention(*, agnostic: bool = False) -> torch.Tensor:
        if agnostic:
            raise PosbiasError(f"method {method!r} asks for position-agnostic attention, which a stored row cannot give")
        return row

    sel = Selection(layer=layer, spec=spec, n_visual=v, ids=torch.arange(v), grid=grid, attention=attention)
    return spec_of.run(sel)
