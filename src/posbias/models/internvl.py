"""Adapter for InternVL (transformers ``InternVLForConditionalGeneration``, the native ``-hf`` checkpoints).

InternVL cuts an image into tiles (``GotOcr2ImageProcessor`` with ``crop_to_patches``): the tile canvas
(columns x rows of 448x448 crops, between ``min_patches`` and ``max_patches`` crops) is the one whose aspect
ratio is closest to the image's, the crops follow in row-major order and, when there is more than one crop,
a thumbnail of the whole image comes last. Each tile goes through InternViT on its own (a batch of tiles); the
[CLS] output is dropped, the 32x32 patch grid is pixel-shuffled 2x2 into 16x16 tokens (``downsample_ratio`` 0.5)
and projected. The prompt's image placeholder becomes ``<img>`` + ``<IMG_CONTEXT>`` x (256 x tiles) +
``</img>``: the decoder (Qwen2 / InternLM2 / Llama) sees the tiles one after the other, each in raster order,
with ordinary 1-D RoPE positions. ``<img>`` and ``</img>`` have their own token ids, so every visual token
belongs to a tile cell: InternVL has no separator tokens inside the image span.

posbias's layout: ``tile`` = tile index in sequence order (crops row-major, thumbnail last), ``rows``/``cols`` =
the token's cell in its tile's 16x16 grid, ``tiles`` = one (16, 16) grid per tile, ``overview`` = the thumbnail
(region density is measured on it: it is the only tile that shows the whole image).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from transformers import ProcessorMixin

from posbias.errors import PosbiasError
from posbias.models.base import Architecture, TilePlacement, TokenGrid, TransformersAdapter

__all__ = ["InternVLAdapter", "InternVLArchitecture", "InternVLImageTextProcessor", "load_internvl_processor",
           "INTERNVL_CHAT_TEMPLATE", "tokens_per_tile"]

#: the InternVL (Qwen2 chat) prompt with one image before the question
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

START_IMAGE = "<img>"
END_IMAGE = "</img>"
CONTEXT_IMAGE = "<IMG_CONTEXT>"


class InternVLImageTextProcessor(ProcessorMixin):
    """Image + text processor for InternVL (images only; no video, so no torchvision).

    transformers' ``InternVLProcessor`` cannot be built without torchvision (its video processor). This one
    does its image half: the image processor tiles the image, and each ``<IMG_CONTEXT>`` placeholder of the
    text becomes ``<img>`` + ``<IMG_CONTEXT>`` x (``image_seq_length`` x tiles) + ``</img>``.

    Parameters
    ----------
    image_processor : transformers.GotOcr2ImageProcessorPil
        Tiling image processor (``crop_to_patches=True`` for dynamic tiles).
    tokenizer : transformers.PreTrainedTokenizerBase
        Must know ``<img>``, ``</img>`` and ``<IMG_CONTEXT>``.
    chat_template : str, optional
    image_seq_length : int
        Visual tokens per tile (256 for 448 px tiles, patch 14, pixel shuffle 0.5).
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 image_seq_length: int = 256, **kwargs: Any) -> None:
        self.image_seq_length = int(image_seq_length)
        self.image_token = CONTEXT_IMAGE
        self.image_token_id = tokenizer.convert_tokens_to_ids(CONTEXT_IMAGE)
        for token in (START_IMAGE, END_IMAGE, CONTEXT_IMAGE):
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise PosbiasError(f"the tokenizer has no {token} token; it is not an InternVL tokenizer")
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles of image ``image_idx``) + ``</img>``."""
        n_tiles = int(image_inputs["num_patches"][image_idx])
        return START_IMAGE + self.image_token * (self.image_seq_length * n_tiles) + END_IMAGE

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = super().__call__(*args, **kwargs)
        out.pop("num_patches", None)  # the model counts tiles from pixel_values
        return out


def load_internvl_processor(path: str | os.PathLike, *, hub_kwargs: dict[str, Any] | None = None,
                            max_patches: int | None = None) -> InternVLImageTextProcessor:
    """Build an :class:`InternVLImageTextProcessor` from a checkpoint folder (or a hub id the cache serves).

    ``image_seq_length`` comes from the checkpoint's ``processor_config.json`` when it has one, else from the
    model config: (image_size / patch_size)^2 x downsample_ratio^2.
    """
    from transformers import AutoConfig, AutoTokenizer, GotOcr2ImageProcessorPil

    kwargs: dict[str, Any] = dict(hub_kwargs or {})
    if max_patches is not None:
        kwargs["max_patches"] = int(max_patches)
    image_processor = GotOcr2ImageProcessorPil.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), **(hub_kwargs or {}))
    seq_len = None
    proc_cfg = Path(str(path)) / "processor_config.json"
    if proc_cfg.is_file():
        with open(proc_cfg, encoding="utf-8") as fh:
            seq_len = json.load(fh).get("image_seq_length")
    if seq_len is None:
        seq_len = tokens_per_tile(AutoConfig.from_pretrained(str(path), **(hub_kwargs or {})))
    template = getattr(tokenizer, "chat_template", None)
    if not (isinstance(template, str) and "image" in template):
        template = INTERNVL_CHAT_TEMPLATE
    return InternVLImageTextProcessor(image_processor, tokenizer, chat_template=template,
                                      image_seq_length=int(seq_len))


def patches_per_side(config: Any) -> int:
    """InternViT patches along one side of a tile: image_size / patch_size (32 for 448 / 14)."""
    vc = config.vision_config
    size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    return int(size) // int(patch)


def tokens_per_tile(config: Any) -> int:
    """Visual tokens one tile gives: (image_size / patch_size)^2 x downsample_ratio^2 (256 for 448 / 14 / 0.5)."""
    side = patches_per_side(config)
    return int(round(side * side * float(config.downsample_ratio) ** 2))


class InternVLArchitecture(Architecture):
    """InternVL: tiles of a fixed token grid (crops row-major, thumbnail last), 1-D RoPE, [CLS] vision importance
    per tile averaged over each pixel-shuffle unit."""

    model_type: ClassVar[str] = "internvl"
    label: ClassVar[str] = "InternVL"
    rope_dims: ClassVar[int] = 1
    placeholder: ClassVar[str] = CONTEXT_IMAGE
    vision_importance_kind: ClassVar[str] = "cls"

    @property
    def tile_tokens(self) -> int:
        """Visual tokens per tile (256 for the released checkpoints)."""
        return tokens_per_tile(self.model.config)

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(rows, cols) of one tile's token grid after the pixel shuffle (16x16 for the released checkpoints)."""
        side = math.isqrt(self.tile_tokens)
        return side, side

    def token_grid(self, inputs: dict[str, Any], visual_index: np.ndarray) -> TokenGrid:
        """Tiles of :attr:`tile_tokens` tokens each, in sequence order; the last tile (the thumbnail when the image
        was cut) is the overview."""
        n_visual = int(visual_index.shape[0])
        per_tile = self.tile_tokens
        if n_visual % per_tile:
            raise PosbiasError(
                f"the prompt holds {n_visual} image tokens, not a whole number of {per_tile}-token tiles; "
                "pass exactly one image per prompt"
            )
        n_tiles = n_visual // per_tile
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None and int(pixel_values.shape[0]) != n_tiles:
            raise PosbiasError(
                f"pixel_values hold {int(pixel_values.shape[0])} tiles but the prompt has image tokens for {n_tiles}; "
                "pass exactly one image per prompt"
            )
        rows_t, cols_t = self.tile_grid
        j = np.arange(n_visual, dtype=np.int64)  # (V,)
        cell = j % per_tile  # (V,)
        return TokenGrid(rows=cell // cols_t, cols=cell % cols_t, tiles=((rows_t, cols_t),) * n_tiles,
                         tile=j // per_tile, overview=n_tiles - 1)

    # ------------------------------------------------------------------ vision importance
    def vision_feature_layer(self) -> int:
        """0-based InternViT layer whose output the projector reads (the hidden-states indexing of
        :func:`~posbias.models.llava.clip_feature_layers`; the released -1 is the last layer)."""
        from posbias.models.llava import clip_feature_layers

        fl = self.model.config.vision_feature_layer
        if not isinstance(fl, int):
            raise PosbiasError(f"vision_feature_layer {fl!r}: vision importance supports one feature layer")
        return clip_feature_layers(int(self.model.config.vision_config.num_hidden_layers), fl)[0]

    def vision_tower(self) -> Any:
        """``model.model.vision_tower`` (an ``InternVLVisionModel``, InternViT)."""
        return self.model.model.vision_tower

    def vision_importance_modules(self) -> list[Any]:
        """The InternViT self-attention of the layer whose output the projector reads."""
        return [self.vision_tower().encoder.layer[self.vision_feature_layer()].attention]

    def vision_query_key(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any, float, list[int]]:
        """Queries and keys of every tile of the tower's batch (after InternViT's q/k norms), tiles side by side
        along N, one attention block each."""
        hidden = args[0] if args else kwargs["hidden_states"]  # (T, 1+N, C) the tiles of one image
        t, n = int(hidden.shape[0]), int(hidden.shape[1])
        q = module.q_norm(module.q_proj(hidden)).float()  # (T, 1+N, H*D)
        k = module.k_norm(module.k_proj(hidden)).float()  # (T, 1+N, H*D)
        n_heads = int(module.num_heads)
        d = q.shape[-1] // n_heads
        q = q.reshape(t * n, n_heads, d).transpose(0, 1)  # (H, T*(1+N), D)
        k = k.reshape(t * n, n_heads, d).transpose(0, 1)  # (H, T*(1+N), D)
        return q, k, float(module.scale), list(range(0, t * n + 1, n))

    def vision_importance_tokens(self, records: list[Any], inputs: dict[str, Any]) -> Any:
        """[CLS] -> patch attention per tile (head mean), averaged over each 2x2 pixel-shuffle unit: (V,) in LLM
        token order (tile by tile, raster in the tile).

        ``records`` hold one vector per module: each tile's own [CLS] row (1 + patches), tiles in the tower's
        order (a (T, 1 + patches) block is accepted too).
        """
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise PosbiasError(
                f"vision_feature_select_strategy {strategy!r}: the LLM sees the [CLS] token too; "
                "vision importance supports 'default' only (drop vision_importance from the signals)"
            )
        side = patches_per_side(self.model.config)
        rec = records[0].float().reshape(-1, 1 + side * side)  # (T, 1+N)
        n_tiles = int(rec.shape[0])
        factor = int(round(1.0 / float(self.model.config.downsample_ratio)))
        patches = rec[:, 1:].reshape(n_tiles, side // factor, factor, side // factor, factor)  # (T, r, f, c, f)
        return patches.mean(dim=(2, 4)).reshape(-1)  # (T * r * c,) = (V,)

    def vision_feature_module(self) -> Any:
        """``model.model.multi_modal_projector``: its input is the pixel-shuffled InternViT output."""
        return self.model.model.multi_modal_projector

    def vision_features_tokens(self, features: Any, inputs: dict[str, Any]) -> Any:
        """(V, D_v) from the projector input (tiles, tokens per tile, D_v), tile by tile."""
        if features.dim() != 3:
            raise PosbiasError(f"projector input of shape {tuple(features.shape)}: pass one image per prompt")
        return features.reshape(-1, features.shape[-1])  # (V, D_v)

    @classmethod
    def crop_image(cls, image: Any) -> Any:
        """The whole image (the crops tile it and the thumbnail shows all of it)."""
        return image

    @classmethod
    def tile_placement(cls, size: tuple[int, int], tiles: Any) -> TilePlacement:
        """Crops on a columns x rows canvas over the whole image, row-major, then the thumbnail (the overview).

        ``crop_to_patches`` resizes the whole image to columns x rows crops, so crop ``i`` covers cell
        (``i // columns``, ``i % columns``) of the image. The canvas is the one the processor picks: of the
        arrangements with as many crops as the sample has (tiles - 1), the one whose width / height is closest
        to the image's (on a tie, the later one in the processor's order, as it picks for large images). One
        tile (an image the processor did not cut) covers the whole image and has no thumbnail.
        """
        h, w = (float(x) for x in size)
        n = len(tiles)
        if n == 1:
            return TilePlacement(boxes=np.array([[0.0, 0.0, h, w]]), overview=None)
        crops = n - 1
        aspect = w / h
        best, best_diff = (crops, 1), float("inf")
        for columns in range(1, crops + 1):  # the processor's order: width outer, ascending
            if crops % columns:
                continue
            diff = abs(aspect - columns / (crops // columns))
            if diff <= best_diff:
                best, best_diff = (columns, crops // columns), diff
        columns, rows = best
        i = np.arange(crops)
        r, c = i // columns, i % columns
        boxes = np.stack([r * h / rows, c * w / columns, (r + 1) * h / rows, (c + 1) * w / columns], axis=1)
        return TilePlacement(boxes=np.vstack([boxes, [[0.0, 0.0, h, w]]]).astype(np.float64), overview=n - 1)


class InternVLAdapter(TransformersAdapter):
    """InternVL (native transformers classes) behind the :class:`~posbias.models.base.ModelAdapter` interface.

    Parameters
    ----------
    model : transformers.InternVLForConditionalGeneration
        Loaded model in eval mode.
    processor : InternVLImageTextProcessor
        Its processor.
    model_id : str
        Hub id, alias target or local path.
    revision : str or None
        Commit hash of the checkpoint when known.
    """

    name: ClassVar[str] = "internvl"
    rope_dims: ClassVar[int] = 1
    architecture: ClassVar[type[Architecture]] = InternVLArchitecture
    #: the transformers class :meth:`from_pretrained` loads
    hf_class: ClassVar[str] = "InternVLForConditionalGeneration"
    #: readable architecture name for messages
    label: ClassVar[str] = "InternVL"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str = "cpu", dtype: Any = "float32",
                        model_id: str | None = None, revision: str | None = None,
                        hub_kwargs: dict[str, Any] | None = None, max_patches: int | None = None,
                        **options: Any) -> "InternVLAdapter":
        """Load model and processor from a local checkpoint folder (or a hub id the cache/hub can serve).

        ``max_patches`` overrides the processor's largest number of crops (12 in the released checkpoints;
        each crop adds 256 visual tokens). Other ``options`` that are not None are an error.
        """
        kwargs = cls._load_kwargs("InternVL", device=device, dtype=dtype, hub_kwargs=hub_kwargs, options=options)
        from transformers import InternVLForConditionalGeneration

        model = InternVLForConditionalGeneration.from_pretrained(str(path), **kwargs).eval()
        processor = load_internvl_processor(path, hub_kwargs=hub_kwargs, max_patches=max_patches)
        return cls(model, processor, model_id=model_id or str(path), revision=revision)

    def prompt(self, question: str) -> str:
        """The chat prompt with one image placeholder before ``question``."""
        template = getattr(self.processor, "chat_template", None) or INTERNVL_CHAT_TEMPLATE
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                                  chat_template=template)

    def prepare(self, image: Any, question: str) -> dict[str, Any]:
        """input_ids, attention_mask (1, S) and pixel_values (tiles, 3, H, W) on the model device."""
        if not isinstance(question, str) or not question.strip():
            raise PosbiasError("question is empty; pass a non-empty question string")
        image = image.convert("RGB") if hasattr(image, "convert") else image
        batch = self.processor(images=image, text=self.prompt(question), return_tensors="pt")
        return self._to_device(batch)
