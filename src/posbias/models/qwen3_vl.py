"""Adapter for Qwen3-VL (transformers ``Qwen3VLForConditionalGeneration``, the dense models).

Qwen3-VL keeps Qwen2-VL's visual layout: the image is resized to multiples of 32 pixels (patch 16, merge 2),
every vision block attends over the whole image (no windows; a learned position embedding besides the 2-D
RoPE), and each 2x2 patch block becomes one token: the decoder sees ``(h/2) * (w/2)`` visual tokens in raster
order over the merged grid, with no [CLS], in the processor's merge-unit order. What differs for posbias:

- **Interleaved M-RoPE.** The (t, h, w) positions are the same as Qwen2-VL's, but the rotary frequencies
  alternate t, h, w (``mrope_section`` [24, 20, 20] spread over the 64 frequencies) instead of following each
  other in three sections: :attr:`Qwen3VLArchitecture.mrope_interleaved` (:func:`posbias.kernels.mrope_axes`),
  used by UTP's position-agnostic rows (the pruner uses the model's own rotary module).
- **Deepstack.** Features of three intermediate vision blocks (``deepstack_visual_indexes``) are merged like
  the last block's and ADDED to the hidden states of the visual positions after decoder layers 0, 1 and 2,
  indexed by a mask of the full prompt. Pruning at the papers' K=2 (after layer 1) comes before the last of
  them; the pruner takes the mask and the features out of the decoder's arguments
  (:meth:`Qwen3VLArchitecture.take_layer_additions`) and adds each kept token's own rows itself.
- **Per-head q/k norms** in the decoder attention: the pruner reads the queries and keys after them
  (:func:`posbias._hf_compat.query_key_modules`); the profiler sees them after RoPE anyway.

Vision importance is, as for Qwen2-VL, the mean attention each patch receives at the last vision block, and
the region features are the merger's input. The MoE models (``qwen3_vl_moe``) are not registered.
"""

from __future__ import annotations

from typing import Any, ClassVar

from posbias.models.base import Architecture, LayerAdditions
from posbias.models.qwen2_vl import Qwen2VLAdapter, Qwen2VLArchitecture

__all__ = ["Qwen3VLArchitecture", "Qwen3VLAdapter", "QWEN3_PROMPT", "QWEN3_CHAT_TEMPLATE"]

#: ChatML prompt of Qwen3-VL Instruct (no default system message) with one image before the question
QWEN3_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)

#: a ChatML chat template that renders ``[user: image + question]`` as :data:`QWEN3_PROMPT`
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen3VLArchitecture(Qwen2VLArchitecture):
    """Qwen3-VL: Qwen2-VL's merged grid, positions and vision importance; interleaved M-RoPE frequencies and
    deepstack additions to the visual positions after the first decoder layers."""

    model_type: ClassVar[str] = "qwen3_vl"
    label: ClassVar[str] = "Qwen3-VL"
    mrope_interleaved: ClassVar[bool] = True

    def take_layer_additions(self, lm_kwargs: dict[str, Any]) -> LayerAdditions | None:
        """The deepstack features and their mask (``deepstack_visual_embeds``, ``visual_pos_masks`` of the text
        model's call), taken out so the decoder adds nothing itself; None when the call carries none."""
        mask = lm_kwargs.get("visual_pos_masks")  # (1, S) bool
        embeds = lm_kwargs.get("deepstack_visual_embeds")  # list of (V, D)
        if mask is None or not embeds:
            return None
        lm_kwargs["visual_pos_masks"] = None
        lm_kwargs["deepstack_visual_embeds"] = None
        return LayerAdditions(mask=mask[0].bool(), embeds=list(embeds))


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL behind the :class:`~posbias.models.base.ModelAdapter` interface: the parameters of
    :class:`~posbias.models.qwen2_vl.Qwen2VLAdapter`, with a ``Qwen3VLForConditionalGeneration`` model (its
    image processor's ``patch_size`` 16 decides the grid: merged visual tokens are about ``pixels / 1024``)."""

    name: ClassVar[str] = "qwen3_vl"
    rope_dims: ClassVar[int] = 3
    hf_class: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    label: ClassVar[str] = "Qwen3-VL"
    architecture: ClassVar[type[Architecture]] = Qwen3VLArchitecture

    def prompt(self, question: str) -> str:
        """The ChatML prompt with one image placeholder before ``question`` (Qwen3-VL: no system message)."""
        return QWEN3_PROMPT.format(question=question)
