"""Top-k selection of visual tokens from bias-corrected scores (torch only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posbias.artifacts.calibration import Calibration
from posbias.errors import PosbiasError
from posbias.runtime.registry import Selection, get_method
from posbias.runtime.scoring import _prepare, score_tokens
from posbias.runtime.spec import MethodSpec

if TYPE_CHECKING:  # pragma: no cover
    from posbias.models.base import TokenGrid

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
    tokens: TokenGrid | None = None,
) -> torch.Tensor | None:
    """Replay a registered method on one prompt's stored attention (the report's kept-token pictures).

    Only a method that scores one layer's attention row is replayed (``score`` without ``select`` or ``plan``,
    no vision side): its layer rule, default parameters and calibration entry are used as the pruner uses them.
    With ``tokens`` (multi-tile layouts) the method sees what the pruner's selection holds: the grid tokens only
    (separators are never candidates), each with its own tile's row and column, its place along the visual run
    (separators counted) and the grid of every tile.

    Parameters
    ----------
    method : str
        A registered method.
    attn : torch.Tensor
        (V, L) float last-token attention over the V visual tokens (sequence order, separators included) at every
        decoder layer.
    calibration : Calibration or None
    keep : int
        Grid tokens to keep, 1..(V minus separators).
    grid : (rows, cols)
        The first tile's grid (the only one of one-tile layouts).
    tokens : TokenGrid, optional
        The prompt's layout (per-token row, col, tile, separator flag and the tiles' grids); None: one tile of
        ``grid`` in raster order.

    Returns
    -------
    torch.Tensor or None
        (keep,) int64 ascending indices into the V visual tokens (never a separator), or None when the method
        cannot be replayed from attention rows (it selects with hidden states or keys, prunes at several layers,
        or its calibration entry is absent).
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
    geometry: dict = {}
    cand = torch.arange(v)  # (V_c,) the candidates' places among the visual tokens
    if tokens is not None:
        sep = torch.zeros(v, dtype=torch.bool) if tokens.separator is None else torch.as_tensor(tokens.separator).bool()
        tile = torch.zeros(v, dtype=torch.int64) if tokens.tile is None else torch.as_tensor(tokens.tile).long()
        if sep.shape[0] != v or tile.shape[0] != v:
            raise PosbiasError(f"the layout has {sep.shape[0]} tokens but the attention {v} rows; pass the sample's own layout")
        cand = torch.nonzero(~sep).flatten()  # (V_c,)
        geometry = dict(rows=torch.as_tensor(tokens.rows).long()[cand], cols=torch.as_tensor(tokens.cols).long()[cand],
                        tile=tile[cand], tiles=tuple(tuple(int(x) for x in g) for g in tokens.tiles),
                        run_index=cand, n_run=v, n_separators=int(sep.sum()))
    n_cand = int(cand.shape[0])
    spec = MethodSpec(method=method, layer=layer, keep=min(int(keep), n_cand), ratio=None, params=dict(spec_of.params),
                      entry=entry)
    row = attn[cand, layer].float()  # (V_c,)

    def attention(*, agnostic: bool = False) -> torch.Tensor:
        if agnostic:
            raise PosbiasError(f"method {method!r} asks for position-agnostic attention, which a stored row cannot give")
        return row

    sel = Selection(layer=layer, spec=spec, n_visual=n_cand, ids=torch.arange(n_cand), grid=grid, attention=attention,
                    **geometry)
    kept = spec_of.run(sel)
    return None if kept is None else cand[kept]
