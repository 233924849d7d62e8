"""Adapter for LLaVA-NeXT / LLaVA-1.6 (transformers ``LlavaNextForConditionalGeneration``).

LLaVA-NeXT ("any resolution") picks, for each image, the resolution of ``image_grid_pinpoints`` that keeps
most of the image (``best_resolution``, height x width), resizes and pads the image to it and cuts it into
``gh x gw`` crops of the CLIP input size; a resized copy of the whole image (the *base* image) goes first.
CLIP encodes the ``1 + gh * gw`` crops as one batch (each crop its own ``s x s`` patch grid, s = 24 for
the 336 px towers), the projector maps every patch, and ``pack_image_features`` lays the result out for
the decoder:

1. the base image's ``s * s`` patches in raster order;
2. the crops put back together as ONE raster of ``gh * s`` rows by ``gw * s`` columns, with the rows (or
   columns) that only hold padding cut away symmetrically (``unpad``: the image's aspect ratio decides
   how many), and one ``image_newline`` embedding after every row.

All of these tokens sit where the prompt's ``<image>`` was expanded (the processor writes one
``<image>`` per token, newlines included) and take ordinary 1-D RoPE positions.

Layout (:class:`~posbias.models.base.VisualLayout`) chosen here:

- tile 0 = the base image, grid ``(s, s)``; tile 1 = the unpadded high-resolution raster, grid
  ``(rows kept, cols kept)``. The high-resolution part is ONE tile and not one tile per crop: the decoder
  sees it as one raster (a crop's row is continued by the next crop's row before the newline), unpadding
  cuts crops unevenly, and per-crop tiles would interleave in sequence order (a tile's tokens would not be
  contiguous). Spatial neighbourhoods inside tile 1 therefore do cross crop seams, as the decoder's own
  row order does; they never join the base image and the high-resolution raster.
- ``image_newline`` tokens are flagged ``separator``, carry the row they end and column -1, and are not
  grid cells.

Vision importance ([CLS] row, PosPrune Eq. 2 / LLaVA's feature layer as in :mod:`posbias.models.llava`) is
taken per crop (each crop is its own CLIP forward with its own [CLS]) and carried to the LLM's token order
by the same crop -> raster -> unpad mapping as the features; a newline token has no vision-encoder
origin, so its importance is NaN (not defined). Region log-det features follow the same mapping; the
region blocks are defined on the base image (tile 0, the fixed ``s x s`` grid every sample shares).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from posbias.errors import PosbiasError
from posbias.models.base import VisualLayout, resolve_dtype
from posbias.models.llava import LlavaAdapter

__all__ = ["LlavaNextAdapter", "best_resolution", "anyres_layout", "AnyresPlan"]


def best_resolution(image_hw: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) of ``pinpoints`` LLaVA-NeXT resizes an image of ``image_hw`` to.

    The one that keeps the most image pixels after an aspect-preserving downscale (at most the image's own
    pixels), ties broken by the least padding.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(int(pw) / w, int(ph) / h)
        dh, dw = int(h * scale), int(w * scale)
        effective = min(dh * dw, h * w)
        waste = int(ph) * int(pw) - effective
        if effective > best_eff or (effective == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), effective, waste
    if best is None:
        raise PosbiasError("the model config has no image_grid_pinpoints; pass a LLaVA-NeXT checkpoint")
    return best


class AnyresPlan:
    """Where each visual token of one LLaVA-NeXT image comes from.

    Attributes
    ----------
    side : int
        Patches per crop side (``image_size // patch_size``).
    crops : (int, int)
        (gh, gw) crops of the high-resolution part.
    kept : (int, int, int, int)
        (top, bottom, left, right): the rows ``top:bottom`` and columns ``left:right`` of the padded
        ``gh * side x gw * side`` raster that survive unpadding.
    tile, rows, cols, separator : np.ndarray
        (V,) the layout fields (see :class:`~posbias.models.base.VisualLayout`).
    source : np.ndarray
        (V,) int64 index into the tower's patches flattened over (crop, patch): ``crop * side**2 + patch``,
        crop 0 = the base image; -1 for newline tokens.
    """

    def __init__(self, image_hw: tuple[int, int], pinpoints: list[tuple[int, int]], crop_px: int,
                 patch_px: int) -> None:
        side = int(crop_px) // int(patch_px)
        bh, bw = best_resolution(image_hw, pinpoints)
        gh, gw = bh // int(crop_px), bw // int(crop_px)
        cur_h, cur_w = gh * side, gw * side
        oh, ow = int(image_hw[0]), int(image_hw[1])
        top, bottom, left, right = 0, cur_h, 0, cur_w
        if ow / oh > cur_w / cur_h:  # wider than the raster: padding rows above and below
            pad = (cur_h - int(round(oh * (cur_w / ow), 7))) // 2
            top, bottom = pad, cur_h - pad
        else:  # padding columns left and right (none when the aspect ratios agree)
            pad = (cur_w - int(round(ow * (cur_h / oh), 7))) // 2
            left, right = pad, cur_w - pad
        self.side, self.crops, self.kept = side, (gh, gw), (top, bottom, left, right)
        base = np.arange(side * side, dtype=np.int64)  # (s*s,)
        nr, nc = bottom - top, right - left
        r = np.repeat(np.arange(nr, dtype=np.int64), nc + 1)  # (nr*(nc+1),) row of each high-res token
        c = np.tile(np.append(np.arange(nc, dtype=np.int64), -1), nr)  # column, -1 = newline
        sep = c < 0
        pr, pc = r + top, np.where(sep, 0, c + left)  # padded-raster coordinates
        crop = 1 + (pr // side) * gw + pc // side
        src = crop * side * side + (pr % side) * side + pc % side
        self.tile = np.concatenate([np.zeros(side * side, np.int64), np.ones(r.shape[0], np.int64)])
        self.rows = np.concatenate([base // side, r])
        self.cols = np.concatenate([base % side, c])
        self.separator = np.concatenate([np.zeros(side * side, bool), sep])
        self.source = np.concatenate([base, np.where(sep, -1, src)])
        self.tiles = ((side, side), (int(nr), int(nc)))

    @property
    def n_crops(self) -> int:
        """Crops the tower encodes: the base image plus gh * gw."""
        return 1 + self.crops[0] * self.crops[1]

    def gather(self, per_patch: Any, fill: float = float("nan")) -> Any:
        """Rows of ``per_patch`` (n_crops, side**2, ...) in LLM token order: (V, ...); ``fill`` at newlines."""
        import torch

        flat = per_patch.reshape(per_patch.shape[0] * per_patch.shape[1], *per_patch.shape[2:])
        if flat.shape[0] != self.n_crops * self.side**2:
            raise PosbiasError(
                f"vision tower output holds {per_patch.shape[0]} crops of {per_patch.shape[1]} patches; the "
                f"image's any-resolution plan needs {self.n_crops} of {self.side**2}: pass one image per prompt"
            )
        idx = torch.as_tensor(np.maximum(self.source, 0), device=flat.device)
        out = flat.index_select(0, idx).clone()  # (V, ...)
        sep = torch.as_tensor(self.separator, device=flat.device)
        out[sep] = fill
        return out


def anyres_layout(image_hw: tuple[int, int], config: Any) -> AnyresPlan:
    """The :class:`AnyresPlan` of an image of ``image_hw`` (height, width) under a LLaVA-NeXT ``config``."""
    vc = config.vision_config
    pins = [tuple(int(x) for x in p) for p in (config.image_grid_pinpoints or [])]
    return AnyresPlan(image_hw, pins, int(vc.image_size), int(vc.patch_size))


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT behind the :class:`~posbias.models.base.ModelAdapter` interface (see the module docstring).

    Parameters
    ----------
    model : transformers.LlavaNextForConditionalGeneration
        Loaded model in eval mode.
    processor : transformers.LlavaNextProcessor
        Its processor (``LlavaNextImageProcessorPil`` + tokenizer: no torchvision needed).
    model_id : str
        Hub id, alias target or local path.
    revision : str or None
        Commit hash of the checkpoint when known.
    """

    name: ClassVar[str] = "llava_next"
    rope_dims: ClassVar[int] = 1
    #: the transformers class :meth:`from_pretrained` loads
    hf_class: ClassVar[str] = "LlavaNextForConditionalGeneration"
    #: readable architecture name for messages
    label: ClassVar[str] = "LLaVA-NeXT"
    #: one [CLS] row per crop of the tower's batch
    vision_importance_kind: ClassVar[str] = "cls_crops"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str = "cpu", dtype: Any = "float32",
                        model_id: str | None = None, revision: str | None = None,
                        hub_kwargs: dict[str, Any] | None = None, **options: Any) -> "LlavaNextAdapter":
        """Load model and processor from a local checkpoint folder (or a hub id the cache/hub can serve).

        ``AutoProcessor`` gives ``LlavaNextProcessor`` with ``LlavaNextImageProcessorPil`` where torchvision is
        missing (and the processor's chat template). ``options`` that are not None are an error.
        """
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise PosbiasError(f"options {given} do not apply to LLaVA-NeXT models; drop them")
        import transformers
        from transformers import AutoProcessor

        torch_dtype = resolve_dtype(dtype)
        kwargs: dict[str, Any] = {"dtype": torch_dtype, **(hub_kwargs or {})}
        if str(device) != "cpu":
            kwargs["device_map"] = str(device)
        model = getattr(transformers, cls.hf_class).from_pretrained(str(path), **kwargs).eval()
        processor = AutoProcessor.from_pretrained(str(path), **(hub_kwargs or {}))
        return cls(model, processor, model_id=model_id or str(path), revision=revision)

    def prepare(self, image: Any, question: str) -> dict[str, Any]:
        """Inputs for one image and question: input_ids, attention_mask (1, S), pixel_values
        (1, 1 + gh*gw, 3, H, W) in the model dtype and image_sizes (1, 2) = (height, width), on the model device."""
        return super().prepare(image, question)

    def plan(self, inputs: dict[str, Any]) -> AnyresPlan:
        """The :class:`AnyresPlan` of prepared inputs (one image)."""
        sizes = inputs.get("image_sizes")
        if sizes is None or sizes.shape[0] != 1:
            raise PosbiasError("inputs need image_sizes for exactly one image; build them with adapter.prepare")
        h, w = (int(x) for x in sizes[0].tolist())
        return anyres_layout((h, w), self.model.config)

    def layout(self, inputs: dict[str, Any]) -> VisualLayout:
        """Visual positions = positions of ``<image>`` (base image, high-resolution raster and newlines);
        two tiles (base, high-resolution raster), newlines as separators; 1-D RoPE positions (V, 1)."""
        input_ids = inputs["input_ids"]  # (1, S) int64
        if input_ids.shape[0] != 1:
            raise PosbiasError(f"inputs hold a batch of {input_ids.shape[0]}; pass one prompt at a time")
        ids = input_ids[0].detach().cpu().numpy()  # (S,)
        visual_index = np.flatnonzero(ids == self.image_token_id).astype(np.int64)  # (V,)
        plan = self.plan(inputs)
        if visual_index.shape[0] != plan.tile.shape[0]:
            raise PosbiasError(
                f"the prompt holds {visual_index.shape[0]} image tokens but the image's any-resolution layout has "
                f"{plan.tile.shape[0]}; pass exactly one image per prompt, prepared with adapter.prepare"
            )
        mask = inputs.get("attention_mask")
        if mask is not None:
            positions = np.cumsum(mask[0].detach().cpu().numpy().astype(np.int64)) - 1  # (S,)
        else:
            positions = np.arange(ids.shape[0], dtype=np.int64)  # (S,)
        return VisualLayout(
            visual_index=visual_index,
            rows=plan.rows,
            cols=plan.cols,
            grid=plan.tiles[0],
            position_ids=positions[visual_index][:, None].astype(np.int64),  # (V, 1)
            seq_len=int(ids.shape[0]),
            tile=plan.tile,
            tiles=plan.tiles,
            separator=plan.separator,
        )

    # ------------------------------------------------------------------ signal hooks
    def vision_importance_tokens(self, records: list[Any], inputs: dict[str, Any]) -> Any:
        """[CLS] -> patch attention per crop, head mean, mean over feature layers; (V,) in LLM token order.

        ``records`` hold one (n_crops, N) row block per module (N = 1 + side**2). NaN at newline tokens.
        """
        import torch

        self._check_default_strategy()
        rows = torch.stack([r.float() for r in records], dim=0).mean(dim=0)  # (n_crops, N)
        return self.plan(inputs).gather(rows[:, 1:])  # (V,)

    def _check_default_strategy(self) -> None:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise PosbiasError(
                f"vision_feature_select_strategy {strategy!r}: the LLM sees the [CLS] token too; "
                "vision signals support 'default' only (drop them from --signals)"
            )

    def vision_features_tokens(self, features: Any, inputs: dict[str, Any]) -> Any:
        """(V, D_v) from the projector input (n_crops, side**2, D_v), in LLM token order; zeros at newlines."""
        if features.dim() != 3:
            raise PosbiasError(f"projector input of shape {tuple(features.shape)}: pass one image per prompt")
        return self.plan(inputs).gather(features, fill=0.0)  # (V, D_v)
