"""Prune visual tokens inside a transformers VLM (LLaVA, Qwen2-VL, Qwen2.5-VL, ...) during prefill.

Everything architecture-specific (where the visual tokens are, their grid, the vision importance) comes from
the model's :class:`~posbias.models.base.Architecture` (:func:`posbias.models.registry.architecture_of`);
the scoring row and the RoPE rotation are the shared kernels of :mod:`posbias.kernels` the profiler uses too.

How it works (torch ``nn.Module`` hooks only; nothing in transformers is patched):

1. A forward pre-hook on the VLM sees ``input_ids`` of every call. A call whose prompt holds image tokens
   and more than one position is a *prefill*: the hook finds the visual positions and their grid, checks ``keep``
   against the visual count (before any compute) and opens a prefill state. Every other call (decoding
   steps of ``generate``) runs unpruned code paths.
2. Pre-hooks on each decoder layer gather, for the tokens still alive, the layer's ``position_embeddings``
   (cos, sin), ``position_ids`` and attention mask; since cos/sin are computed by the model from its own
   position ids before the first layer, every kept token keeps its original RoPE angle, and for M-RoPE the
   (t, h, w) components of each kept token travel together.
3. Forward hooks on the scoring layer(s) score the visual tokens from the layer's own queries and keys before
   RoPE (the ``q_proj``/``k_proj`` outputs, or those of ``q_norm``/``k_norm`` where the attention normalises
   each head, as Qwen3-VL does; captured by hooks; RoPE applied here with the layer's cos/sin): the last prompt token's
   attention row, softmax over all keys, head mean, as PyramidDrop recomputes it under sdpa. The
   method selects the kept visual tokens and the hook returns the hidden states of the kept sequence.
   Layers after it therefore run on fewer tokens, and their KV cache (transformers 5 keeps one per layer)
   holds only kept tokens; ``generate`` then decodes against those caches with the original positions
   (its position ids and ``rope_deltas`` come from the unpruned attention mask).
4. What the decoder adds to the visual positions after its first layers (Qwen3-VL's deepstack features) is
   taken from it before the first layer (:meth:`~posbias.models.base.Architecture.take_layer_additions`) and
   added by the layer hooks to the visual tokens still in the sequence, so pruning may come before the last
   such layer (the papers' K=2 on Qwen3-VL, whose deepstack feeds layers 0-2).
5. ARP (``posprune``) prunes before the first decoder layer from a vision importance recorded in the
   vision tower (:mod:`posbias.runtime.vision`); UTP prunes after every layer its schedule shrinks at.

Removing the hooks (:meth:`Pruner.disable`, or leaving the ``with`` block) restores the model exactly.
Batch size 1 without padding is supported (the prompt's attention mask must be all ones).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from posbias.artifacts.calibration import Calibration
from posbias.errors import PosbiasError
from posbias._hf_compat import (
    attention_implementation,
    check_decoder,
    check_versions,
    kwargs_cache,
    query_key_modules,
)
from posbias.kernels import apply_rope, last_token_attention, uniform_position
from posbias.runtime.methods import arp_select
from posbias.runtime.quality import check_entry_quality
from posbias.runtime.registry import Selection, get_method
from posbias.runtime.spec import MethodSpec, resolve_method

if TYPE_CHECKING:  # the architecture module loads with the first model (importing posbias.runtime stays light)
    from posbias.models.base import Architecture, LayerAdditions, TokenGrid

__all__ = ["Pruner", "PruneRecord", "enable_pruning", "unwrap_model"]


def architecture_of(model: Any) -> "Architecture":
    """:func:`posbias.models.registry.architecture_of` (imported on first use)."""
    from posbias.models.registry import architecture_of as _of

    return _of(model)


def unwrap_model(model: Any) -> Any:
    """The transformers model behind a posbias adapter (or the model itself)."""
    if hasattr(model, "prepare") and hasattr(model, "layout") and hasattr(model, "model"):
        return model.model
    return model


@dataclass
class PruneRecord:
    """What the last prefill did.

    Attributes
    ----------
    n_visual : int
        Visual tokens in the prompt.
    kept : torch.Tensor
        (K,) int64 ascending raster indices of the visual tokens alive after the last pruning step.
    stages : list of (int, int)
        ``(layer, visual tokens alive after it)``; layer -1 is the vision side (before the decoder).
    tokens_per_layer : list of int
        Sequence length each decoder layer processed (for FLOPs).
    select_ms : float
        Wall time spent scoring and selecting (all stages).
    scoring_rows : dict of int to torch.Tensor
        Layer -> (V_cur,) float32 head-mean last-token attention over the visual tokens alive at that layer
        (in the order of their raster ids), the row the method scored (:func:`posbias.kernels.last_token_attention`,
        the quantity the profile store holds in ``/tokens/attn``).
    vision_importance : torch.Tensor or None
        (V,) float32 vision importance ARP used, in the LLM's visual-token order (``/tokens/vision_importance``).
    """

    n_visual: int
    seq_len: int
    kept: torch.Tensor
    stages: list[tuple[int, int]] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    select_ms: float = 0.0
    scoring_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    vision_importance: torch.Tensor | None = None


class _Prefill:
    """Mutable state of one prefill pass."""

    def __init__(self, visual_pos: torch.Tensor, tokens: "TokenGrid", seq_len: int, positions: Any) -> None:
        import numpy as np

        self.seq_len = seq_len
        self.grid = tokens.grid  # (rows, cols) of the first tile
        self.n_all = int(visual_pos.shape[0])  # every visual token, separators included
        sep = np.zeros(self.n_all, bool) if tokens.separator is None else np.asarray(tokens.separator, bool)
        # separators (LLaVA-NeXT's image_newline) are never candidates: the pruner treats them as text tokens
        cand = np.flatnonzero(~sep)  # (V,) candidates' index among all visual tokens
        self.run_index = torch.from_numpy(cand.astype(np.int64))  # (V,)
        self.sep_index = torch.from_numpy(np.flatnonzero(sep).astype(np.int64))  # (V_sep,)
        self.n_sep = int(self.sep_index.shape[0])
        visual_pos = visual_pos[self.run_index]
        self.n_visual = int(visual_pos.shape[0])  # candidates
        tile = np.zeros(self.n_all, np.int64) if tokens.tile is None else np.asarray(tokens.tile, np.int64)
        self.rows = torch.from_numpy(np.asarray(tokens.rows, np.int64)[cand])  # (V,) row in the token's tile
        self.cols = torch.from_numpy(np.asarray(tokens.cols, np.int64)[cand])  # (V,)
        self.tile = torch.from_numpy(tile[cand])  # (V,)
        self.tiles = tuple(tuple(int(x) for x in g) for g in tokens.tiles)
        self.seq_index = torch.arange(seq_len)  # (S_cur,) original positions of the alive tokens
        self.vis_local = visual_pos.clone()  # (V_cur,) positions of alive visual tokens in the current sequence
        self.vis_ids = torch.arange(self.n_visual)  # (V_cur,) raster ids of alive visual tokens
        self.full = True
        self.positions = positions  # position ids the language model got (or None)
        self.pos_emb: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.stages: list[tuple[int, int]] = []
        self.tokens_per_layer: list[int] = []
        self.select_s = 0.0
        self.scoring_rows: dict[int, torch.Tensor] = {}
        self.importance: torch.Tensor | None = None
        self.additions: "LayerAdditions | None" = None  # what the decoder adds after its first layers


class Pruner:
    """Visual-token pruning attached to one model; use :func:`enable_pruning` to build it.

    Use as a context manager (``with enable_pruning(...):``) or call :meth:`disable` when done.

    Attributes
    ----------
    spec : MethodSpec
        Resolved method, layer(s), budget and parameters.
    last : PruneRecord or None
        Record of the latest prefill.
    """

    def __init__(self, model: Any, spec: MethodSpec, arch: "Architecture | None" = None) -> None:
        self.model = model
        self.arch = arch if arch is not None else architecture_of(model)
        self.kind = self.arch.model_type
        self.spec = spec
        self.lm = self.arch.language_model()
        check_versions()
        check_decoder(self.lm)
        self.layers = list(self.lm.layers)
        self.last: PruneRecord | None = None
        self._state: _Prefill | None = None
        self._handles: list[Any] = []
        self._vision: Any = None
        self._enabled = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self) -> "Pruner":
        if self._enabled:
            return self
        if getattr(self.model, "_posbias_pruner", None) is not None:
            raise PosbiasError("pruning is already enabled on this model; disable the other Pruner first")
        impl = attention_implementation(self.lm) or "sdpa"
        if impl not in ("sdpa", "eager"):
            raise PosbiasError(f"the decoder uses attention {impl!r}; the pruner supports sdpa (default) and eager")
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        h.append(self.model.register_forward_hook(self._model_post))
        h.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            h.append(layer.register_forward_pre_hook(self._make_layer_pre(i), with_kwargs=True))
            h.append(layer.register_forward_hook(self._make_layer_post(i), with_kwargs=True))
            if i in self.spec.score_layers:
                q_mod, k_mod = query_key_modules(layer.self_attn)
                h.append(q_mod.register_forward_hook(self._make_proj_hook(i, "q")))
                h.append(k_mod.register_forward_hook(self._make_proj_hook(i, "k")))
        if self.spec.arp:
            from posbias.runtime.vision import VisionImportance

            self._vision = VisionImportance(self.arch)
            self._vision.attach()
        self.model._posbias_pruner = self
        self._enabled = True
        return self

    def disable(self) -> None:
        """Remove every hook; the model is exactly as before :func:`enable_pruning`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._vision is not None:
            self._vision.detach()
            self._vision = None
        if getattr(self.model, "_posbias_pruner", None) is self:
            del self.model._posbias_pruner
        self._state = None
        self._enabled = False

    def __enter__(self) -> "Pruner":
        return self.enable()

    def __exit__(self, *exc: Any) -> None:
        self.disable()

    # ------------------------------------------------------------------ model-level hooks
    def _model_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._state = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] < 2:
            return
        is_img = input_ids == self.arch.image_token_id  # (B, S)
        if not bool(is_img.any()):
            return
        if input_ids.shape[0] != 1:
            raise PosbiasError(f"pruning supports batch size 1; got a batch of {input_ids.shape[0]} prompts")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.bool().all()):
            raise PosbiasError("the prompt's attention_mask has padding; pruning supports one unpadded prompt")
        past = kwargs_cache(kwargs)
        if past is not None and hasattr(past, "get_seq_length") and int(past.get_seq_length()) > 0:
            raise PosbiasError("pruning needs the image prompt prefilled from an empty cache; pass a fresh cache")
        visual_index = self.arch.visual_index(input_ids)  # (V,) int64
        tokens = self.arch.token_grid({**kwargs, "input_ids": input_ids}, visual_index)
        st = _Prefill(torch.from_numpy(visual_index), tokens, int(input_ids.shape[1]), None)
        # one-line error before the vision tower runs; keep counts grid tokens, a UTP schedule every visual token
        self.spec.check_budget(st.n_all if self.spec.method == "utp" else st.n_visual)
        self._state = st

    def _model_post(self, module: Any, args: tuple, output: Any) -> None:
        st = self._state
        if st is not None:
            self.last = PruneRecord(
                n_visual=st.n_all,
                seq_len=st.seq_len,
                kept=torch.sort(torch.cat([st.run_index[st.vis_ids], st.sep_index])).values,
                stages=list(st.stages),
                tokens_per_layer=list(st.tokens_per_layer),
                select_ms=1000.0 * st.select_s,
                scoring_rows=dict(st.scoring_rows),
                vision_importance=st.importance,
            )
            if self._vision is not None:
                self._vision.importance = None  # generate() may run the vision tower before this call
        self._state = None

    def _lm_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        st = self._state
        if st is None:
            return
        emb = kwargs.get("inputs_embeds")
        if emb is None or emb.shape[1] != st.seq_len:
            self._state = None  # not the prompt we saw (e.g. a custom call); leave it unpruned
            return
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(st.seq_len, device=emb.device)[None]  # (1, S)
        elif pos.ndim == 3 and pos.shape[0] == 4:
            pos = pos[1:]  # drop the text row of packed Qwen positions
        st.positions = pos
        st.additions = self.arch.take_layer_additions(kwargs)  # Qwen3-VL's deepstack: added to kept tokens only
        if st.additions is not None:
            return args, kwargs
        return None

    # ------------------------------------------------------------------ layer hooks
    def _make_layer_pre(self, i: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            st = self._state
            if st is None:
                return self._decode_pre(i, args, kwargs)
            args = list(args)
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0 and self.spec.arp:
                hidden = self._apply_arp(hidden)
            if not st.full:
                idx = st.seq_index.to(hidden.device)
                cos, sin = kwargs["position_embeddings"]
                kwargs["position_embeddings"] = (cos.index_select(-2, idx), sin.index_select(-2, idx))
                pid = kwargs.get("position_ids")
                if isinstance(pid, torch.Tensor) and pid.shape[-1] == st.seq_len:
                    kwargs["position_ids"] = pid.index_select(-1, idx)
                m = kwargs.get("attention_mask")
                if isinstance(m, torch.Tensor):
                    kwargs["attention_mask"] = m.index_select(-2, idx).index_select(-1, idx)
            st.tokens_per_layer.append(int(hidden.shape[1]))
            if i in self.spec.score_layers:
                st.pos_emb[i] = kwargs["position_embeddings"]
            if args:
                args[0] = hidden
            else:
                kwargs["hidden_states"] = hidden
            return tuple(args), kwargs

        return hook

    def _decode_pre(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        m = kwargs.get("attention_mask")
        if not isinstance(m, torch.Tensor) or self.last is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != 1:
            return None
        all_on = bool(m.all()) if m.dtype == torch.bool else bool((m == 0).all())
        if not all_on:
            raise PosbiasError("decoding a pruned prompt with a padded attention mask is not supported; use batch 1")
        kwargs["attention_mask"] = None  # a single query over an unpadded cache attends to every key
        return tuple(args), kwargs

    def _make_proj_hook(self, i: int, which: str):
        def hook(module: Any, args: tuple, output: torch.Tensor) -> None:
            st = self._state
            if st is not None:  # (1, S, H*D), or (1, S, H, D) from a per-head q/k norm
                (st.q if which == "q" else st.k)[i] = output.detach().flatten(2)

        return hook

    def _make_layer_post(self, i: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            st = self._state
            if st is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output  # (1, S_cur, D)
            added = st.additions is not None and i < len(st.additions.embeds)
            if added:  # what the decoder adds after this layer, to the tokens still in the sequence
                hidden = st.additions.apply(hidden, i, st.seq_index.to(hidden.device))
            if i not in self.spec.score_layers:
                return _replace_hidden(output, hidden) if added else None
            t0 = time.perf_counter()
            keep_local = self._select(i, hidden)  # (K,) indices into the current visual tokens, or None
            st.select_s += time.perf_counter() - t0
            st.q.pop(i, None)
            st.k.pop(i, None)
            st.pos_emb.pop(i, None)
            if keep_local is None:
                return _replace_hidden(output, hidden) if added else None
            new_hidden = self._drop(hidden, keep_local)
            st.stages.append((i, int(keep_local.shape[0])))
            return _replace_hidden(output, new_hidden)

        return hook

    # ------------------------------------------------------------------ pruning steps
    def _drop(self, hidden: torch.Tensor, keep_local: torch.Tensor) -> torch.Tensor:
        """Keep all text tokens and the visual tokens ``keep_local`` (indices into the alive visual tokens)."""
        st = self._state
        assert st is not None
        s_cur = int(hidden.shape[1])
        alive = torch.ones(s_cur, dtype=torch.bool)
        alive[st.vis_local] = False
        alive[st.vis_local[keep_local]] = True
        local = torch.nonzero(alive).flatten()  # (S_new,) ascending
        st.seq_index = st.seq_index[local]
        new_pos = torch.full((s_cur,), -1, dtype=torch.int64)
        new_pos[local] = torch.arange(local.shape[0])
        st.vis_local = new_pos[st.vis_local[keep_local]]
        st.vis_ids = st.vis_ids[keep_local]
        st.full = False
        return hidden.index_select(1, local.to(hidden.device))

    def _apply_arp(self, hidden: torch.Tensor) -> torch.Tensor:
        st = self._state
        assert st is not None and self._vision is not None
        imp = self._vision.importance
        if imp is None or imp.shape[0] != st.n_all:
            raise RuntimeError("ARP saw no vision importance for this prompt; the vision hooks did not fire")
        st.importance = imp.detach().float().cpu()
        t0 = time.perf_counter()
        p = self.spec.params
        imp = st.importance[st.run_index]  # (V,) the grid tokens'
        parts = []
        for t, grid in enumerate(st.tiles):  # ARP's blocks on each tile's own grid: never across tiles
            idx = torch.nonzero(st.tile == t).flatten()  # (V_t,)
            if idx.numel():
                kept_t = arp_select(imp[idx], st.rows[idx], st.cols[idx], grid, blocks=int(p["arp_blocks"]),
                                    centre_ratio=float(p["arp_centre_ratio"]),
                                    edge_ratio=float(p["arp_edge_ratio"]))
                parts.append(idx[kept_t])
        kept = torch.sort(torch.cat(parts)).values
        st.select_s += time.perf_counter() - t0
        self.spec.check_budget(int(kept.shape[0]), after="ARP")
        st.stages.append((-1, int(kept.shape[0])))
        return self._drop(hidden, kept)

    def _attention_row(self, i: int, *, agnostic: bool = False) -> torch.Tensor:
        """(V_cur,) float32 head-mean attention of the last token over the alive visual tokens at layer i
        (:func:`posbias.kernels.last_token_attention` on the layer's own queries and keys, RoPE applied with
        the layer's cos/sin; with ``agnostic`` the visual keys sit at UTP's uniform position)."""
        st = self._state
        assert st is not None
        attn = self.layers[i].self_attn
        q, k = st.q[i], st.k[i]  # (1, S, H*D), (1, S, Hkv*D), before RoPE
        cos, sin = st.pos_emb[i]  # (1, S, D) each
        d = int(cos.shape[-1])
        n_h, n_kv, s = q.shape[-1] // d, k.shape[-1] // d, k.shape[1]
        qh = q[:, -1:].float().view(1, 1, n_h, d).transpose(1, 2)  # (1, H, 1, D)
        kh = k.float().view(1, s, n_kv, d).transpose(1, 2)  # (1, Hkv, S, D)
        c, sn = cos.float().unsqueeze(1), sin.float().unsqueeze(1)  # (1, 1, S, D)
        qh = apply_rope(qh, c[:, :, -1:], sn[:, :, -1:])
        k_rot = apply_rope(kh, c, sn)
        if agnostic:
            pc, ps = self._uniform_rope(kh)  # (1, 1, 1, D)
            vis = st.vis_local.to(kh.device)
            k_rot[:, :, vis] = apply_rope(kh[:, :, vis], pc, ps)
        scaling = float(getattr(attn, "scaling", d ** -0.5))
        probs = last_token_attention(qh, k_rot, None, scaling)[0]  # (H, S)
        row = probs.mean(0).index_select(0, st.vis_local.to(probs.device)).cpu()  # (V_cur,)
        st.scoring_rows[i] = row
        return row

    def _uniform_rope(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at UTP's uniform visual position p' = floor((p1 + p2) / 2 + 1/2), per M-RoPE component."""
        st = self._state
        assert st is not None
        pos = st.positions  # (1, S) or (3, 1, S) of the full prompt
        vis_full = st.seq_index[st.vis_local].to(pos.device)  # original positions of the alive visual tokens
        pv = pos.index_select(-1, vis_full)  # (..., V_cur)
        p_mid = uniform_position(pv.amin(-1, keepdim=True), pv.amax(-1, keepdim=True))  # (..., 1) per axis
        cos, sin = self.lm.rotary_emb(like.new_zeros(1, 1, 1), p_mid)  # (1, 1, D)
        return cos.float()[:, None], sin.float()[:, None]

    def _select(self, i: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Indices into the alive visual tokens to keep after layer i, or None when nothing is pruned."""
        st = self._state
        assert st is not None
        vis = st.vis_local
        ids = st.vis_ids
        sel = Selection(layer=i, spec=self.spec, n_visual=st.n_visual, ids=ids, grid=st.grid,
                        rows=st.rows[ids], cols=st.cols[ids], tile=st.tile[ids], tiles=st.tiles,
                        run_index=st.run_index[ids], n_run=st.n_all, n_separators=st.n_sep,
                        attention=lambda agnostic=False: self._attention_row(i, agnostic=agnostic),
                        features=lambda: hidden[0].index_select(0, vis.to(hidden.device)).cpu(),  # (V_cur, D)
                        keys=lambda: st.k[i][0].index_select(0, vis.to(st.k[i].device)).cpu())  # (V_cur, Hkv*D)
        return get_method(self.spec.method).run(sel)


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A decoder layer's output with its hidden states replaced (a tuple keeps its other items)."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def enable_pruning(
    model: Any,
    calibration: Calibration | None = None,
    *,
    method: str | None = None,
    keep: int | None = None,
    ratio: float | None = None,
    layer: int | None = None,
    params: dict[str, Any] | None = None,
    schedule: list[int] | None = None,
    check_fingerprint: bool = True,
    force: bool = False,
    k: int | None = None,
) -> Pruner:
    """Make a VLM drop visual tokens during prefill.

    Parameters
    ----------
    model : transformers model or posbias adapter
        A model of a registered architecture (:func:`posbias.models.registry.supported_model_types`:
        ``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
        ``Qwen2_5_VLForConditionalGeneration``, ...), sdpa or eager attention.
    calibration : Calibration, optional
        Needed by every method but ``fastv``; its fingerprint must equal the model's.
    method : str, optional
        A registered method (:func:`posbias.runtime.registry.known_methods`: fastv, pore, posprune-pbc,
        posprune, adaptprune, utp and any registered later).
        Default: the calibration's ``defaults.method`` (``fastv`` without a calibration).
    keep : int, optional
        Visual tokens kept after the pruning layer (1..V). Exactly one of ``keep`` and ``ratio``
        (default: the calibration's ``defaults.keep``). For ``utp`` it picks the schedule whose
        compression ratio is nearest ``V / keep``.
    ratio : float, optional
        Fraction of the visual tokens kept, in (0, 1].
    layer : int, optional
        0-based decoder layer whose last-token attention scores the visual tokens; they are dropped after it;
        default: the method's layer in the calibration (K=2 for fastv without one: layer 1).
    k : int, optional
        The papers' convention instead of ``layer``: FastV / AdaptPrune / PosPrune ``K`` (score with layer
        ``K - 1``, prune from layer ``K``); ``k=2`` is ``layer=1``. Pass one of ``layer`` and ``k``.
    params : dict, optional
        Overrides of the method's parameters (names: :data:`posbias.runtime.spec.PARAMS`); unknown
        names are an error.
    schedule : list of int, optional
        Explicit UTP schedule (L,) with ``schedule[0] == V`` (instead of the calibration's).
    check_fingerprint : bool
        Refuse a calibration made for another model (default True).
    force : bool
        Use a calibration entry whose quality verdict is ``unusable`` (refused otherwise); a ``weak`` one is
        used with a :class:`~posbias.runtime.quality.CalibrationQualityWarning`, once per calibration entry.

    Returns
    -------
    Pruner
        Already enabled; use it as a context manager or call ``disable()``.
    """
    model = unwrap_model(model)
    arch = architecture_of(model)  # one-line error for an unsupported architecture, before anything else
    spec = resolve_method(model, calibration, method=method, keep=keep, ratio=ratio, layer=layer,
                          params=params, schedule=schedule, check_fingerprint=check_fingerprint, k=k)
    check_entry_quality(calibration, spec.method, params=spec.params, force=force)  # the resolved parameters
    return Pruner(model, spec, arch).enable()
