"""The small interface every architecture adapter implements.

An adapter wraps one loaded Hugging Face model and its processor and answers four questions the
profiler and the runtime pruner ask: how to turn (image, question) into model inputs, which sequence
positions hold visual tokens, where those tokens sit on the grid the language model sees (and their
RoPE position ids), and which decoder attention modules to hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = ["VisualLayout", "ModelAdapter", "DTYPES", "resolve_dtype", "TransformersAdapter"]

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

    Subclasses implement :meth:`prepare` and :meth:`layout`; this class answers the rest from the
    loaded model (decoder layers, config, fingerprint, a cheap last-position forward).
    Construction checks the transformers/torch versions and the decoder's calling convention
    (:mod:`posbias._hf_compat`): one-line :class:`~posbias.errors.PosbiasError` outside the range.
    """

    def __init__(self, model: Any, processor: Any, *, model_id: str, revision: str | None = None) -> None:
        from posbias._hf_compat import check_decoder, check_versions

        check_versions()
        check_decoder(model.model.language_model)
        super().__init__(model, processor, model_id=model_id, revision=revision)

    def language_model(self) -> Any:
        """The decoder stack (``model.model.language_model``), a ``PreTrainedModel`` of its own config."""
        return self.model.model.language_model

    @property
    def n_layers(self) -> int:
        return int(self.language_model().config.num_hidden_layers)

    def decoder_attention_modules(self) -> list[Any]:
        return [layer.self_attn for layer in self.language_model().layers]

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

    # ------------------------------------------------------------------ signal hooks (issue 3)
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

    def vision_tower(self) -> Any:
        """The vision encoder whose attention implementation the vision-importance capture swaps."""
        from posbias.errors import PosbiasError

        raise PosbiasError(
            f"adapter {self.name!r} has no vision-importance support; drop vision_importance from the signals"
        )

    def vision_importance_modules(self) -> list[Any]:
        """Vision attention modules whose maps define the vision importance (see the subclass)."""
        from posbias.errors import PosbiasError

        raise PosbiasError(
            f"adapter {self.name!r} has no vision-importance support; drop vision_importance from the signals"
        )

    #: "cls": record the [CLS] query row; "colmean": record the mean attention each key receives
    vision_importance_kind: ClassVar[str] = ""

    def vision_importance_tokens(self, records: list[Any], inputs: dict[str, Any]) -> Any:
        """Map recorded vision rows (one per :meth:`vision_importance_modules`) to (V,) in LLM token order."""
        from posbias.errors import PosbiasError

        raise PosbiasError(
            f"adapter {self.name!r} has no vision-importance support; drop vision_importance from the signals"
        )

    def vision_feature_module(self) -> Any:
        """The module whose first input is the vision-encoder output before projection."""
        from posbias.errors import PosbiasError

        raise PosbiasError(f"adapter {self.name!r} does not expose vision-encoder features")

    def vision_features_tokens(self, features: Any, inputs: dict[str, Any]) -> Any:
        """(V, D_v) vision-encoder features in LLM token order from the input of :meth:`vision_feature_module`."""
        from posbias.errors import PosbiasError

        raise PosbiasError(f"adapter {self.name!r} does not expose vision-encoder features")

    def forward_last_logits(self, inputs: dict[str, Any]) -> Any:
        """Logits of the last prompt position, ``torch.Tensor`` (vocab,).

        Runs the model once without a KV cache and with ``logits_to_keep=1`` so only the last
        position goes through the LM head.
        """
        import torch

        with torch.inference_mode():
            out = self.model(**inputs, use_cache=False, logits_to_keep=1)
        return out.logits[0, -1]  # (vocab,)
