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
from posbias.models.base import Architecture, TilePlacement, TokenGrid
from posbias.models.llava import LlavaAdapter, LlavaArchitecture

__all__ = ["LlavaNextAdapter", "LlavaNextArchitecture", "best_resolution", "anyres_layout", "AnyresPlan"]


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
        self._build(side, (gh, gw), (top, bottom, left, right))

    @classmethod
    def from_geometry(cls, side: int, crops: tuple[int, int], kept: tuple[int, int, int, int]) -> "AnyresPlan":
        """The plan of ``crops`` (gh, gw) crops of ``side``-patch sides whose padded raster keeps ``kept``."""
        plan = cls.__new__(cls)
        plan._build(int(side), (int(crops[0]), int(crops[1])), tuple(int(x) for x in kept))
        return plan

    def _build(self, side: int, crops: tuple[int, int], kept: tuple[int, ...]) -> None:
        gh, gw = crops
        top, bottom, left, right = kept
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


class LlavaNextArchitecture(LlavaArchitecture):
    """LLaVA-NeXT: base image (tile 0) + the unpadded high-resolution raster (tile 1) with a newline separator
    after each of its rows, 1-D RoPE, [CLS] vision importance per crop (see the module docstring).

    The token layout depends on the image's size. Prepared inputs carry ``image_sizes``; inside ``generate``
    the model receives the precomputed encoder outputs instead, and :meth:`token_grid` recovers the size's
    geometry from them (:meth:`plan_from_encoder`). :meth:`token_grid` remembers the plan of the prompt it
    laid out last, so the vision-importance mapping, which runs after it, maps the crops of that prompt.
    """

    model_type: ClassVar[str] = "llava_next"
    label: ClassVar[str] = "LLaVA-NeXT"

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self._plan: AnyresPlan | None = None

    def fixed_grid(self) -> None:
        """None: the token count depends on the image's size (any resolution)."""
        return None

    def plan(self, inputs: dict[str, Any]) -> AnyresPlan:
        """The :class:`AnyresPlan` of model inputs holding one image's ``image_sizes`` (else: the encoder
        outputs ``generate`` passes, :meth:`plan_from_encoder`)."""
        sizes = inputs.get("image_sizes")
        if sizes is None:
            encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
            if encoded is not None:
                return self.plan_from_encoder(encoded)
        if sizes is None or sizes.shape[0] != 1:
            raise PosbiasError("LLaVA-NeXT inputs need image_sizes for exactly one image; build them with adapter.prepare")
        h, w = (int(x) for x in sizes[0].tolist())
        return anyres_layout((h, w), self.model.config)

    def plan_from_encoder(self, encoded: Any) -> AnyresPlan:
        """The plan of one image from its encoder outputs (what ``generate`` hands the model).

        The packed features (``pooler_output``) show the newline rows (equal to ``image_newline``), hence the
        unpadded raster's (rows, cols); the tower's batch gives the number of crops. Among the pinpoint
        geometries that fit both, the one whose gathered projector outputs equal the packed features is it
        (pack_image_features copies rows without arithmetic).
        """
        import torch

        packed = encoded.pooler_output[0]  # (V, D)
        newline = self.model.model.image_newline.to(packed)
        sep = (packed == newline).all(dim=1).cpu().numpy()  # (V,)
        n_crops = int(encoded.last_hidden_state.shape[0])
        vc = self.model.config.vision_config
        side, crop_px = int(vc.image_size) // int(vc.patch_size), int(vc.image_size)
        nr = int(sep.sum())
        nc = (int(packed.shape[0]) - side * side - nr) // max(nr, 1)
        fits = []
        for ph, pw in self.model.config.image_grid_pinpoints or []:
            gh, gw = int(ph) // crop_px, int(pw) // crop_px
            ch, cw = gh * side, gw * side
            if 1 + gh * gw != n_crops:
                continue
            if nc == cw and nr <= ch and (ch - nr) % 2 == 0:
                fits.append(AnyresPlan.from_geometry(side, (gh, gw), ((ch - nr) // 2, ch - (ch - nr) // 2, 0, cw)))
            elif nr == ch and nc < cw and (cw - nc) % 2 == 0:
                fits.append(AnyresPlan.from_geometry(side, (gh, gw), (0, ch, (cw - nc) // 2, cw - (cw - nc) // 2)))
        fits = [f for f in fits if np.array_equal(f.separator, sep)]
        if len(fits) > 1:  # e.g. a square image on 1x2 or 2x1 crops: check against the projector's rows
            hidden = encoded.hidden_states[self.model.config.vision_feature_layer][:, 1:]  # (n_crops, N, C)
            with torch.no_grad():
                proj = self.model.model.multi_modal_projector(hidden)  # (n_crops, N, D)
            fits = [f for f in fits if torch.equal(f.gather(proj, fill=0.0)[~torch.as_tensor(sep)],
                                                   packed[~torch.as_tensor(sep)])]
        if len(fits) != 1:
            raise PosbiasError(
                f"cannot tell the any-resolution layout of {packed.shape[0]} image tokens ({n_crops} crops) from the "
                "encoder outputs; call the model with image_sizes (adapter.prepare) instead"
            )
        return fits[0]

    def token_grid(self, inputs: dict[str, Any], visual_index: np.ndarray) -> TokenGrid:
        """Two tiles (base image, high-resolution raster) and the newline separators of the prompt's image."""
        plan = self.plan(inputs)
        if visual_index.shape[0] != plan.tile.shape[0]:
            raise PosbiasError(
                f"the prompt holds {visual_index.shape[0]} image tokens but the image's any-resolution layout has "
                f"{plan.tile.shape[0]}; pass exactly one image per prompt, prepared with adapter.prepare"
            )
        self._plan = plan
        return TokenGrid(rows=plan.rows, cols=plan.cols, tiles=plan.tiles, tile=plan.tile, separator=plan.separator)

    # ------------------------------------------------------------------ vision importance
    def vision_query_key(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any, float, list[int]]:
        """Queries and keys of every crop of the tower's batch, crops side by side along N, one block each."""
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, 1+N, C) the crops of one image
        b, n = int(hidden.shape[0]), int(hidden.shape[1])
        q = module.q_proj(hidden).float()  # (B, 1+N, H*D)
        k = module.k_proj(hidden).float()  # (B, 1+N, H*D)
        n_heads = int(getattr(module, "num_heads", q.shape[-1] // module.head_dim))
        d = q.shape[-1] // n_heads
        q = q.reshape(b * n, n_heads, d).transpose(0, 1)  # (H, B*(1+N), D)
        k = k.reshape(b * n, n_heads, d).transpose(0, 1)  # (H, B*(1+N), D)
        return q, k, float(getattr(module, "scale", d ** -0.5)), list(range(0, b * n + 1, n))

    def vision_context(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Nothing: the tower's call does not carry the image size; the mapping uses the plan of the prompt
        :meth:`token_grid` laid out last (the pruner maps the records after that)."""
        return {}

    def vision_importance_tokens(self, records: list[Any], inputs: dict[str, Any]) -> Any:
        """[CLS] -> patch attention per crop, head mean, mean over feature layers; (V,) in LLM token order.

        ``records`` hold one (n_crops * (1 + side**2),) vector per module: each crop's own [CLS] row, crops in
        the tower's order. NaN at newline tokens (no vision-encoder origin).
        """
        import torch

        self._check_default_strategy()
        plan = self.plan(inputs) if inputs else self._plan
        if plan is None:
            raise PosbiasError("LLaVA-NeXT vision importance needs the prompt's layout first (image_sizes)")
        rows = torch.stack([r.float() for r in records], dim=0).mean(dim=0)  # (n_crops * (1+N),)
        return plan.gather(rows.reshape(plan.n_crops, -1)[:, 1:])  # (V,)

    def _check_default_strategy(self) -> None:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise PosbiasError(
                f"vision_feature_select_strategy {strategy!r}: the LLM sees the [CLS] token too; "
                "vision signals support 'default' only (drop them from the signals)"
            )

    def vision_features_tokens(self, features: Any, inputs: dict[str, Any]) -> Any:
        """(V, D_v) from the projector input (n_crops, side**2, D_v), in LLM token order; zeros at newlines."""
        if features.dim() != 3:
            raise PosbiasError(f"projector input of shape {tuple(features.shape)}: pass one image per prompt")
        return self.plan(inputs).gather(features, fill=0.0)  # (V, D_v)

    @classmethod
    def crop_image(cls, image: Any) -> Any:
        """The whole image (the base image and the unpadded raster both cover it)."""
        return image

    @classmethod
    def tile_placement(cls, size: tuple[int, int], tiles: Any) -> TilePlacement:
        """The base image (tile 0, the overview) covers the whole image; the unpadded raster (tile 1) covers it too,
        plus what is left of the padding at two of its edges.

        The processor resizes the image into the best resolution keeping its aspect ratio and pads the short side
        with black, centred; ``unpad`` then cuts whole token rows (or columns) of padding symmetrically. Along the
        side it did not pad, the raster's ``n`` tokens span the image exactly, so along the padded side the image
        spans ``m = n * (that side / the other side)`` of the raster's tokens, centred: the raster's box is the image
        widened by ``(raster tokens - m) / 2`` tokens at each end (less than a token; transformers' pad and unpad).
        """
        if len(tiles) != 2:
            raise PosbiasError(
                f"a LLaVA-NeXT sample has 2 tiles (base image, high-resolution raster), not {len(tiles)}; "
                "pass the tiles of one stored LLaVA-NeXT sample"
            )
        h, w = (float(x) for x in size)
        nr, nc = (float(x) for x in tiles[1])
        top, left, bottom, right = 0.0, 0.0, h, w
        if nc / nr <= w / h:  # the raster is no wider than the image: rows of padding were cut (or none)
            pad = (nr - nc * h / w) / 2.0 * (w / nc)  # leftover padding at the top and bottom, in image pixels
            top, bottom = -pad, h + pad
        else:
            pad = (nc - nr * w / h) / 2.0 * (h / nr)
            left, right = -pad, w + pad
        return TilePlacement(boxes=np.array([[0.0, 0.0, h, w], [top, left, bottom, right]]), overview=0)


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
    architecture: ClassVar[type[Architecture]] = LlavaNextArchitecture
    #: the transformers class :meth:`from_pretrained` loads
    hf_class: ClassVar[str] = "LlavaNextForConditionalGeneration"
    #: readable architecture name for messages
    label: ClassVar[str] = "LLaVA-NeXT"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str = "cpu", dtype: Any = "float32",
                        model_id: str | None = None, revision: str | None = None,
                        hub_kwargs: dict[str, Any] | None = None, **options: Any) -> "LlavaNextAdapter":
        """Load model and processor from a local checkpoint folder (or a hub id the cache/hub can serve).

        ``AutoProcessor`` gives ``LlavaNextProcessor`` with ``LlavaNextImageProcessorPil`` where torchvision is
        missing (and the processor's chat template). ``options`` that are not None are an error.
        """
        kwargs = cls._load_kwargs("LLaVA-NeXT", device=device, dtype=dtype, hub_kwargs=hub_kwargs, options=options)
        import transformers
        from transformers import AutoProcessor

        model = getattr(transformers, cls.hf_class).from_pretrained(str(path), **kwargs).eval()
        processor = AutoProcessor.from_pretrained(str(path), **(hub_kwargs or {}))
        return cls(model, processor, model_id=model_id or str(path), revision=revision)

    def prepare(self, image: Any, question: str) -> dict[str, Any]:
        """Inputs for one image and question: input_ids, attention_mask (1, S), pixel_values
        (1, 1 + gh*gw, 3, H, W) in the model dtype and image_sizes (1, 2) = (height, width), on the model device."""
        return super().prepare(image, question)

    def plan(self, inputs: dict[str, Any]) -> AnyresPlan:
        """The :class:`AnyresPlan` of prepared inputs (one image)."""
        return self.arch.plan(inputs)
