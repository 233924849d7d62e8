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
from posbias.models.base import Architecture, TokenGrid, TransformersAdapter, resolve_dtype

__all__ = ["Qwen2VLArchitecture", "Qwen2VLAdapter", "QWEN_PROMPT", "QWEN_CHAT_TEMPLATE"]

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


class Qwen2VLArchitecture(Architecture):
    """Qwen2-VL: the merged (h/2, w/2) grid per image, raster order, M-RoPE (t, h, w), no [CLS]: vision
    importance is the mean attention each patch receives at the last (global) block."""

    model_type: ClassVar[str] = "qwen2_vl"
    label: ClassVar[str] = "Qwen2-VL"
    rope_dims: ClassVar[int] = 3
    placeholder: ClassVar[str] = "<|image_pad|>"
    vision_importance_kind: ClassVar[str] = "colmean"

    @property
    def merge_size(self) -> int:
        """Spatial merge (2 for Qwen2-VL and Qwen2.5-VL)."""
        return int(self.model.config.vision_config.spatial_merge_size)

    def token_grid(self, inputs: dict[str, Any], visual_index: np.ndarray) -> TokenGrid:
        """Raster rows/cols over the merged grid of ``image_grid_thw``; without it (``generate`` passes
        precomputed vision outputs) the grid the image tokens' M-RoPE ``position_ids`` (3, 1, S) span."""
        import torch

        n_visual = int(visual_index.shape[0])
        thw = inputs.get("image_grid_thw")
        pos = inputs.get("position_ids")
        if thw is None and isinstance(pos, torch.Tensor) and pos.ndim == 3:
            hw = pos[-2:, 0].index_select(-1, torch.as_tensor(visual_index, device=pos.device))  # (2, V) h, w
            rows = int(hw[0].max() - hw[0].min()) + 1
            cols = int(hw[1].max() - hw[1].min()) + 1
            if rows * cols != n_visual:
                raise PosbiasError(f"the image tokens' M-RoPE positions span {rows}x{cols}, not {n_visual}; pass one image")
            return TokenGrid.raster((rows, cols))
        if thw is None or thw.shape[0] != 1:
            raise PosbiasError("inputs need image_grid_thw for exactly one image per prompt; build them with adapter.prepare")
        t, h, w = (int(x) for x in thw[0].tolist())
        gh, gw = h // self.merge_size, w // self.merge_size
        if t != 1 or n_visual != gh * gw:
            raise PosbiasError(
                f"prompt holds {n_visual} image tokens but image_grid_thw {[t, h, w]} implies {t * gh * gw}; "
                "pass exactly one still image per prompt"
            )
        return TokenGrid.raster((gh, gw))

    def position_ids(self, inputs: dict[str, Any], visual_index: np.ndarray) -> np.ndarray:
        """(V, 3) M-RoPE position ids from ``model.model.get_rope_index``."""
        import torch

        input_ids = inputs["input_ids"]  # (1, S)
        mm = inputs.get("mm_token_type_ids")
        if mm is None:
            mm = (input_ids == self.image_token_id).long()  # (1, S)
        with torch.no_grad():
            pos, _ = self.model.model.get_rope_index(
                input_ids, mm, image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs.get("attention_mask")
            )  # (3, 1, S)
        pos_np = pos[:, 0, :].detach().cpu().numpy().astype(np.int64)  # (3, S)
        return np.ascontiguousarray(pos_np[:, visual_index].T)  # (V, 3)

    # ------------------------------------------------------------------ vision importance
    def vision_tower(self) -> Any:
        """``model.model.visual`` (the ViT; its blocks and merger)."""
        return self.model.model.visual

    def vision_importance_modules(self) -> list[Any]:
        """The attention of the LAST vision block: every Qwen2-VL block attends over the whole image, and
        the last one's output is what the merger reads (as LLaVA's importance comes from its feature layer)."""
        return [self.vision_tower().blocks[-1].attn]

    def vision_query_key(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any, float, list[int]]:
        """Queries and keys (after the tower's 2-D RoPE) of a vision block from its input patches."""
        from posbias.kernels import apply_rope

        hidden = args[0] if args else kwargs["hidden_states"]  # (P, C) patches in the tower's order
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        cos, sin = kwargs["position_embeddings"]  # (P, D) each
        p = int(hidden.shape[0])
        qkv = module.qkv(hidden).float().reshape(p, 3, module.num_heads, -1).permute(1, 0, 2, 3)  # (3, P, H, D)
        c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # (P, 1, D)
        q = apply_rope(qkv[0], c, s).transpose(0, 1)  # (H, P, D)
        k = apply_rope(qkv[1], c, s).transpose(0, 1)  # (H, P, D)
        scale = float(getattr(module, "scaling", q.shape[-1] ** -0.5))
        bounds = [int(x) for x in cu.tolist()] if cu is not None else [0, p]
        return q, k, scale, bounds

    def vision_context(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``{"image_grid_thw": grid_thw}`` from a call of the vision tower."""
        return {"image_grid_thw": kwargs.get("grid_thw", args[1] if len(args) > 1 else None)}

    def unit_order(self, inputs: dict[str, Any]) -> Any:
        """(V,) int64: entry ``u`` is the raster index of the merge unit at position ``u`` of the tower's
        sequence, or None when the tower keeps the raster order (Qwen2-VL: the processor's order)."""
        return None

    def _unpermute_units(self, values: Any, inputs: dict[str, Any]) -> Any:
        """Rows of ``values`` (V, ...) in the tower's merge-unit order -> raster order of the merged grid."""
        import torch

        grid_thw = inputs["image_grid_thw"]  # (1, 3) int64
        n_units = int(grid_thw[0].prod()) // self.merge_size**2
        if n_units != values.shape[0]:
            raise PosbiasError(
                f"vision tower produced {values.shape[0]} merge units but the image grid implies "
                f"{n_units}; pass one still image per prompt"
            )
        order = self.unit_order(inputs)
        if order is None:
            return values
        return values[torch.argsort(order.to(values.device))]  # (V, ...)

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
    architecture: ClassVar[type[Architecture]] = Qwen2VLArchitecture

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
    def merge_size(self) -> int:
        """Spatial merge (2 for Qwen2-VL and Qwen2.5-VL)."""
        return self.arch.merge_size

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
