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
from posbias.models.base import TransformersAdapter, VisualLayout, resolve_dtype

__all__ = ["LlavaAdapter", "LLAVA_PROMPT", "LLAVA_CHAT_TEMPLATE"]

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

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str = "cpu", dtype: Any = "float32",
                        model_id: str | None = None, revision: str | None = None,
                        hub_kwargs: dict[str, Any] | None = None, **options: Any) -> "LlavaAdapter":
        """Load model and processor from a local checkpoint folder (or a hub id the cache/hub can serve).

        ``options`` exist for a uniform call with other adapters; any that is not None is an error
        (e.g. ``min_pixels``: LLaVA-1.5 always sees a fixed 336x336 crop).
        """
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise PosbiasError(f"options {given} do not apply to LLaVA models; drop them")
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        torch_dtype = resolve_dtype(dtype)
        kwargs: dict[str, Any] = {"dtype": torch_dtype, **(hub_kwargs or {})}
        if str(device) != "cpu":
            kwargs["device_map"] = str(device)
        model = LlavaForConditionalGeneration.from_pretrained(str(path), **kwargs).eval()
        processor = AutoProcessor.from_pretrained(str(path), **(hub_kwargs or {}))
        return cls(model, processor, model_id=model_id or str(path), revision=revision)

    @property
    def image_token_id(self) -> int:
        """Token id of the ``<image>`` placeholder in ``input_ids``."""
        return int(self.model.config.image_token_id)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the vision tower's patch grid from the config (24x24 for LLaVA-1.5)."""
        vc = self.model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return side, side

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

    def layout(self, inputs: dict[str, Any]) -> VisualLayout:
        """Visual positions = positions of ``image_token_id``; raster rows/cols over the square grid;
        1-D RoPE positions (V, 1) (cumulative attention mask - 1, = visual_index without padding)."""
        input_ids = inputs["input_ids"]  # (1, S) int64
        if input_ids.shape[0] != 1:
            raise PosbiasError(f"inputs hold a batch of {input_ids.shape[0]}; pass one prompt at a time")
        ids = input_ids[0].detach().cpu().numpy()  # (S,) int64
        visual_index = np.flatnonzero(ids == self.image_token_id).astype(np.int64)  # (V,)
        n_visual = int(visual_index.shape[0])
        if n_visual == 0:
            raise PosbiasError("the prompt holds no <image> token; build inputs with adapter.prepare(image, question)")
        side = math.isqrt(n_visual)
        if side * side != n_visual:
            raise PosbiasError(
                f"the prompt holds {n_visual} image tokens, not a square grid; pass exactly one image per prompt"
            )
        order = np.arange(n_visual, dtype=np.int64)  # (V,)
        rows, cols = order // side, order % side  # (V,), (V,)
        mask = inputs.get("attention_mask")
        if mask is not None:
            m = mask[0].detach().cpu().numpy().astype(np.int64)  # (S,)
            positions = np.cumsum(m) - 1  # (S,) int64
        else:
            positions = np.arange(ids.shape[0], dtype=np.int64)  # (S,)
        position_ids = positions[visual_index][:, None].astype(np.int64)  # (V, 1)
        return VisualLayout(
            visual_index=visual_index,
            rows=rows,
            cols=cols,
            grid=(side, side),
            position_ids=position_ids,
            seq_len=int(ids.shape[0]),
        )

    # ------------------------------------------------------------------ signal hooks (issue 3)
    vision_importance_kind: ClassVar[str] = "cls"

    def vision_feature_layers(self) -> list[int]:
        """Encoder-layer indices (0-based) whose outputs are the features the projector reads.

        ``vision_feature_layer`` indexes CLIP's ``hidden_states`` tuple (patch embeddings first, then one
        entry per encoder layer), so hidden state ``h >= 1`` is the output of encoder layer ``h - 1``;
        the default -2 is the penultimate layer's output.
        """
        config = self.model.config
        n = int(config.vision_config.num_hidden_layers)
        fl = config.vision_feature_layer
        wanted = [int(fl)] if isinstance(fl, int) else [int(x) for x in fl]
        layers: list[int] = []
        for h in wanted:
            idx = h % (n + 1)
            if idx == 0:
                raise PosbiasError(
                    f"vision_feature_layer {h} selects the patch embeddings (no attention map); "
                    "vision_importance needs an encoder layer: drop vision_importance from the signals"
                )
            layers.append(idx - 1)
        return layers

    def vision_tower(self) -> Any:
        """``model.model.vision_tower`` (a ``CLIPVisionModel``)."""
        return self.model.model.vision_tower

    def vision_importance_modules(self) -> list[Any]:
        """The CLIP self-attention of the layer(s) producing the features the projector uses."""
        tower = self.vision_tower()
        encoder = getattr(tower, "encoder", None) or tower.vision_model.encoder  # 5.x flat / 4.x nested
        layers = encoder.layers
        return [layers[i].self_attn for i in self.vision_feature_layers()]

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
                "vision_importance supports 'default' only (drop it from the signals)"
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
