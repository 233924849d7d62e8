"""Adapter for Qwen2.5-VL (transformers ``Qwen2_5_VLForConditionalGeneration``).

Qwen2.5-VL resizes each image to multiples of 28 pixels within ``[min_pixels, max_pixels]``, cuts it
into 14x14 patches (grid ``h x w``), runs a ViT with windowed attention (a few full-attention blocks),
and merges each 2x2 patch block into one token: the decoder sees ``(h/2) * (w/2)`` visual tokens in
raster order over the merged grid, with no [CLS]. Positions are M-RoPE (t, h, w): an image starting at
sequence position ``s`` gets ``t = s``, ``h = s + row``, ``w = s + col``; text after it resumes at
``s + max(rows, cols)``.

Everything but the vision tower's windows is shared with Qwen2-VL (:class:`~posbias.models.qwen2_vl.
Qwen2VLAdapter`, the base class): this module overrides which blocks define vision importance (the
full-attention ones) and the tower's merge-unit order (window-permuted, undone by :meth:`window_index`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from posbias.errors import PosbiasError
from posbias.models.base import Architecture
from posbias.models.qwen2_vl import QWEN_CHAT_TEMPLATE, QWEN_PROMPT, Qwen2VLAdapter, Qwen2VLArchitecture

__all__ = ["Qwen25VLArchitecture", "Qwen25VLAdapter", "QWEN_PROMPT", "QWEN_CHAT_TEMPLATE"]


class Qwen25VLArchitecture(Qwen2VLArchitecture):
    """Qwen2.5-VL: Qwen2-VL's layout and positions; vision importance from the full-attention blocks, whose
    sequence is window-permuted (undone with the tower's own window index)."""

    model_type: ClassVar[str] = "qwen2_5_vl"
    label: ClassVar[str] = "Qwen2.5-VL"

    def vision_importance_modules(self) -> list[Any]:
        """The attention of the full-attention blocks (``vision_config.fullatt_block_indexes``)."""
        visual = self.vision_tower()
        full = [int(i) for i in (getattr(visual, "fullatt_block_indexes", None) or [])]
        if not full:
            raise PosbiasError(
                "this Qwen2.5-VL vision tower has no full-attention block (fullatt_block_indexes is empty); "
                "drop vision_importance from the signals"
            )
        return [visual.blocks[i].attn for i in full]

    def window_index(self, inputs: dict[str, Any]) -> Any:
        """(V,) int64 window permutation of the merged tokens for the image in ``inputs``.

        Entry ``u`` is the raster index (over the merged grid) of the merge unit at position ``u`` of the
        vision tower's window-permuted sequence; the 4 patches of unit ``u`` sit at rows
        ``4u .. 4u + 3`` of the tower's hidden states.
        """
        grid_thw = inputs["image_grid_thw"]  # (1, 3) int64
        visual = self.vision_tower()
        try:
            from transformers.vision_utils import get_vision_window_index
        except ImportError:  # transformers 4.x: a method of the tower
            return visual.get_window_index(grid_thw)[0]
        cfg = visual.config
        index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=int(cfg.spatial_merge_size), window_size=int(cfg.window_size),
            patch_size=int(cfg.patch_size),
        )
        return index  # (V,) int64

    def unit_order(self, inputs: dict[str, Any]) -> Any:
        """:meth:`window_index`: the tower's sequence is window-permuted."""
        return self.window_index(inputs)


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL behind the :class:`~posbias.models.base.ModelAdapter` interface: the parameters of
    :class:`~posbias.models.qwen2_vl.Qwen2VLAdapter`, with a ``Qwen2_5_VLForConditionalGeneration`` model."""

    name: ClassVar[str] = "qwen2_5_vl"
    rope_dims: ClassVar[int] = 3
    hf_class: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    label: ClassVar[str] = "Qwen2.5-VL"
    architecture: ClassVar[type[Architecture]] = Qwen25VLArchitecture

    def window_index(self, inputs: dict[str, Any]) -> Any:
        """:meth:`Qwen25VLArchitecture.window_index`."""
        return self.arch.window_index(inputs)
