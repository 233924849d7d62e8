"""Last-token attention capture: the attention the last prompt token pays to each visual token.

How it works
------------
transformers routes every decoder attention call through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with query and key already rotated by RoPE. :class:`LastTokenAttentionCapture` registers its own
function under a private name (with ``sdpa``'s mask builder for that name, so the masks it receives are
exactly the ones ``sdpa`` would get) and switches ONLY the language model's decoder to it; the vision
tower keeps its implementation. For each decoder layer asked for, the function

1. takes the LAST query row only, computes ``softmax(q_last . K^T * scaling + mask_last_row)`` in float32
   with the model's GQA layout (each KV head repeated ``num_key_value_groups`` times, as ``repeat_kv``),
   averages over heads (or keeps them) and gathers the visual positions: one (V,) row per layer;
2. hands the call to transformers' ``sdpa_attention_forward`` for the real output, so the forward is the
   ordinary sdpa forward.

Cost per layer is one (H, 1, S) score row on top of sdpa; no (S, S) map is ever built and
``output_attentions`` is never used. The previous implementation is restored on exit, also when the
body raises.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from posbias.errors import PosbiasError
from posbias.models.base import ModelAdapter, VisualLayout

__all__ = ["LastTokenAttentionCapture", "capture_attention", "last_token_attention_row"]

_COUNTER = itertools.count()


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
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    q_last = query[:, :, -1:, :].float()  # (B, H, 1, D)
    k = key.float()  # (B, H_kv, S, D)
    n_heads, n_kv = q_last.shape[1], k.shape[1]
    if n_heads != n_kv:
        if n_heads % n_kv:
            raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
        k = k.repeat_interleave(n_heads // n_kv, dim=1)  # (B, H, S, D), same order as repeat_kv
    n_keys = k.shape[2]
    scores = torch.matmul(q_last, k.transpose(-1, -2)) * scaling  # (B, H, 1, S)
    if attention_mask is not None:
        mask_last = attention_mask[..., -1:, :n_keys]  # (B, 1|H, 1, S)
        if mask_last.dtype == torch.bool:
            scores = scores.masked_fill(~mask_last, float("-inf"))
        else:
            scores = scores + mask_last.float()
    return torch.softmax(scores, dim=-1)[:, :, 0, :]  # (B, H, S) float32


class LastTokenAttentionCapture:
    """Context manager capturing the last prompt token's attention to the visual tokens, per layer.

    Parameters
    ----------
    adapter : posbias.models.base.ModelAdapter
        Loaded model; its ``language_model()`` decoder is switched to the capturing function.
    layers : sequence of int, optional
        Decoder layers to record, in the order the output columns take; all layers when None.
    per_head : bool
        Keep heads: :meth:`run` returns (V, L, H) instead of the head mean (V, L).

    Attributes
    ----------
    last_logits : torch.Tensor or None
        (vocab,) logits of the last prompt position from the latest :meth:`run`.

    Examples
    --------
    >>> with LastTokenAttentionCapture(adapter) as cap:          # doctest: +SKIP
    ...     attn = cap.run(inputs, adapter.layout(inputs))      # (V, L) float32
    """

    def __init__(self, adapter: ModelAdapter, *, layers: Sequence[int] | None = None, per_head: bool = False) -> None:
        self.adapter = adapter
        self.per_head = bool(per_head)
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
        self._name = f"posbias_last_token_{next(_COUNTER)}"
        self._prev_impl: str | None = None
        self._active = False
        self._visual_index: torch.Tensor | None = None  # (V,) int64 on the model device
        self._rows: dict[int, torch.Tensor] = {}
        self.last_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------ context
    @property
    def name(self) -> str:
        """The attention-implementation name registered while active."""
        return self._name

    @property
    def active(self) -> bool:
        """True inside the ``with`` block."""
        return self._active

    def __enter__(self) -> "LastTokenAttentionCapture":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        if self._active:
            raise PosbiasError("this capture is already active; do not nest the same capture object")
        lm = self.adapter.language_model()
        self._prev_impl = lm.config._attn_implementation
        AttentionInterface.register(self._name, self._attention)
        AttentionMaskInterface.register(self._name, sdpa_mask)
        try:
            lm.set_attn_implementation(self._name)
            if lm.config._attn_implementation != self._name:
                raise RuntimeError(
                    f"could not switch {type(lm).__name__} to the capture attention "
                    f"(still {lm.config._attn_implementation!r})"
                )
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        try:
            lm = self.adapter.language_model()
            if self._prev_impl is not None and lm.config._attn_implementation != self._prev_impl:
                lm.set_attn_implementation(self._prev_impl)
        finally:
            AttentionInterface._global_mapping.pop(self._name, None)
            AttentionMaskInterface._global_mapping.pop(self._name, None)
            self._active = False
            self._visual_index = None

    # ---------------------------------------------------------------- the hook
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
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = self._layer_of.get(id(module))
        if layer is not None and layer in self._wanted:
            with torch.no_grad():
                probs = last_token_attention_row(module, query, key, attention_mask, scaling)  # (B, H, S)
                probs = probs[0]  # (H, S)
                if self._visual_index is not None:
                    probs = probs.index_select(1, self._visual_index)  # (H, V)
                row = probs if self.per_head else probs.mean(dim=0)  # (H, V) or (V,)
                self._rows[layer] = row.detach()
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

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
        self._rows = {}
        try:
            self.last_logits = self.adapter.forward_last_logits(inputs)  # (vocab,)
        finally:
            self._visual_index = None
        missing = [x for x in self.layers if x not in self._rows]
        if missing:
            raise RuntimeError(
                f"capture saw no attention call for layers {missing}; the decoder did not route through "
                "the attention interface"
            )
        stacked = torch.stack([self._rows[x] for x in self.layers], dim=0)  # (L, V) or (L, H, V)
        self._rows = {}
        out = stacked.to(device="cpu", dtype=torch.float32).numpy()
        if self.per_head:
            return np.ascontiguousarray(out.transpose(2, 0, 1))  # (V, L, H)
        return np.ascontiguousarray(out.T)  # (V, L)


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
