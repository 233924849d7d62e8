"""The interfaces of an architecture: :class:`Architecture` (torch-only) and :class:`ModelAdapter`.

An :class:`Architecture` wraps one loaded transformers model (no processor) and answers everything the
runtime pruner, the profiler and the reports need to know about the architecture: which sequence positions
hold visual tokens, their layout as one or several grids (tiles), their RoPE position ids (1-D or M-RoPE),
which vision attention modules define the vision importance and how their records map to the LLM's token
order, the visual count when the architecture fixes it, and how the report crops a picture and where its
tiles lie in it. It imports torch and transformers only (never h5py, scipy or matplotlib), so
:mod:`posbias.runtime` may use it.

A :class:`ModelAdapter` adds what profiling needs on top: loading, the processor and the prompt
(``prepare``); its ``arch`` attribute is the :class:`Architecture` of its model and answers the rest.

Adding an architecture = one module under ``posbias/models/`` holding an :class:`Architecture` subclass and
a :class:`TransformersAdapter` subclass naming it, plus one line in
:data:`posbias.models.registry.ADAPTERS` (docs/architecture.md, "Adding an architecture").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "VisualLayout", "TokenGrid", "TilePlacement", "LayerAdditions", "Architecture", "ModelAdapter", "DTYPES",
    "resolve_dtype", "TransformersAdapter",
]

#: dtype strings accepted by :func:`resolve_dtype` and ``load_adapter``
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")


def resolve_dtype(dtype: Any) -> Any:
    """The ``torch.dtype`` for ``"float32"``, ``"float16"`` or ``"bfloat16"`` (a torch.dtype passes through).

    Raises
    ------
    posbias.errors.PosbiasError
        For any other value.
    """
    import torch

    from posbias.errors import PosbiasError

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PosbiasError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


@dataclass(frozen=True)
class VisualLayout:
    """Where the visual tokens of one prompt are.

    Attributes
    ----------
    visual_index : np.ndarray
        (V,) int64, ascending sequence positions of the visual tokens in ``input_ids`` (every position the
        image fills, separator / newline tokens included).
    rows, cols : np.ndarray
        (V,) int64, coordinates of each visual token in its tile (LLaVA-1.5: the 24x24 patch grid;
        Qwen2-VL / Qwen2.5-VL: the grid after the 2x2 merge; any-resolution models: the tile's own grid).
        A separator token carries the row it ends and column ``-1``.
    grid : tuple of int
        (rows, cols) of the first tile's grid; for one-tile layouts ``rows * cols == V``.
    position_ids : np.ndarray
        (V, P) int64 RoPE position ids of the visual tokens; P = 1 for 1-D RoPE, 3 for M-RoPE (t, h, w).
    seq_len : int
        Length of the whole prompt (text + visual tokens).
    tile : np.ndarray or None
        (V,) int64 tile (sub-image) index of each token, ascending in sequence order; None means one tile
        (all zeros).
    tiles : tuple of (int, int) or None
        Grid (rows, cols) of each tile, index = tile; None means ``(grid,)``.
    separator : np.ndarray or None
        (V,) bool, True for tokens that belong to no grid cell (LLaVA-NeXT's ``image_newline``, InternVL's
        tile boundary tokens when they share the image token id); None means no separators.
    overview : int
        The tile that shows the whole image (LLaVA-NeXT's base image = 0, InternVL's thumbnail = the last
        tile); region density (PosPrune's log-det) is measured on its grid. 0 for one-tile layouts.
    """

    visual_index: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    grid: tuple[int, int]
    position_ids: np.ndarray
    seq_len: int
    tile: np.ndarray | None = None
    tiles: tuple[tuple[int, int], ...] | None = None
    separator: np.ndarray | None = None
    overview: int = 0

    def __post_init__(self) -> None:
        v = int(np.asarray(self.visual_index).shape[0])
        if self.tile is None:
            object.__setattr__(self, "tile", np.zeros(v, dtype=np.int64))
        if self.tiles is None:
            object.__setattr__(self, "tiles", (tuple(int(x) for x in self.grid),))
        if self.separator is None:
            object.__setattr__(self, "separator", np.zeros(v, dtype=bool))

    @property
    def n_visual(self) -> int:
        return int(self.visual_index.shape[0])

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def visual_start(self) -> int:
        return int(self.visual_index[0])


@dataclass(frozen=True)
class TokenGrid:
    """Where each visual token sits: its tile and its cell (row, col) in that tile's grid.

    Attributes
    ----------
    rows, cols : np.ndarray
        (V,) int64 coordinates in the token's tile (a separator carries its row and column ``-1``).
    tiles : tuple of (int, int)
        Grid (rows, cols) of each tile, index = tile; ``tiles[0]`` is :attr:`grid`.
    tile : np.ndarray or None
        (V,) int64 tile index per token (None: one tile).
    separator : np.ndarray or None
        (V,) bool, True for tokens in no grid cell (None: no separators).
    overview : int
        The tile that shows the whole image (region density is measured on its grid); 0 by default.
    """

    rows: np.ndarray
    cols: np.ndarray
    tiles: tuple[tuple[int, int], ...]
    tile: np.ndarray | None = None
    separator: np.ndarray | None = None
    overview: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        return self.tiles[0]

    @classmethod
    def raster(cls, grid: tuple[int, int]) -> "TokenGrid":
        """One tile of ``grid`` in raster order (row-major), no separators."""
        r, c = int(grid[0]), int(grid[1])
        order = np.arange(r * c, dtype=np.int64)  # (V,)
        return cls(rows=order // c, cols=order % c, tiles=((r, c),))


@dataclass
class LayerAdditions:
    """Vectors a decoder adds to the hidden states of some prompt positions after its first layers (Qwen3-VL's
    deepstack: vision-tower features of intermediate blocks added at the visual positions).

    Attributes
    ----------
    mask : torch.Tensor
        (S,) bool over the full prompt: the positions that receive additions.
    embeds : list of torch.Tensor
        One (n, D) tensor per decoder layer ``0 .. len(embeds) - 1``, added after that layer to the ``n``
        positions of ``mask`` in ascending order.
    """

    mask: Any
    embeds: list[Any]

    def apply(self, hidden: Any, layer: int, seq_index: Any) -> Any:
        """``hidden`` (1, S_cur, D) after decoder layer ``layer`` with its additions, for the prompt positions
        ``seq_index`` (S_cur,) that are still in the sequence (the decoder's own arithmetic, restricted to them)."""
        import torch

        if layer >= len(self.embeds):
            return hidden
        mask = self.mask.to(seq_index.device)  # (S,)
        rank = torch.cumsum(mask.long(), 0) - 1  # (S,) row of each receiving position in embeds
        here = mask.index_select(0, seq_index)  # (S_cur,)
        local = torch.nonzero(here).flatten()  # (n_cur,) positions in the current sequence
        rows = rank.index_select(0, seq_index.index_select(0, local))  # (n_cur,)
        add = self.embeds[layer].index_select(0, rows.to(self.embeds[layer].device))  # (n_cur, D)
        out = hidden.clone()
        local = local.to(hidden.device)
        out[0, local] = out[0, local] + add.to(hidden.device, hidden.dtype)
        return out


@dataclass(frozen=True)
class TilePlacement:
    """Where the tiles of one image's visual tokens lie in the picture the report draws.

    Attributes
    ----------
    boxes : np.ndarray
        (N, 4) float64 (top, left, bottom, right) of each tile, index = tile, in pixels of the picture
        (:meth:`Architecture.crop_image` of the image); a tile's grid divides its box evenly.
    overview : int or None
        The tile that shows the whole image at low resolution (LLaVA-NeXT's base image, InternVL's thumbnail),
        drawn as a panel of its own; None when there is none (one-tile layouts).
    """

    boxes: np.ndarray
    overview: int | None = None


class Architecture:
    """What the runtime, the profiler and the reports know about one architecture, from a loaded model.

    Subclasses (one per ``config.model_type``, in the adapter's module) implement :meth:`token_grid`
    and, where the architecture defines them, the vision-importance methods; the rest has defaults that
    fit transformers VLMs whose decoder is ``model.model.language_model`` and whose image placeholder is
    ``config.image_token_id``. Only torch and transformers are imported.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The loaded VLM (the model an adapter wraps, or the one given to ``enable_pruning``).
    """

    #: ``config.model_type`` this architecture handles (the registry key)
    model_type: ClassVar[str] = ""
    #: readable name for messages ("LLaVA-1.5", "Qwen2.5-VL")
    label: ClassVar[str] = ""
    #: RoPE position components per token (1, or 3 for M-RoPE t, h, w)
    rope_dims: ClassVar[int] = 1
    #: M-RoPE frequencies alternate t, h, w (Qwen3-VL) rather than following each other in sections
    #: (Qwen2-VL, Qwen2.5-VL); :func:`posbias.kernels.mrope_axes`
    mrope_interleaved: ClassVar[bool] = False
    #: the image placeholder token as the prompt writes it (for messages)
    placeholder: ClassVar[str] = "image"
    #: what a vision-importance record is: "cls" ([CLS] query row), "colmean" (mean attention received),
    #: "" (no vision importance)
    vision_importance_kind: ClassVar[str] = ""

    def __init__(self, model: Any) -> None:
        self.model = model

    # ------------------------------------------------------------------ decoder
    def language_model(self) -> Any:
        """The decoder stack (``model.model.language_model``)."""
        return self.model.model.language_model

    @property
    def n_layers(self) -> int:
        """Decoder layers of the language model."""
        return len(self.language_model().layers)

    def decoder_attention_modules(self) -> list[Any]:
        """The decoder self-attention modules, index = layer."""
        return [layer.self_attn for layer in self.language_model().layers]

    @property
    def image_token_id(self) -> int:
        """Token id of the image placeholder in ``input_ids``."""
        return int(self.model.config.image_token_id)

    def take_layer_additions(self, lm_kwargs: dict[str, Any]) -> "LayerAdditions | None":
        """Take out of the decoder's keyword arguments what it adds to the hidden states of some positions
        after its first layers (Qwen3-VL's deepstack), so that a caller running the decoder on fewer tokens
        (the pruner) adds it to the tokens it keeps (:meth:`LayerAdditions.apply`). ``lm_kwargs`` is changed
        in place so the decoder adds nothing itself. Default: None (the decoder adds nothing)."""
        return None

    def rope_parameters(self) -> tuple[Any, list[int] | None]:
        """RoPE inverse frequencies of the decoder and the M-RoPE sections, as the rotary module holds them.

        Returns
        -------
        inv_freq : torch.Tensor
            (D/2,) float32 inverse frequencies (``language_model().rotary_emb.inv_freq``; read it during
            or after a forward when the RoPE type updates it dynamically).
        sections : list of int or None
            For M-RoPE (``rope_dims == 3``): how many of the D/2 frequencies take the t, h and w
            position (``mrope_section``, summing to D/2); None for 1-D RoPE.

        Raises
        ------
        posbias.errors.PosbiasError
            When the decoder has no rotary module this code knows.
        """
        from posbias.errors import PosbiasError

        rotary = getattr(self.language_model(), "rotary_emb", None)
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is None:
            raise PosbiasError(
                f"{type(self.language_model()).__name__} has no rotary_emb.inv_freq; position-agnostic "
                "attention needs a RoPE decoder: drop attn_pa from the signals"
            )
        sections = None
        if self.rope_dims == 3:
            rope = getattr(self.language_model().config, "rope_parameters", None) or {}
            sec = rope.get("mrope_section") or getattr(rotary, "mrope_section", None)  # config: public in 5.x
            if sec is None:
                raise PosbiasError(
                    f"{type(rotary).__name__} has no mrope_section; drop attn_pa from the signals for this model"
                )
            sections = [int(x) for x in sec]
        return inv_freq, sections

    # ------------------------------------------------------------------ visual tokens
    def visual_index(self, input_ids: Any) -> np.ndarray:
        """(V,) int64 ascending sequence positions of the visual tokens of a (1, S) ``input_ids``."""
        from posbias.errors import PosbiasError

        if input_ids.shape[0] != 1:
            raise PosbiasError(f"inputs hold a batch of {input_ids.shape[0]}; pass one prompt at a time")
        ids = input_ids[0].detach().cpu().numpy()  # (S,)
        return np.flatnonzero(ids == self.image_token_id).astype(np.int64)  # (V,)

    def token_grid(self, inputs: dict[str, Any], visual_index: np.ndarray) -> TokenGrid:
        """Tile and cell of each visual token, from the model inputs (``input_ids`` and what the
        architecture adds: ``image_grid_thw``, ``image_sizes``, ... or, inside ``generate``, the
        ``position_ids``) and the visual positions; one-line PosbiasError when they disagree."""
        raise NotImplementedError

    def position_ids(self, inputs: dict[str, Any], visual_index: np.ndarray) -> np.ndarray:
        """(V, P) int64 RoPE position ids of the visual tokens; default 1-D (cumulative attention mask - 1)."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None:
            positions = np.cumsum(mask[0].detach().cpu().numpy().astype(np.int64)) - 1  # (S,)
        else:
            positions = np.arange(int(ids.shape[1]), dtype=np.int64)  # (S,)
        return positions[visual_index][:, None].astype(np.int64)  # (V, 1)

    def layout(self, inputs: dict[str, Any]) -> VisualLayout:
        """The :class:`VisualLayout` of prepared inputs (batch of one)."""
        from posbias.errors import PosbiasError

        input_ids = inputs["input_ids"]  # (1, S)
        visual_index = self.visual_index(input_ids)  # (V,)
        if visual_index.shape[0] == 0:
            raise PosbiasError(
                f"the prompt holds no {self.placeholder} token; build inputs with adapter.prepare(image, question)"
            )
        tg = self.token_grid(inputs, visual_index)
        return VisualLayout(
            visual_index=visual_index, rows=tg.rows, cols=tg.cols, grid=tg.grid,
            position_ids=self.position_ids(inputs, visual_index), seq_len=int(input_ids.shape[1]),
            tile=tg.tile, tiles=tg.tiles, separator=tg.separator, overview=tg.overview,
        )

    def fixed_grid(self) -> tuple[int, int] | None:
        """The token grid when the architecture fixes it for every image (LLaVA-1.5: 24x24), else None."""
        return None

    def fixed_visual_count(self) -> int | None:
        """Visual tokens per prompt when the architecture fixes them, else None."""
        grid = self.fixed_grid()
        return None if grid is None else int(grid[0]) * int(grid[1])

    # ------------------------------------------------------------------ vision importance
    def _no_vision(self) -> Exception:
        from posbias.errors import PosbiasError

        return PosbiasError(
            f"architecture {self.model_type!r} has no vision-importance support; drop vision_importance from the "
            "signals (and ARP from posprune: params={'arp': False})"
        )

    def vision_tower(self) -> Any:
        """The vision encoder (the module whose attention the vision captures watch)."""
        raise self._no_vision()

    def vision_importance_modules(self) -> list[Any]:
        """The vision attention modules whose maps define the vision importance."""
        raise self._no_vision()

    def vision_query_key(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any, float, list[int]]:
        """Queries and keys a vision attention module computes from its own inputs (forward pre-hook).

        Returns
        -------
        query, key : torch.Tensor
            (H, N, D) float32 as the module's attention sees them (after RoPE where the tower has it).
        scaling : float
        bounds : list of int
            Boundaries of the independent attention blocks along N (``[0, N]`` for one image).
        """
        raise self._no_vision()

    def vision_context(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What :meth:`vision_importance_tokens` needs from a call of :meth:`vision_tower` (its arguments),
        as a dict of the model-input names (e.g. ``{"image_grid_thw": ...}``)."""
        return {}

    def vision_importance_tokens(self, records: list[Any], inputs: dict[str, Any]) -> Any:
        """Map the records (one (N,) per :meth:`vision_importance_modules`) to (V,) in LLM token order."""
        raise self._no_vision()

    def vision_feature_module(self) -> Any:
        """The module whose first input is the vision-encoder output before projection."""
        from posbias.errors import PosbiasError

        raise PosbiasError(f"architecture {self.model_type!r} does not expose vision-encoder features")

    def vision_features_tokens(self, features: Any, inputs: dict[str, Any]) -> Any:
        """(V, D_v) vision-encoder features in LLM token order from the input of :meth:`vision_feature_module`."""
        from posbias.errors import PosbiasError

        raise PosbiasError(f"architecture {self.model_type!r} does not expose vision-encoder features")

    # ------------------------------------------------------------------ reports
    @classmethod
    def crop_image(cls, image: Any) -> Any:
        """The part of a PIL image the visual tokens cover (default: the whole image, resized by the processor)."""
        return image

    @classmethod
    def tile_placement(cls, size: tuple[int, int], tiles: Any) -> TilePlacement:
        """Where each tile of a stored sample lies in its picture, from what the store holds.

        Parameters
        ----------
        size : (height, width)
            Size in pixels of the picture, :meth:`crop_image` of the sample's image.
        tiles : sequence of (rows, cols)
            The grid of every tile of the sample (``/tiles/grid``), index = tile.

        Returns
        -------
        TilePlacement
            Default: one tile covering the whole picture. Architectures with several tiles override it.

        Raises
        ------
        posbias.errors.PosbiasError
            For several tiles (the default does not know where they lie).
        """
        from posbias.errors import PosbiasError

        if len(tiles) != 1:
            raise PosbiasError(
                f"architecture {cls.model_type or cls.__name__!r} does not say where its {len(tiles)} tiles lie in the "
                "image; give its Architecture a tile_placement (docs/architecture.md)"
            )
        h, w = (float(x) for x in size)
        return TilePlacement(boxes=np.array([[0.0, 0.0, h, w]]), overview=None)


class ModelAdapter(ABC):
    """One loaded VLM behind the interface the profiler and runtime use.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The loaded model (eval mode).
    processor : Any
        Callable producing model inputs from text and images.
    model_id : str
        Hub id or local path the model was loaded from.
    revision : str or None
        Commit hash when known.
    """

    #: registry name of the architecture ("llava", "qwen2_5_vl")
    name: ClassVar[str]
    #: number of RoPE position components per token (1 or 3)
    rope_dims: ClassVar[int]

    def __init__(self, model: Any, processor: Any, *, model_id: str, revision: str | None = None) -> None:
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.revision = revision

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Number of decoder layers of the language model."""

    @abstractmethod
    def prepare(self, image: Any, question: str) -> dict[str, Any]:
        """Model inputs (batch of one, on the model's device) for one image and question."""

    @abstractmethod
    def layout(self, inputs: dict[str, Any]) -> VisualLayout:
        """Visual-token layout of prepared inputs."""

    @abstractmethod
    def decoder_attention_modules(self) -> list[Any]:
        """The decoder self-attention modules, index = layer."""

    @abstractmethod
    def language_model(self) -> Any:
        """The decoder stack whose attention implementation the capture swaps."""

    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The model config as a plain dict (input of the fingerprint)."""


class TransformersAdapter(ModelAdapter):
    """Shared parts of the adapters for transformers VLMs whose decoder is ``model.model.language_model``.

    Subclasses implement :meth:`prepare` and name their :class:`Architecture` subclass in
    :attr:`architecture`; this class answers the rest through ``self.arch`` (layout, decoder layers, RoPE,
    vision signals) and from the loaded model (config, fingerprint, a cheap last-position forward).
    Construction checks the transformers/torch versions and the decoder's calling convention
    (:mod:`posbias._hf_compat`): one-line :class:`~posbias.errors.PosbiasError` outside the range.
    """

    #: the architecture class of this adapter's models
    architecture: ClassVar[type[Architecture]] = Architecture

    @staticmethod
    def _load_kwargs(label: str, *, device: str, dtype: Any, hub_kwargs: dict[str, Any] | None,
                     options: dict[str, Any]) -> dict[str, Any]:
        """``from_pretrained`` keywords (dtype, device map, hub keywords); ``options`` not None that the adapter does
        not take are refused in one line."""
        from posbias.errors import PosbiasError

        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise PosbiasError(f"options {given} do not apply to {label} models; drop them")
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), **(hub_kwargs or {})}
        if str(device) != "cpu":
            kwargs["device_map"] = str(device)
        return kwargs

    def __init__(self, model: Any, processor: Any, *, model_id: str, revision: str | None = None) -> None:
        from posbias._hf_compat import check_decoder, check_versions

        check_versions()
        check_decoder(model.model.language_model)
        super().__init__(model, processor, model_id=model_id, revision=revision)
        self.arch = self.architecture(model)

    def language_model(self) -> Any:
        """The decoder stack (``model.model.language_model``), a ``PreTrainedModel`` of its own config."""
        return self.arch.language_model()

    @property
    def n_layers(self) -> int:
        return int(self.language_model().config.num_hidden_layers)

    def decoder_attention_modules(self) -> list[Any]:
        return self.arch.decoder_attention_modules()

    @property
    def image_token_id(self) -> int:
        """Token id of the image placeholder in ``input_ids``."""
        return self.arch.image_token_id

    def layout(self, inputs: dict[str, Any]) -> VisualLayout:
        """Visual-token layout of prepared inputs (:meth:`Architecture.layout`)."""
        return self.arch.layout(inputs)

    def config_dict(self) -> dict[str, Any]:
        return self.model.config.to_dict()

    def fingerprint(self) -> str:
        """``model_fingerprint(self.config_dict())``: equal for checkpoints with the same token geometry."""
        from posbias.artifacts.fingerprint import model_fingerprint

        return model_fingerprint(self.config_dict())

    @property
    def device(self) -> Any:
        """Device of the model's input embeddings (where prepared inputs go)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> Any:
        """Floating dtype of the model weights (pixel values are cast to it)."""
        return self.model.get_input_embeddings().weight.dtype

    def _to_device(self, batch: Any) -> dict[str, Any]:
        """Move a processor output to the model device; floating tensors take the model dtype."""
        import torch

        out: dict[str, Any] = {}
        for key, value in dict(batch).items():
            if isinstance(value, torch.Tensor):
                if value.is_floating_point():
                    value = value.to(device=self.device, dtype=self.dtype)
                else:
                    value = value.to(self.device)
            out[key] = value
        return out

    # ------------------------------------------------------------------ signal hooks: the architecture's
    def rope_parameters(self) -> tuple[Any, list[int] | None]:
        """:meth:`Architecture.rope_parameters`."""
        return self.arch.rope_parameters()

    @property
    def vision_importance_kind(self) -> str:  # type: ignore[override]
        """"cls", "colmean" or "" (:attr:`Architecture.vision_importance_kind`)."""
        return self.arch.vision_importance_kind

    def vision_tower(self) -> Any:
        """:meth:`Architecture.vision_tower`."""
        return self.arch.vision_tower()

    def vision_importance_modules(self) -> list[Any]:
        """:meth:`Architecture.vision_importance_modules`."""
        return self.arch.vision_importance_modules()

    def vision_importance_tokens(self, records: list[Any], inputs: dict[str, Any]) -> Any:
        """:meth:`Architecture.vision_importance_tokens`."""
        return self.arch.vision_importance_tokens(records, inputs)

    def vision_feature_module(self) -> Any:
        """:meth:`Architecture.vision_feature_module`."""
        return self.arch.vision_feature_module()

    def vision_features_tokens(self, features: Any, inputs: dict[str, Any]) -> Any:
        """:meth:`Architecture.vision_features_tokens`."""
        return self.arch.vision_features_tokens(features, inputs)

    def forward_last_logits(self, inputs: dict[str, Any]) -> Any:
        """Logits of the last prompt position, ``torch.Tensor`` (vocab,).

        Runs the model once without a KV cache and with ``logits_to_keep=1`` so only the last
        position goes through the LM head.
        """
        import torch

        with torch.inference_mode():
            out = self.model(**inputs, use_cache=False, logits_to_keep=1)
        return out.logits[0, -1]  # (vocab,)
