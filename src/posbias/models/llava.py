"""Adapter for LLaVA-1.5 (transformers ``LlavaForConditionalGeneration``).

LLaVA-1.5 encodes a 336x336 image with CLIP ViT-L/14-336 into a 24x24 patch grid (the [CLS] output is
dropped by ``vision_feature_select_strategy="default"``), projects each patch with a 2-layer MLP and
inserts the 576 embeddings where the prompt's ``<image>`` placeholder was expanded. The decoder (Llama /
Vicuna) sees them as 576 consecutive tokens with ordinary 1-D RoPE positions, raster order.
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar

import numpy as np

from posbias.errors import PosbiasError
from posbias.models.base import Architecture, TokenGrid, TransformersAdapter

__all__ = ["LlavaArchitecture", "LlavaAdapter", "LLAVA_PROMPT", "LLAVA_CHAT_TEMPLATE", "clip_feature_layers"]

#: LLaVA-1.5 prompt used when the processor has no chat template for images
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"

#: a chat template producing :data:`LLAVA_PROMPT` (given to processors built by posbias)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def clip_feature_layers(n_layers: int, vision_feature_layer: int | list[int]) -> list[int]:
    """Encoder-layer indices (0-based) whose outputs are the features LLaVA's projector reads.

    ``vision_feature_layer`` indexes CLIP's ``hidden_states`` tuple (patch embeddings first, then one entry
    per encoder layer), so hidden state ``h >= 1`` is the output of encoder layer ``h - 1`` (negative ``h``
    counts from the end of that tuple); the default -2 is the penultimate layer's output. The profiler's
    vision importance and the pruner's ARP both read the attention of these layers.

    Raises
    ------
    posbias.errors.PosbiasError
        When a value selects the patch embeddings (no attention map) or lies outside the tuple.
    """
    n = int(n_layers)
    wanted = [int(vision_feature_layer)] if isinstance(vision_feature_layer, int) else [int(x) for x in vision_feature_layer]
    layers: list[int] = []
    for h in wanted:
        if not -(n + 1) <= h <= n:
            raise PosbiasError(f"vision_feature_layer {h} is outside the vision tower's {n + 1} hidden states; fix the model config")
        idx = h % (n + 1)
        if idx == 0:
            raise PosbiasError(
                f"vision_feature_layer {h} selects the patch embeddings (no attention map); "
                "vision importance needs an encoder layer: drop vision_importance from the signals"
            )
        layers.append(idx - 1)
    return layers


class LlavaArchitecture(Architecture):
    """LLaVA-1.5: one square CLIP patch grid per image, raster order, 1-D RoPE, [CLS] vision importance."""

    model_type: ClassVar[str] = "llava"
    label: ClassVar[str] = "LLaVA-1.5"
    rope_dims: ClassVar[int] = 1
    placeholder: ClassVar[str] = "<image>"
    vision_importance_kind: ClassVar[str] = "cls"

    def fixed_grid(self) -> tuple[int, int]:
        """(rows, cols) of the vision tower's patch grid from the config (24x24 for LLaVA-1.5)."""
        vc = self.model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return side, side

    def token_grid(self, inputs: dict[str, Any], visual_index: np.ndarray) -> TokenGrid:
        """Raster rows/cols over the square grid the image tokens fill."""
        n_visual = int(visual_index.shape[0])
        side = math.isqrt(n_visual)
        if side * side != n_visual:
            raise PosbiasError(
                f"the prompt holds {n_visual} image tokens, not a square grid; pass exactly one image per prompt"
            )
        return TokenGrid.raster((side, side))

    # ------------------------------------------------------------------ vision importance
    def vision_feature_layers(self) -> list[int]:
        """:func:`clip_feature_layers` of this model's config."""
        config = self.model.config
        return clip_feature_layers(int(config.vision_config.num_hidden_layers), config.vision_feature_layer)

    def vision_tower(self) -> Any:
        """``model.model.vision_tower`` (a ``CLIPVisionModel``)."""
        return self.model.model.vision_tower

    def vision_importance_modules(self) -> list[Any]:
        """The CLIP self-attention of the layer(s) producing the features the projector uses."""
        tower = self.vision_tower()
        encoder = getattr(tower, "encoder", None) or tower.vision_model.encoder  # 5.x flat / 4.x nested
        layers = encoder.layers
        return [layers[i].self_attn for i in self.vision_feature_layers()]

    def vision_query_key(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any, float, list[int]]:
        """The [CLS] query and all keys of a CLIP attention module from its input (first image of the batch)."""
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, 1+N, C)
        q = module.q_proj(hidden[:1, :1]).float()  # (1, 1, H*D)
        k = module.k_proj(hidden[:1]).float()  # (1, 1+N, H*D)
        n_heads = int(getattr(module, "num_heads", q.shape[-1] // module.head_dim))
        d = q.shape[-1] // n_heads
        n = int(k.shape[1])
        q = q.view(1, n_heads, d).transpose(0, 1)  # (H, 1, D)
        k = k.view(n, n_heads, d).transpose(0, 1)  # (H, 1+N, D)
        return q, k, float(getattr(module, "scale", d ** -0.5)), [0, n]

    def vision_importance_tokens(self, records: list[Any], inputs: dict[str, Any]) -> Any:
        """[CLS] -> patch attention, head mean (PosPrune, Eq. 2); mean over feature layers when several.

        ``records`` hold one (N,) head-mean [CLS] query row per module (N = 1 + patches); its patch part
        (N - 1,) is in raster order, the LLM's visual-token order.
        """
        import torch

        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise PosbiasError(
                f"vision_feature_select_strategy {strategy!r}: the LLM sees the [CLS] token too; "
                "vision importance supports 'default' only (drop vision_importance from the signals)"
            )
        rows = torch.stack([r.float() for r in records], dim=0)  # (F, N)
        return rows.mean(dim=0)[1:]  # (V,) = (N - 1,)

    def vision_feature_module(self) -> Any:
        """``model.model.multi_modal_projector``: its input is the selected CLIP layer without [CLS]."""
        return self.model.model.multi_modal_projector

    def vision_features_tokens(self, features: Any, inputs: dict[str, Any]) -> Any:
        """(V, D_v) from the projector input (1, V, D_v), already in raster order."""
        if features.dim() != 3 or features.shape[0] != 1:
            raise PosbiasError(f"projector input of shape {tuple(features.shape)}: pass one image per prompt")
        return features[0]  # (V, D_v)

    # ------------------------------------------------------------------ reports
    @classmethod
    def crop_image(cls, image: Any) -> Any:
        """The central square: LLaVA-1.5's CLIP processor resizes the shortest side and centre-crops."""
        w, h = image.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return image.crop((left, top, left + s, top + s))


class LlavaAdapter(TransformersAdapter):
    """LLaVA-1.5 behind the :class:`~posbias.models.base.ModelAdapter` interface.

    Parameters
    ----------
    model : transformers.LlavaForConditionalGeneration
        Loaded model in eval mode.
    processor : transformers.LlavaProcessor
        Its processor (``CLIPImageProcessorPil`` + tokenizer).
    model_id : str
        Hub id, alias target or local path.
    revision : str or None
        Commit hash of the checkpoint when known.
    """

    name: ClassVar[str] = "llava"
    rope_dims: ClassVar[int] = 1
    architecture: ClassVar[type[Architecture]] = LlavaArchitecture

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str = "cpu", dtype: Any = "float32",
                        model_id: str | None = None, revision: str | None = None,
                        hub_kwargs: dict[str, Any] | None = None, **options: Any) -> "LlavaAdapter":
        """Load model and processor from a local checkpoint folder (or a hub id the cache/hub can serve).

        ``options`` exist for a uniform call with other adapters; any that is not None is an error
        (e.g. ``min_pixels``: LLaVA-1.5 always sees a fixed 336x336 crop).
        """
        kwargs = cls._load_kwargs("LLaVA", device=device, dtype=dtype, hub_kwargs=hub_kwargs, options=options)
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(str(path), **kwargs).eval()
        processor = AutoProcessor.from_pretrained(str(path), **(hub_kwargs or {}))
        return cls(model, processor, model_id=model_id or str(path), revision=revision)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the vision tower's patch grid from the config (24x24 for LLaVA-1.5)."""
        return self.arch.fixed_grid()

    def prompt(self, question: str) -> str:
        """The LLaVA-1.5 prompt for ``question``.

        Uses the processor's chat template when it has one that places images (llava-hf checkpoints
        ship one); a text-only template inherited from the tokenizer is not used.
        """
        template = getattr(self.processor, "chat_template", None)
        if isinstance(template, str) and "image" in template:
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return LLAVA_PROMPT.format(question=question)

    def prepare(self, image: Any, question: str) -> dict[str, Any]:
        """Inputs for one image and question: input_ids, attention_mask (1, S) and pixel_values
        (1, 3, H, W) in the model dtype, on the model device."""
        if not isinstance(question, str) or not question.strip():
            raise PosbiasError("question is empty; pass a non-empty question string")
        image = image.convert("RGB") if hasattr(image, "convert") else image
        batch = self.processor(images=image, text=self.prompt(question), return_tensors="pt")
        return self._to_device(batch)

    # ------------------------------------------------------------------ kept for callers of the adapter
    def vision_feature_layers(self) -> list[int]:
        """:meth:`LlavaArchitecture.vision_feature_layers`."""
        return self.arch.vision_feature_layers()
