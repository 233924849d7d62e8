"""Adapter for Qwen2.5-VL (transformers ``Qwen2_5_VLForConditionalGeneration``).

Qwen2.5-VL resizes each image to multiples of 28 pixels within ``[min_pixels, max_pixels]``, cuts it
into 14x14 patches (grid ``h x w``), runs a ViT with windowed attention (a few full-attention blocks),
and merges each 2x2 patch block into one token: the decoder sees ``(h/2) * (w/2)`` visual tokens in
raster order over the merged grid, with no [CLS]. Positions are M-RoPE (t, h, w): an image starting at
sequence position ``s`` gets ``t = s``, ``h = s + row``, ``w = s + col``; text after it resumes at
``s + max(rows, cols)``.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from posbias.errors import PosbiasError
from posbias.models.base import TransformersAdapter, VisualLayout, resolve_dtype

__all__ = ["Qwen25VLAdapter", "QWEN_PROMPT", "QWEN_CHAT_TEMPLATE"]

#: ChatML prompt of Qwen2.5-VL-Instruct with one image before the question
QWEN_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)


#: a ChatML chat template that renders ``[user: image + question]`` as :data:`QWEN_PROMPT`
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen25VLAdapter(TransformersAdapter):
    """Qwen2.5-VL behind the :class:`~posbias.models.base.ModelAdapter` interface.

    Parameters
    ----------
    model : transformers.Qwen2_5_VLForConditionalGeneration
        Loaded model in eval mode.
    processor : posbias.models.processors.QwenImageProcessor
        Image processor + tokenizer; its ``min_pixels``/``max_pixels`` decide the token count.
    model_id : str
        Hub id, alias target or local path.
    revision : str or None
        Commit hash of the checkpoint when known.
    """

    name: ClassVar[str] = "qwen2_5_vl"
    rope_dims: ClassVar[int] = 3

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str = "cpu", dtype: Any = "float32",
                        model_id: str | None = None, revision: str | None = None,
                        hub_kwargs: dict[str, Any] | None = None,
                        min_pixels: int | None = None, max_pixels: int | None = None) -> "Qwen25VLAdapter":
        """Load model and processor from a local checkpoint folder.

        ``min_pixels``/``max_pixels`` override the image processor's limits (merged visual tokens per
        image are about ``pixels / 784``).
        """
        from transformers import Qwen2_5_VLForConditionalGeneration

        from posbias.models.processors import load_qwen_processor

        torch_dtype = resolve_dtype(dtype)
        kwargs: dict[str, Any] = {"dtype": torch_dtype, **(hub_kwargs or {})}
        if str(device) != "cpu":
            kwargs["device_map"] = str(device)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), **kwargs).eval()
        processor = load_qwen_processor(path, min_pixels=min_pixels, max_pixels=max_pixels,
                                        hub_kwargs=hub_kwargs)
        return cls(model, processor, model_id=model_id or str(path), revision=revision)

    @property
    def image_token_id(self) -> int:
        """Token id of ``<|image_pad|>``."""
        return int(self.model.config.image_token_id)

    @property
    def merge_size(self) -> int:
        """Spatial merge (2 for Qwen2.5-VL)."""
        return int(self.model.config.vision_config.spatial_merge_size)

    def set_pixel_limits(self, *, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """Change the image processor's pixel limits (and so the number of visual tokens)."""
        size = dict(self.processor.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        if size["shortest_edge"] > size["longest_edge"]:
            raise PosbiasError(
                f"min_pixels {size['shortest_edge']} exceeds max_pixels {size['longest_edge']}; pass min <= max"
            )
        self.processor.image_processor.size = size

    def prompt(self, question: str) -> str:
        """The ChatML prompt with one image placeholder before ``question``."""
        return QWEN_PROMPT.format(question=question)

    def prepare(self, image: Any, question: str) -> dict[str, Any]:
        """Inputs for one image and question: input_ids, attention_mask, mm_token_type_ids (1, S),
        pixel_values (n_patches, C*T*P*P) in the model dtype and image_grid_thw (1, 3), on the model device."""
        if not isinstance(question, str) or not question.strip():
            raise PosbiasError("question is empty; pass a non-empty question string")
        image = image.convert("RGB") if hasattr(image, "convert") else image
        batch = self.processor(images=[image], text=[self.prompt(question)], return_tensors="pt")
        out = self._to_device(batch)
        if "mm_token_type_ids" not in out:  # M-RoPE silently falls back to 1-D positions without it
            out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).long()
        return out

    def layout(self, inputs: dict[str, Any]) -> VisualLayout:
        """Visual positions of ``<|image_pad|>``; raster rows/cols over the merged (h/2, w/2) grid;
        M-RoPE position ids (V, 3) from ``model.model.get_rope_index``."""
        import torch

        input_ids = inputs["input_ids"]  # (1, S) int64
        if input_ids.shape[0] != 1:
            raise PosbiasError(f"inputs hold a batch of {input_ids.shape[0]}; pass one prompt at a time")
        grid_thw = inputs.get("image_grid_thw")
        if grid_thw is None or grid_thw.shape[0] != 1:
            raise PosbiasError("inputs need image_grid_thw for exactly one image; build them with adapter.prepare")
        ids = input_ids[0].detach().cpu().numpy()  # (S,)
        visual_index = np.flatnonzero(ids == self.image_token_id).astype(np.int64)  # (V,)
        t, h, w = (int(x) for x in grid_thw[0].tolist())
        gh, gw = h // self.merge_size, w // self.merge_size
        n_visual = int(visual_index.shape[0])
        if t != 1 or n_visual != gh * gw:
            raise PosbiasError(
                f"prompt holds {n_visual} image tokens but image_grid_thw {[t, h, w]} implies {t * gh * gw}; "
                "pass exactly one still image per prompt"
            )
        order = np.arange(n_visual, dtype=np.int64)  # (V,)
        rows, cols = order // gw, order % gw
        mm = inputs.get("mm_token_type_ids")
        if mm is None:
            mm = (input_ids == self.image_token_id).long()  # (1, S)
        with torch.no_grad():
            pos, _ = self.model.model.get_rope_index(
                input_ids, mm, image_grid_thw=grid_thw, attention_mask=inputs.get("attention_mask")
            )  # (3, 1, S)
        pos_np = pos[:, 0, :].detach().cpu().numpy().astype(np.int64)  # (3, S)
        position_ids = np.ascontiguousarray(pos_np[:, visual_index].T)  # (V, 3)
        return VisualLayout(
            visual_index=visual_index,
            rows=rows,
            cols=cols,
            grid=(gh, gw),
            position_ids=position_ids,
            seq_len=int(ids.shape[0]),
        )
