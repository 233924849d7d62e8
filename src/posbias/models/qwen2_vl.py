"""Adapter for Qwen2-VL (transformers ``Qwen2VLForConditionalGeneration``), and the Qwen-VL family base.

Qwen2-VL resizes each image to multiples of 28 pixels within ``[min_pixels, max_pixels]``, cuts it into
14x14 patches (grid ``h x w``), runs a ViT in which EVERY block attends over the whole image (no
windows), and merges each 2x2 patch block into one token: the decoder sees ``(h/2) * (w/2)`` visual
tokens in raster order over the merged grid, with no [CLS]. The image processor already orders the
patches merge unit by merge unit (the 4 patches of merged token ``u`` are rows ``4u .. 4u + 3`` of the
tower's sequence), so the tower's order IS the LLM's raster order. Positions are M-RoPE (t, h, w): an
image starting at sequence position ``s`` gets ``t = s``, ``h = s + row``, ``w = s + col``; text after
it resumes at ``s + max(rows, cols)``.

Qwen2.5-VL (:mod:`posbias.models.qwen2_5_vl`) is the same design plus windowed attention in most
vision blocks, which permutes the tower's sequence; its adapter subclasses :class:`Qwen2VLAdapter` and
overrides only what the windows change (which blocks define vision importance, and the unit order).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from posbias.errors import PosbiasError
from posbias.models.base import TransformersAdapter, VisualLayout, resolve_dtype

__all__ = ["Qwen2VLAdapter", "QWEN_PROMPT", "QWEN_CHAT_TEMPLATE"]

#: ChatML prompt of Qwen2-VL / Qwen2.5-VL Instruct with one image before the question
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


class Qwen2VLAdapter(TransformersAdapter):
    """Qwen2-VL behind the :class:`~posbias.models.base.ModelAdapter` interface.

    Parameters
    ----------
    model : transformers.Qwen2VLForConditionalGeneration
        Loaded model in eval mode.
    processor : posbias.models.processors.QwenImageProcessor
        Image processor + tokenizer; its ``min_pixels``/``max_pixels`` decide the token count.
    model_id : str
        Hub id, alias target or local path.
    revision : str or None
        Commit hash of the checkpoint when known.
    """

    name: ClassVar[str] = "qwen2_vl"
    rope_dims: ClassVar[int] = 3
    #: the transformers class :meth:`from_pretrained` loads
    hf_class: ClassVar[str] = "Qwen2VLForConditionalGeneration"
    #: readable architecture name for messages
    label: ClassVar[str] = "Qwen2-VL"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str = "cpu", dtype: Any = "float32",
                        model_id: str | None = None, revision: str | None = None,
                        hub_kwargs: dict[str, Any] | None = None,
                        min_pixels: int | None = None, max_pixels: int | None = None) -> "Qwen2VLAdapter":
        """Load model and processor from a local checkpoint folder.

        ``min_pixels``/``max_pixels`` override the image processor's limits (merged visual tokens per
        image are about ``pixels / 784``).
        """
        import transformers

        from posbias.models.processors import load_qwen_processor

        torch_dtype = resolve_dtype(dtype)
        kwargs: dict[str, Any] = {"dtype": torch_dtype, **(hub_kwargs or {})}
        if str(device) != "cpu":
            kwargs["device_map"] = str(device)
        model = getattr(transformers, cls.hf_class).from_pretrained(str(path), **kwargs).eval()
        processor = load_qwen_processor(path, min_pixels=min_pixels, max_pixels=max_pixels,
                                        hub_kwargs=hub_kwargs)
        return cls(model, processor, model_id=model_id or str(path), revision=revision)

    @property
    def image_token_id(self) -> int:
        """Token id of ``<|image_pad|>``."""
        return int(self.model.config.image_token_id)

    @property
    def merge_size(self) -> int:
        """Spatial merge (2 for Qwen2-VL and Qwen2.5-VL)."""
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

    # ------------------------------------------------------------------ signal hooks (issue 3)
    vision_importance_kind: ClassVar[str] = "colmean"

    def vision_tower(self) -> Any:
        """``model.model.visual`` (the ViT; its blocks and merger)."""
        return self.model.model.visual

    def vision_importance_modules(self) -> list[Any]:
        """The attention of the LAST vision block: every Qwen2-VL block attends over the whole image, and
        the last one's output is what the merger reads (as LLaVA's importance comes from its feature layer)."""
        return [self.vision_tower().blocks[-1].attn]

    def _unpermute_units(self, values: Any, inputs: dict[str, Any]) -> Any:
        """Rows of ``values`` (V, ...) in the tower's merge-unit order -> raster order of the merged grid.

        Qwen2-VL's tower keeps the processor's order, which is already raster over the merged grid.
        """
        grid_thw = inputs["image_grid_thw"]  # (1, 3) int64
        n_units = int(grid_thw[0].prod()) // self.merge_size**2
        if n_units != values.shape[0]:
            raise PosbiasError(
                f"vision tower produced {values.shape[0]} merge units but the image grid implies "
                f"{n_units}; pass one still image per prompt"
            )
        return values

    def vision_importance_tokens(self, records: list[Any], inputs: dict[str, Any]) -> Any:
        """VisionZip's no-[CLS] importance in the LLM's token order.

        ``records`` hold one (N,) vector per module of :meth:`vision_importance_modules`: the mean, over
        all N query patches and all heads, of the attention each patch receives (tower order). They are
        averaged over modules, then over the 4 patches of each 2x2 merge unit, then put in raster order
        over the merged grid (:meth:`_unpermute_units`): (V,) with V = N / 4.
        """
        import torch

        colmean = torch.stack([r.float() for r in records], dim=0).mean(dim=0)  # (N,)
        unit = self.merge_size**2
        if colmean.shape[0] % unit:
            raise PosbiasError(f"vision tower saw {colmean.shape[0]} patches, not a multiple of {unit}")
        per_unit = colmean.reshape(-1, unit).mean(dim=1)  # (V,) tower order
        return self._unpermute_units(per_unit, inputs)  # (V,)

    def vision_feature_module(self) -> Any:
        """``model.model.visual.merger``: its input is the last ViT block's output (tower order)."""
        return self.vision_tower().merger

    def vision_features_tokens(self, features: Any, inputs: dict[str, Any]) -> Any:
        """(V, 4 * D_v): each merged token's 4 patch features concatenated (what the merger's MLP reads,
        before its norm), in raster order over the merged grid."""
        unit = self.merge_size**2
        if features.dim() != 2 or features.shape[0] % unit:
            raise PosbiasError(f"merger input of shape {tuple(features.shape)}: pass one still image per prompt")
        units = features.reshape(features.shape[0] // unit, unit * features.shape[1])  # (V, 4 * D_v)
        return self._unpermute_units(units, inputs)
