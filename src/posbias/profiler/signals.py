"""The signals beyond plain last-token attention, and the capture that produces all of them in one forward.

Signals (names as in ``--signals`` and in the store, docs/store.md):

``attn``
    (V, L) last-token attention to each visual token, head mean (always captured).
``attn_heads``
    (V, L, H) the same per head (``per_head=True``, ``--per-head``).
``attn_pa``
    (V, L) position-agnostic attention (UTP, Eq. 2): the last token's row recomputed with every
    visual key rotated to one uniform position ``p' = floor((p1 + p2) / 2 + 1/2)`` (p1, p2: positions of
    the first and last visual token), text keys and the query at their own positions, one softmax over
    all keys. Computed inside the capture forward from the post-RoPE keys: RoPE is a rotation, so
    ``k_pa = R(p') R(p)^-1 k = R(p' - p) k``. For M-RoPE each of the three axes (t, h, w) gets its own
    ``p'`` from the first/last visual token's position on that axis, applied to the frequencies of that
    axis's section.
``vision_importance``
    (V,) vision-encoder importance in the LLM's visual-token order (LLaVA: [CLS] -> patch attention,
    head mean, at the feature layer; Qwen2.5-VL: mean attention each patch receives in the
    full-attention blocks, mapped through the window permutation and the 2x2 merge; Qwen2-VL: the same
    at its last block, every block being global, with no permutation to undo).
``region_logdet``
    (n, n) per sample: ``H = log det(Cov + eps I)`` (PosPrune, Eq. 1) of the LLM's input visual tokens
    (projector output) on an n x n block grid; ``region_logdet_vision`` the same for the vision-encoder
    output before projection.

Pure functions (:func:`uniform_position`, :func:`rope_rotation`, :func:`rotate_keys`,
:func:`position_agnostic_scores`, :func:`attention_column_mean` -- the shared kernels of
:mod:`posbias.kernels`, re-exported here --, :func:`block_edges`,
:func:`region_block_index`, :func:`gram_logdet`, :func:`region_logdet`, :func:`edge_mask`) do the math
and are tested on their own; :class:`SignalCapture` wires them to a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from posbias.errors import PosbiasError
from posbias.kernels import (
    apply_rope as rotate_keys,
    attention_column_mean,
    position_agnostic_scores,
    rope_rotation,
    rotate_half,
    uniform_position,
)
from posbias.models.base import ModelAdapter, VisualLayout
from posbias.profiler.capture import LastTokenAttentionCapture, VisionAttentionCapture

__all__ = [
    "SIGNALS",
    "DEFAULT_SIGNALS",
    "DEFAULT_REGION_GRID",
    "DEFAULT_REGION_EPS",
    "parse_signals",
    "uniform_position",
    "rope_rotation",
    "rotate_half",
    "rotate_keys",
    "position_agnostic_scores",
    "attention_column_mean",
    "block_edges",
    "region_block_index",
    "edge_mask",
    "gram_logdet",
    "region_logdet",
    "SampleSignals",
    "SignalCapture",
]

#: every signal name ``--signals`` accepts (``attn`` is always captured)
SIGNALS: tuple[str, ...] = ("attn", "attn_pa", "vision_importance", "region_logdet")
#: what ``--signals all`` means
DEFAULT_SIGNALS: tuple[str, ...] = SIGNALS
#: n of the n x n region block grid (PosPrune: 6x6 on LLaVA's 24x24)
DEFAULT_REGION_GRID = 6
#: eps of ``log det(Cov + eps I)``
DEFAULT_REGION_EPS = 1e-3


def parse_signals(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Signal names from ``"all"``, ``"attn,attn_pa"`` or an iterable; ``attn`` is always included.

    Raises
    ------
    posbias.errors.PosbiasError
        For an unknown name.
    """
    if isinstance(spec, str):
        items = [x.strip() for x in spec.split(",") if x.strip()]
    else:
        items = [str(x).strip() for x in spec]
    if not items or items == ["all"]:
        return DEFAULT_SIGNALS
    bad = [x for x in items if x not in SIGNALS]
    if bad:
        raise PosbiasError(
            f"signals={','.join(items)}: unknown {bad}; use 'all' or a comma list of {','.join(SIGNALS)}"
        )
    chosen = set(items) | {"attn"}
    return tuple(x for x in SIGNALS if x in chosen)


# ---------------------------------------------------------------------------------------- region density


def block_edges(size: int, n: int) -> np.ndarray:
    """(n + 1,) int64 boundaries cutting ``size`` grid lines into n near-equal blocks: ``floor(i * size / n)``.

    24 into 6 gives blocks of 4; 18 into 6 blocks of 3; 20 into 6 blocks of 3,3,4,3,3,4. When
    ``size < n`` some blocks are empty.
    """
    if n < 1:
        raise PosbiasError(f"region grid {n}: pass region_grid of at least 1")
    return (np.arange(n + 1, dtype=np.int64) * int(size)) // int(n)  # (n + 1,)


def region_block_index(rows: np.ndarray, cols: np.ndarray, grid: tuple[int, int], n: int) -> np.ndarray:
    """(V,) int64 block number ``block_row * n + block_col`` of each token on the n x n block grid.

    Parameters
    ----------
    rows, cols : np.ndarray
        (V,) grid coordinates of the tokens.
    grid : (int, int)
        (rows, cols) of the token grid.
    n : int
        Blocks per side.
    """
    r_edges = block_edges(grid[0], n)  # (n + 1,)
    c_edges = block_edges(grid[1], n)  # (n + 1,)
    br = np.searchsorted(r_edges, np.asarray(rows, dtype=np.int64), side="right") - 1  # (V,)
    bc = np.searchsorted(c_edges, np.asarray(cols, dtype=np.int64), side="right") - 1  # (V,)
    return (br * n + bc).astype(np.int64)  # (V,)


def edge_mask(n: int) -> np.ndarray:
    """(n, n) bool: True on the outer ring of blocks (edge region), False in the centre (PosPrune)."""
    mask = np.zeros((n, n), dtype=bool)  # (n, n)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def gram_logdet(x: np.ndarray, eps: float) -> float:
    """``log det(Cov(x) + eps I_D)`` of m feature rows x (m, D), ``Cov = Xc^T Xc / m`` (Xc centred).

    When m < D the (D x D) covariance has rank < m; the value is computed through the (m x m) Gram
    matrix: ``log det(Xc^T Xc / m + eps I_D) = (D - m) log eps + log det(Xc Xc^T / m + eps I_m)``
    (the non-zero eigenvalues of both products agree). Float64 throughout.

    Returns
    -------
    float
        NaN for an empty block.
    """
    x = np.asarray(x, dtype=np.float64)  # (m, D)
    m, d = x.shape
    if m == 0:
        return float("nan")
    xc = x - x.mean(axis=0, keepdims=True)  # (m, D)
    if m < d:
        small = xc @ xc.T / m + eps * np.eye(m)  # (m, m)
        extra = (d - m) * math.log(eps)
    else:
        small = xc.T @ xc / m + eps * np.eye(d)  # (D, D)
        extra = 0.0
    sign, logdet = np.linalg.slogdet(small)
    if sign <= 0:  # cannot happen for eps > 0 up to rounding; say so rather than return garbage
        return float("nan")
    return float(logdet + extra)


def region_logdet(
    features: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    grid: tuple[int, int],
    n: int = DEFAULT_REGION_GRID,
    eps: float = DEFAULT_REGION_EPS,
) -> np.ndarray:
    """Region semantic density (PosPrune, Eq. 1): ``H = log det(Cov + eps I)`` per block of an n x n grid.

    Parameters
    ----------
    features : np.ndarray
        (V, D) features of the visual tokens.
    rows, cols : np.ndarray
        (V,) grid coordinates.
    grid : (int, int)
        Token grid (rows, cols); blocks are near-equal (:func:`block_edges`).
    n : int
        Blocks per side.
    eps : float
        Ridge added to the covariance (> 0).

    Returns
    -------
    np.ndarray
        (n, n) float64; NaN for an empty block (token grid smaller than n on that axis).
    """
    if not eps > 0:
        raise PosbiasError(f"region eps {eps!r} must be > 0")
    feats = np.asarray(features)  # (V, D)
    if feats.ndim != 2 or feats.shape[0] != len(rows):
        raise PosbiasError(f"features of shape {feats.shape} do not match {len(rows)} tokens")
    block = region_block_index(rows, cols, grid, n)  # (V,)
    out = np.full((n, n), np.nan, dtype=np.float64)  # (n, n)
    order = np.argsort(block, kind="stable")  # (V,)
    sorted_blocks = block[order]  # (V,)
    starts = np.searchsorted(sorted_blocks, np.arange(n * n), side="left")  # (n*n,)
    stops = np.searchsorted(sorted_blocks, np.arange(n * n), side="right")  # (n*n,)
    for b in range(n * n):
        if stops[b] > starts[b]:
            out[b // n, b % n] = gram_logdet(feats[order[starts[b] : stops[b]]], eps)
    return out


# ---------------------------------------------------------------------------------------------- capture


@dataclass
class SampleSignals:
    """All signals of one sample.

    Attributes
    ----------
    attn : np.ndarray
        (V, L) float32 head-mean last-token attention (goes to ``/tokens/attn``).
    token_data : dict of str to np.ndarray
        Per-token extras, first axis V: ``attn_pa`` (V, L) float32, ``attn_heads`` (V, L, H) float32,
        ``vision_importance`` (V,) float32, ``region_block`` (V,) int16.
    sample_data : dict of str to np.ndarray
        Per-sample extras: ``region_logdet`` and ``region_logdet_vision`` (n, n) float32.
    """

    attn: np.ndarray
    token_data: dict[str, np.ndarray] = field(default_factory=dict)
    sample_data: dict[str, np.ndarray] = field(default_factory=dict)


class SignalCapture:
    """Capture every requested signal in ONE forward of the model.

    Parameters
    ----------
    adapter : ModelAdapter
        The loaded model.
    signals : str or iterable of str
        ``"all"`` or names from :data:`SIGNALS` (``attn`` is always captured).
    per_head : bool
        Also return per-head rows ``attn_heads`` (V, L, H).
    region_grid : int
        n of the n x n region block grid.
    region_eps : float
        eps of ``log det(Cov + eps I)``.
    region_vision : bool
        With ``region_logdet``, also compute ``region_logdet_vision`` on the vision-encoder output before
        projection.

    Examples
    --------
    >>> with SignalCapture(adapter, signals="all") as cap:        # doctest: +SKIP
    ...     sig = cap.run(inputs, adapter.layout(inputs))
    ...     sig.attn.shape, sig.token_data["attn_pa"].shape      # (V, L), (V, L)
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        signals: str | Iterable[str] = "all",
        per_head: bool = False,
        region_grid: int = DEFAULT_REGION_GRID,
        region_eps: float = DEFAULT_REGION_EPS,
        region_vision: bool = True,
    ) -> None:
        self.adapter = adapter
        self.signals = parse_signals(signals)
        self.per_head = bool(per_head)
        if isinstance(region_grid, bool) or not isinstance(region_grid, (int, np.integer)) or region_grid < 1:
            raise PosbiasError(f"region_grid={region_grid!r}: pass a positive integer (6 gives a 6x6 grid)")
        if not (isinstance(region_eps, (int, float)) and region_eps > 0):
            raise PosbiasError(f"region eps {region_eps!r}: pass a positive number")
        self.region_grid = int(region_grid)
        self.region_eps = float(region_eps)
        self.region_vision = bool(region_vision) and "region_logdet" in self.signals
        self._decoder = LastTokenAttentionCapture(
            adapter, per_head=self.per_head, position_agnostic="attn_pa" in self.signals
        )
        self._vision = VisionAttentionCapture(adapter) if "vision_importance" in self.signals else None
        self._hooks: list[Any] = []
        self._embeds: torch.Tensor | None = None
        self._vision_feats: torch.Tensor | None = None
        self._active = False

    # ---------------------------------------------------------------- context
    def __enter__(self) -> "SignalCapture":
        if self._active:
            raise PosbiasError("this signal capture is already active; do not nest it")
        try:
            self._decoder.__enter__()
            if self._vision is not None:
                self._vision.__enter__()
            if "region_logdet" in self.signals:
                lm = self.adapter.language_model()
                self._hooks.append(lm.register_forward_pre_hook(self._grab_embeds, with_kwargs=True))
                if self.region_vision:
                    module = self.adapter.vision_feature_module()
                    self._hooks.append(module.register_forward_pre_hook(self._grab_vision_feats))
        except BaseException:
            self._close()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._close()

    def _close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        try:
            if self._vision is not None and self._vision.active:
                self._vision.__exit__(None, None, None)
        finally:
            if self._decoder.active:
                self._decoder.__exit__(None, None, None)
            self._active = False

    @property
    def active(self) -> bool:
        """True inside the ``with`` block."""
        return self._active

    def _grab_embeds(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and len(args) > 4:
            embeds = args[4]
        self._embeds = embeds.detach() if embeds is not None else None  # (1, S, D)

    def _grab_vision_feats(self, module: Any, args: tuple) -> None:
        self._vision_feats = args[0].detach() if args else None

    # -------------------------------------------------------------- metadata
    def static_data(self) -> dict[str, np.ndarray]:
        """Store-wide arrays, by store path: ``samples/region_is_edge`` (n, n) bool, True on the outer ring
        of region blocks (edge), False in the centre. It is static because the block grid is n x n for
        every sample, whatever the token grid (blocks of near-equal size on dynamic grids)."""
        if "region_logdet" not in self.signals:
            return {}
        return {"samples/region_is_edge": edge_mask(self.region_grid)}

    def attrs(self) -> dict[str, Any]:
        """Root attributes describing the signals (for the store)."""
        out: dict[str, Any] = {"signals": list(self.signals), "per_head": self.per_head}
        if "region_logdet" in self.signals:
            out.update(region_grid=self.region_grid, region_eps=self.region_eps,
                       region_features="projector_output" + (",vision_encoder_output" if self.region_vision else ""))
        if "vision_importance" in self.signals:
            out["vision_importance_kind"] = str(self.adapter.vision_importance_kind)
        return out

    # ------------------------------------------------------------------- run
    def run(self, inputs: dict[str, Any], layout: VisualLayout) -> SampleSignals:
        """One forward; every requested signal of this sample.

        Returns
        -------
        SampleSignals
            ``attn`` (V, L) plus ``token_data`` / ``sample_data`` as listed there.
        """
        if not self._active:
            with self:
                return self.run(inputs, layout)
        self._embeds = None
        self._vision_feats = None
        if self._vision is not None:
            self._vision.reset()
        rows = self._decoder.run(inputs, layout)  # (V, L) or (V, L, H)
        token_data: dict[str, np.ndarray] = {}
        if self.per_head:
            token_data["attn_heads"] = rows  # (V, L, H)
            attn = np.ascontiguousarray(self._decoder.last_attn_mean)  # (V, L)
        else:
            attn = rows  # (V, L)
        if "attn_pa" in self.signals:
            token_data["attn_pa"] = self._decoder.last_attn_pa  # (V, L)
        sample_data: dict[str, np.ndarray] = {}
        if self._vision is not None:
            importance = self.adapter.vision_importance_tokens(self._vision.records(), inputs)  # (V,)
            if importance.shape[0] != layout.n_visual:
                raise RuntimeError(
                    f"vision importance has {importance.shape[0]} entries for {layout.n_visual} visual tokens"
                )
            token_data["vision_importance"] = importance.detach().to("cpu", torch.float32).numpy()  # (V,)
        if "region_logdet" in self.signals:
            if self._embeds is None:
                raise RuntimeError("the language model was called without inputs_embeds; cannot read visual features")
            # regions live on the grid of the tile showing the whole image (the only tile of one-grid layouts;
            # LLaVA-NeXT's base image, InternVL's thumbnail)
            ov = int(layout.overview)
            cell = np.flatnonzero((np.asarray(layout.tile) == ov) & ~np.asarray(layout.separator))  # (V0,)
            ov_grid = tuple(int(x) for x in layout.tiles[ov])
            vi = torch.as_tensor(np.asarray(layout.visual_index)[cell], device=self._embeds.device)
            feats = self._embeds[0].index_select(0, vi)  # (V0, D)
            sample_data["region_logdet"] = self._logdet(feats, layout, cell)  # (n, n)
            if self.region_vision:
                if self._vision_feats is None:
                    raise RuntimeError("the vision feature module was not called; cannot read encoder features")
                vfeats = self.adapter.vision_features_tokens(self._vision_feats, inputs)  # (V, D_v)
                sel = torch.as_tensor(cell, device=vfeats.device)
                sample_data["region_logdet_vision"] = self._logdet(vfeats.index_select(0, sel), layout, cell)
            blocks = np.full(layout.n_visual, -1, dtype=np.int64)  # (V,) -1: outside the overview tile's grid
            blocks[cell] = region_block_index(layout.rows[cell], layout.cols[cell], ov_grid, self.region_grid)
            token_data["region_block"] = blocks.astype(np.int16)
        self._embeds = None
        self._vision_feats = None
        return SampleSignals(attn=attn, token_data=token_data, sample_data=sample_data)

    def _logdet(self, feats: torch.Tensor, layout: VisualLayout, cell: np.ndarray) -> np.ndarray:
        x = feats.detach().to("cpu", torch.float64).numpy()  # (V0, D) float64, the tokens ``cell`` of the layout
        ov_grid = tuple(int(x) for x in layout.tiles[int(layout.overview)])
        h = region_logdet(x, layout.rows[cell], layout.cols[cell], ov_grid, self.region_grid,
                          self.region_eps)  # (n, n)
        return h.astype(np.float32)

    @property
    def last_logits(self) -> torch.Tensor | None:
        """(vocab,) logits of the last prompt position from the latest :meth:`run`."""
        return self._decoder.last_logits
