"""Last-token attention capture: the attention the last prompt token pays to each visual token.

How it works
------------
transformers routes every decoder attention call through the attention implementation the model is set to,
with query and key already rotated by RoPE. :class:`LastTokenAttentionCapture` routes the calls of the
language model's decoder ONLY to its own function (:func:`posbias._hf_compat.route_attention`;
the masks it receives are exactly the ones ``sdpa`` would get); the vision tower keeps its implementation. For each decoder layer asked for, the function

1. takes the LAST query row only, computes ``softmax(q_last . K^T * scaling + mask_last_row)`` in float32
   with the model's GQA layout (each KV head repeated ``num_key_value_groups`` times, as ``repeat_kv``),
   averages over heads (or keeps them) and gathers the visual positions: one (V,) row per layer;
2. hands the call to transformers' sdpa attention for the real output, so the forward is the
   ordinary sdpa forward.

Cost per layer is one (H, 1, S) score row on top of sdpa; no (S, S) map is ever built and
``output_attentions`` is never used. The previous implementation is restored on exit, also when the
body raises.

With ``position_agnostic=True`` the same hook also computes the position-agnostic row (UTP,
Eq. 2): the visual keys it receives (after RoPE) are rotated by ``R(p' - p_j)`` to the uniform position
``p'`` (see :mod:`posbias.profiler.signals`; the math is :mod:`posbias.kernels`), the text columns of the ordinary score row are kept, and
one softmax runs over all keys: one (H_kv, V, D) rotation and one (H, V) product per layer.

:class:`VisionAttentionCapture` does the same for the vision tower: it swaps the tower's attention
implementation for a function that records, at the modules the adapter names, either the [CLS] query
row (LLaVA) or the mean attention each patch receives (Qwen2.5-VL, chunked over query rows), then hands
the call to sdpa.

Every quantity is a shared kernel of :mod:`posbias.kernels` (the runtime pruner scores and prunes with the
same functions); this module only wires them to the model, and imports nothing from
:mod:`posbias.profiler.signals` (which builds on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from posbias import kernels
from posbias.errors import PosbiasError
from posbias._hf_compat import ROUTE_NAME, route_attention, sdpa_attention
from posbias.models.base import ModelAdapter, VisualLayout

__all__ = [
    "LastTokenAttentionCapture",
    "VisionAttentionCapture",
    "capture_attention",
    "last_token_attention_row",
    "last_token_scores",
]

_Swap = TypeVar("_Swap", bound="_AttentionSwap")


def _scaling(module: Any, query: torch.Tensor, scaling: float | None) -> float:
    """The score scale: ``scaling`` when given, else ``module.scaling``, else ``D ** -0.5``."""
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    return float(scaling)


def last_token_scores(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled, masked scores of the last query position over all keys, per head (before softmax):
    :func:`posbias.kernels.last_token_scores` with the module's scale.

    Parameters are those of :func:`last_token_attention_row`.

    Returns
    -------
    scores : torch.Tensor
        (B, H, S) float32.
    mask_row : torch.Tensor or None
        (B, S) float32 additive mask of the last row (0 / -inf or the float mask's values) as applied
        (head 0 of a per-head mask), or None without a mask.
    """
    return kernels.last_token_scores(query, key, attention_mask, _scaling(module, query, scaling))


def last_token_attention_row(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
) -> torch.Tensor:
    """Attention probabilities of the last query position over all keys, per head.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (used for ``scaling`` when not given).
    query : torch.Tensor
        (B, H, Q, D) queries after RoPE.
    key : torch.Tensor
        (B, H_kv, S, D) keys after RoPE; ``H % H_kv == 0``.
    attention_mask : torch.Tensor or None
        (B, 1 or H, Q, >=S) boolean (True = attend) or additive float mask, or None (causal; the last row
        then sees every key).
    scaling : float, optional
        Score scale; defaults to ``module.scaling``, else ``D ** -0.5``.

    Returns
    -------
    torch.Tensor
        (B, H, S) float32 softmax row of the last query, on the input device.
    """
    return kernels.last_token_attention(query, key, attention_mask, _scaling(module, query, scaling))  # (B, H, S)


class _AttentionSwap:
    """Shared context-manager machinery of the captures: while active, every attention call inside one
    module (:meth:`_target`) goes to a per-instance function (:func:`posbias._hf_compat.route_attention`,
    masks built as for ``sdpa``); the previous implementation is restored on exit, also when the body raises.

    The routed function (:meth:`_attention`) hands each call to :meth:`_record`, then to transformers'
    sdpa attention for the real output. Subclasses call :meth:`_init_swap` in ``__init__`` and
    define :meth:`_target` and :meth:`_record` (and :attr:`_nest_message`).
    """

    _nest_message = "this capture is already active; do not nest the same capture object"

    def _init_swap(self) -> None:
        self._route: Any = None
        self._active = False

    def _target(self) -> Any:
        """The module whose attention implementation is swapped."""
        raise NotImplementedError

    def _attention(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        self._record(module, query, key, attention_mask, scaling)
        return sdpa_attention()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    def _record(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        """Record what the capture needs from one attention call (before the sdpa forward runs)."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The attention-implementation name the target runs while active."""
        return ROUTE_NAME

    @property
    def active(self) -> bool:
        """True inside the ``with`` block."""
        return self._active

    def __enter__(self: _Swap) -> _Swap:
        if self._active:
            raise PosbiasError(self._nest_message)
        route = route_attention(self._target(), self._attention)
        route.__enter__()
        self._route = route
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        route, self._route = self._route, None
        self._active = False
        if route is not None:
            route.__exit__(None, None, None)


class LastTokenAttentionCapture(_AttentionSwap):
    """Context manager capturing the last prompt token's attention to the visual tokens, per layer.

    Parameters
    ----------
    adapter : posbias.models.base.ModelAdapter
        Loaded model; its ``language_model()`` decoder is switched to the capturing function.
    layers : sequence of int, optional
        Decoder layers to record, in the order the output columns take; all layers when None.
    per_head : bool
        Keep heads: :meth:`run` returns (V, L, H) instead of the head mean (V, L).
    position_agnostic : bool
        Also compute the position-agnostic row (UTP Eq. 2) at the same layers, into :attr:`last_attn_pa`.

    Attributes
    ----------
    last_logits : torch.Tensor or None
        (vocab,) logits of the last prompt position from the latest :meth:`run`.
    last_attn_mean : np.ndarray or None
        (V, L) float32 head-mean rows of the latest :meth:`run` (also when ``per_head``).
    last_attn_pa : np.ndarray or None
        (V, L) float32 head-mean position-agnostic rows of the latest :meth:`run` (``position_agnostic``).

    Examples
    --------
    >>> with LastTokenAttentionCapture(adapter) as cap:          # doctest: +SKIP
    ...     attn = cap.run(inputs, adapter.layout(inputs))      # (V, L) float32
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        layers: Sequence[int] | None = None,
        per_head: bool = False,
        position_agnostic: bool = False,
    ) -> None:
        self.adapter = adapter
        self.per_head = bool(per_head)
        self.position_agnostic = bool(position_agnostic)
        n_layers = int(adapter.n_layers)
        if layers is None:
            chosen = list(range(n_layers))
        else:
            chosen = [int(x) for x in layers]
            bad = [x for x in chosen if not 0 <= x < n_layers]
            if bad:
                raise PosbiasError(f"layers {bad} are out of range; the model has layers 0..{n_layers - 1}")
            if len(set(chosen)) != len(chosen):
                raise PosbiasError(f"layers {chosen} repeat a layer; pass each layer once")
            if not chosen:
                raise PosbiasError("layers is empty; pass at least one decoder layer or None for all")
        self.layers: list[int] = chosen
        self._wanted = frozenset(chosen)
        modules = adapter.decoder_attention_modules()
        self._layer_of: dict[int, int] = {id(m): i for i, m in enumerate(modules)}
        self._init_swap()
        self._visual_index: torch.Tensor | None = None  # (V,) int64 on the model device
        self._rows: dict[int, torch.Tensor] = {}
        self._pa_rows: dict[int, torch.Tensor] = {}
        self._uniform_delta: torch.Tensor | None = None  # (V, P) p' - p per visual token and axis
        self._pa_rotation: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (V, D)
        self.last_logits: torch.Tensor | None = None
        self.last_attn_mean: np.ndarray | None = None
        self.last_attn_pa: np.ndarray | None = None

    # ------------------------------------------------------------------ context
    def _target(self) -> Any:
        return self.adapter.language_model()

    def _restore(self) -> None:
        try:
            super()._restore()
        finally:
            self._visual_index = None

    # ---------------------------------------------------------------- the hook
    def _record(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        layer = self._layer_of.get(id(module))
        if layer is not None and layer in self._wanted:
            with torch.no_grad():
                scores, mask_row = last_token_scores(module, query, key, attention_mask, scaling)  # (B, H, S)
                probs = torch.softmax(scores[0], dim=-1)  # (H, S)
                if self._visual_index is not None:
                    probs = probs.index_select(1, self._visual_index)  # (H, V)
                self._rows[layer] = probs.detach() if self.per_head else probs.mean(dim=0)  # (H, V) or (V,)
                if self.position_agnostic and self._visual_index is not None:
                    self._pa_rows[layer] = self._pa_row(module, query, key, scores[0], mask_row, scaling)  # (V,)

    def _pa_row(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        scores: torch.Tensor,
        mask_row: torch.Tensor | None,
        scaling: float | None,
    ) -> torch.Tensor:
        """(V,) head-mean position-agnostic attention of the last query (UTP Eq. 2)."""
        scaling = _scaling(module, query, scaling)
        if self._pa_rotation is None:  # once per forward: the RoPE module has run (dynamic RoPE updated)
            inv_freq, sections = self.adapter.rope_parameters()
            if 2 * int(inv_freq.shape[0]) != int(key.shape[-1]):
                raise PosbiasError(
                    f"RoPE rotates {2 * int(inv_freq.shape[0])} of {int(key.shape[-1])} head dims (partial rotary); "
                    "position-agnostic attention supports full rotary only: drop attn_pa from the signals"
                )
            self._pa_rotation = kernels.rope_rotation(
                self._uniform_delta.to(key.device), inv_freq, sections,
                interleaved=bool(getattr(self.adapter.architecture, "mrope_interleaved", False)),
            )  # (V, D) x2
        cos, sin = self._pa_rotation
        pa_scores = kernels.position_agnostic_scores(
            scores, query[0, :, -1, :], key[0], self._visual_index, cos, sin, float(scaling),
            None if mask_row is None else mask_row[0],
        )  # (H, S)
        probs = torch.softmax(pa_scores, dim=-1).index_select(1, self._visual_index)  # (H, V)
        return probs.mean(dim=0).detach()  # (V,)

    # -------------------------------------------------------------------- run
    def run(self, inputs: dict[str, Any], layout: VisualLayout) -> np.ndarray:
        """One forward; the last token's attention to the visual tokens at the asked layers.

        Parameters
        ----------
        inputs : dict
            Output of ``adapter.prepare`` (batch of one).
        layout : VisualLayout
            ``adapter.layout(inputs)``.

        Returns
        -------
        np.ndarray
            (V, L) float32 head-mean attention (rows sum to <= 1 over all keys), or (V, L, H) when
            ``per_head``; column j is layer ``self.layers[j]``. The logits go to :attr:`last_logits`.
        """
        if not self._active:
            with self:
                return self.run(inputs, layout)
        input_ids = inputs.get("input_ids")
        if input_ids is not None and input_ids.shape[0] != 1:
            raise PosbiasError(f"inputs hold a batch of {input_ids.shape[0]}; capture one prompt at a time")
        device = self.adapter.language_model().get_input_embeddings().weight.device
        self._visual_index = torch.as_tensor(
            np.asarray(layout.visual_index, dtype=np.int64), device=device
        )  # (V,) int64
        if self.position_agnostic:
            pos = np.asarray(layout.position_ids, dtype=np.int64)  # (V, P)
            target = kernels.uniform_position(pos[0], pos[-1])  # (P,) p' per axis from the first/last visual token
            self._uniform_delta = torch.as_tensor(target[None, :] - pos, device=device)  # (V, P)
        self._rows, self._pa_rows, self._pa_rotation = {}, {}, None
        self.last_attn_mean = self.last_attn_pa = None
        try:
            self.last_logits = self.adapter.forward_last_logits(inputs)  # (vocab,)
        finally:
            self._visual_index = None
            self._uniform_delta = None
            self._pa_rotation = None
        missing = [x for x in self.layers if x not in self._rows]
        if missing:
            raise RuntimeError(
                f"capture saw no attention call for layers {missing}; the decoder did not route through "
                "the attention interface"
            )
        stacked = torch.stack([self._rows[x] for x in self.layers], dim=0)  # (L, V) or (L, H, V)
        self._rows = {}
        if self.position_agnostic:
            pa = torch.stack([self._pa_rows[x] for x in self.layers], dim=0)  # (L, V)
            self.last_attn_pa = np.ascontiguousarray(pa.to(device="cpu", dtype=torch.float32).numpy().T)  # (V, L)
            self._pa_rows = {}
        out = stacked.to(device="cpu", dtype=torch.float32).numpy()
        if self.per_head:
            self.last_attn_mean = np.ascontiguousarray(out.mean(axis=1).T)  # (V, L)
            return np.ascontiguousarray(out.transpose(2, 0, 1))  # (V, L, H)
        self.last_attn_mean = np.ascontiguousarray(out.T)  # (V, L)
        return self.last_attn_mean


def capture_attention(
    adapter: ModelAdapter,
    inputs: dict[str, Any],
    layout: VisualLayout,
    layers: Sequence[int] | None = None,
    *,
    per_head: bool = False,
) -> np.ndarray:
    """Convenience: ``LastTokenAttentionCapture(adapter, layers=..., per_head=...).run(inputs, layout)``.

    Returns
    -------
    np.ndarray
        (V, L) float32, or (V, L, H) when ``per_head``.
    """
    with LastTokenAttentionCapture(adapter, layers=layers, per_head=per_head) as cap:
        return cap.run(inputs, layout)


class VisionAttentionCapture(_AttentionSwap):
    """Context manager recording, at the vision attention modules the adapter names, what vision
    importance needs, while the tower runs on sdpa.

    ``adapter.vision_importance_kind`` decides what is recorded per module and call:

    - ``"cls"`` (LLaVA/CLIP): the [CLS] query row (query 0), softmax over all keys, head mean: (N,).
    - ``"colmean"`` (Qwen2.5-VL): the mean attention each key receives over all queries and heads,
      computed in chunks of query rows (:func:`posbias.profiler.signals.attention_column_mean`): (N,).

    When the tower's batch holds several crops of one image (LLaVA-NeXT), each crop gets its own record and
    the records are concatenated: (B * N,).

    Parameters
    ----------
    adapter : ModelAdapter
        Loaded model with vision-signal support (``vision_tower``, ``vision_importance_modules``).
    """

    _nest_message = "this vision capture is already active; do not nest the same capture object"

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.kind = str(adapter.vision_importance_kind)
        if self.kind not in ("cls", "colmean"):
            raise PosbiasError(
                f"adapter {adapter.name!r} has no vision-importance support; drop vision_importance from the signals"
            )
        self.tower = adapter.vision_tower()
        modules = adapter.vision_importance_modules()
        self._slot_of: dict[int, int] = {id(m): i for i, m in enumerate(modules)}
        self._records: dict[int, torch.Tensor] = {}
        self._init_swap()

    def _target(self) -> Any:
        return self.tower

    def reset(self) -> None:
        """Forget the records of the previous forward."""
        self._records = {}

    def records(self) -> list[torch.Tensor]:
        """One (N,) float32 record per module of ``adapter.vision_importance_modules()``, in that order.

        Raises
        ------
        RuntimeError
            When a module was not called (or called more than once: several images or a video).
        """
        missing = [i for i in range(len(self._slot_of)) if i not in self._records]
        if missing:
            raise RuntimeError(
                f"vision capture saw no attention call for module(s) {missing}; the tower did not route "
                "through the attention interface"
            )
        return [self._records[i] for i in range(len(self._slot_of))]

    def _record(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        slot = self._slot_of.get(id(module))
        if slot is not None:
            if slot in self._records:
                raise PosbiasError(
                    "the vision tower attended over several images in one forward; vision_importance needs "
                    "exactly one still image per prompt"
                )
            with torch.no_grad():
                if attention_mask is not None:
                    raise PosbiasError("vision_importance expects an unmasked vision tower (one image, no padding)")
                q, k, bounds = query[0], key[0], None  # (H, N, D) one image
                if query.shape[0] > 1:  # the tower's batch = independent crops of one image (LLaVA-NeXT)
                    n = int(key.shape[2])
                    q = query.transpose(0, 1).reshape(query.shape[1], -1, query.shape[-1])  # (H, B*N, D)
                    k = key.transpose(0, 1).reshape(key.shape[1], -1, key.shape[-1])  # (H, B*N, D)
                    bounds = list(range(0, int(key.shape[0]) * n + 1, n))
                self._records[slot] = kernels.vision_record(
                    self.kind, q, k, _scaling(module, query, scaling), bounds
                )  # (N,) or (B*N,): one record per crop, concatenated
