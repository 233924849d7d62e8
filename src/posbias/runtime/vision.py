"""Vision importance for ARP, recomputed in torch from the vision tower's own projections.

- LLaVA (CLIP): the [CLS] query's attention over the patches at the vision feature layer (the layer whose
  output LLaVA feeds to the projector, ``vision_feature_layer``, -2 for LLaVA-1.5), head mean (PosPrune
  Eq. 2). Computed from the attention module's input with its ``q_proj``/``k_proj``: one (H, 1, N) row.
- Qwen2.5-VL (no [CLS]): the mean attention each patch receives from all patches of its image at the last
  full-attention block (VisionZip's rule PosPrune follows), averaged over the 2x2 merge unit and mapped
  from the window-permuted order back to the LLM's raster order.
- Qwen2-VL (no [CLS], no windows): the same rule at the last block (every block attends over the whole
  image); the tower's merge units are already in the LLM's raster order, so nothing is un-permuted.

Only torch is imported; the hooks are plain ``nn.Module`` hooks.
"""

from __future__ import annotations

from typing import Any

import torch

from posbias.errors import PosbiasError

__all__ = ["VisionImportance"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionImportance:
    """Hooks that record a (V,) vision importance per forward, in the LLM's visual-token order.

    Parameters
    ----------
    model : transformers model
        ``LlavaForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
        ``Qwen2VLForConditionalGeneration``.
    kind : {"llava", "mrope"}
        ``posbias.runtime.prune.model_kind(model)``.
    """

    def __init__(self, model: Any, kind: str) -> None:
        self.model = model
        self.kind = kind
        self.importance: torch.Tensor | None = None  # (V,) float32 after a forward
        self._handles: list[Any] = []
        self._window_rows: torch.Tensor | None = None
        self._window_imp: torch.Tensor | None = None

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> None:
        if self.kind == "llava":
            tower = self.model.model.vision_tower
            encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
            layers = encoder.layers
            feat = self.model.config.vision_feature_layer
            if not isinstance(feat, int):
                raise PosbiasError(f"vision_feature_layer {feat!r} is a list; ARP needs a single feature layer")
            idx = feat if feat >= 0 else len(layers) + feat
            # hidden_states[k] is the output of layer k-1; the feature map's attention is in layer idx - 1 for
            # idx >= 1 when counting embeddings as hidden_states[0]. For -2 this is layer L-2.
            layer_idx = idx - 1 if feat >= 0 else idx
            if not 0 <= layer_idx < len(layers):
                raise PosbiasError(f"vision_feature_layer {feat} leaves no attention layer for ARP; use the default -2")
            attn = layers[layer_idx].self_attn
            self._handles.append(attn.register_forward_pre_hook(self._clip_pre, with_kwargs=True))
        elif self.kind == "mrope":
            visual = self.model.model.visual
            # windowed towers (Qwen2.5-VL) permute the merge units; Qwen2-VL's keep the raster order
            self._windowed = getattr(visual.config, "window_size", None) is not None
            full = list(getattr(visual, "fullatt_block_indexes", []) or [])
            block = visual.blocks[full[-1] if full else len(visual.blocks) - 1]
            self._merge_unit = int(visual.spatial_merge_size) ** 2
            self._handles.append(block.attn.register_forward_pre_hook(self._qwen_pre, with_kwargs=True))
            self._handles.append(visual.merger.register_forward_hook(self._qwen_merger))
            self._handles.append(visual.register_forward_hook(self._qwen_visual))
        else:  # pragma: no cover - guarded by the caller
            raise PosbiasError(f"no vision importance for architecture {self.kind!r}")

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.importance = None

    # ------------------------------------------------------------------ LLaVA / CLIP
    def _clip_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, 1+N, C)
        with torch.no_grad():
            h = hidden[:1].float()
            q = module.q_proj(hidden[:1, :1]).float()  # (1, 1, H*D)
            k = module.k_proj(hidden[:1]).float()  # (1, 1+N, H*D)
            n_heads = int(getattr(module, "num_heads", q.shape[-1] // module.head_dim))
            d = q.shape[-1] // n_heads
            q = q.view(1, 1, n_heads, d).transpose(1, 2)  # (1, H, 1, D)
            k = k.view(1, h.shape[1], n_heads, d).transpose(1, 2)  # (1, H, 1+N, D)
            scale = float(getattr(module, "scale", d ** -0.5))
            probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # (1, H, 1, 1+N)
            self.importance = probs[0, :, 0, 1:].mean(0)  # (N,) [CLS] row over patches, head mean

    # ------------------------------------------------------------------ Qwen2.5-VL
    def _qwen_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # (P, C) window-permuted patches
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        cos, sin = kwargs["position_embeddings"]  # (P, D) each
        with torch.no_grad():
            p = hidden.shape[0]
            qkv = module.qkv(hidden).float().reshape(p, 3, module.num_heads, -1).permute(1, 0, 2, 3)
            q, k = qkv[0], qkv[1]  # (P, H, D)
            c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # (P, 1, D)
            q = q * c + _rotate_half(q) * s
            k = k * c + _rotate_half(k) * s
            scale = float(getattr(module, "scaling", q.shape[-1] ** -0.5))
            received = torch.zeros(p)  # (P,) mean attention received from the patches of its image
            bounds = cu.tolist() if cu is not None else [0, p]
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b <= a:
                    continue
                qi, ki = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1)  # (H, n, D)
                acc = torch.zeros(b - a)
                for start in range(0, b - a, 1024):  # query chunks bound the (H, chunk, n) map
                    att = torch.softmax((qi[:, start:start + 1024] @ ki.transpose(-1, -2)) * scale, dim=-1)
                    acc += att.sum(dim=(0, 1))
                received[a:b] = acc / float(qi.shape[0] * (b - a))
            self._window_imp = received.view(-1, self._merge_unit).mean(-1)  # (V,) window order

    def _qwen_merger(self, module: Any, args: tuple, output: torch.Tensor) -> None:
        self._window_rows = output.detach()  # (V, D) merged tokens, window order

    def _qwen_visual(self, module: Any, args: tuple, output: Any) -> None:
        pooled = getattr(output, "pooler_output", None)
        if pooled is None or self._window_rows is None or self._window_imp is None:
            return
        if not self._windowed:
            self.importance = self._window_imp  # (V,) already raster order
            self._window_rows = None
            self._window_imp = None
            return
        with torch.no_grad():
            # recover the window permutation by matching rows (window order -> raster order)
            r = torch.randn(pooled.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            pw = self._window_rows.double().cpu() @ r  # (V,)
            pr = pooled.detach().double().cpu() @ r  # (V,)
            ow, orr = torch.sort(pw).indices, torch.sort(pr).indices
            imp = torch.empty_like(self._window_imp)
            imp[orr] = self._window_imp[ow]
            self.importance = imp  # (V,) raster order
        self._window_rows = None
        self._window_imp = None
