"""Per-layer information loss for UTP retention schedules (seed 003, section 3.3).

``ell[i]`` (0-based decoder layer i = 0..L-1; the seed's ``l = i + 1``) is the angle
``arccos(cos(f_i, g))`` between the last prompt token's final feature (after the final norm, what the LM
head reads) when every visual token is removed from layer i on (``f_i``) and the same feature of the
full model (``g``). Column 0 removes the visual tokens from the very first layer; the seed uses
``l = 2..L``, i.e. columns 1..L-1.

Fast path (:func:`info_loss`): one full forward records the input of every decoder layer and the
layer kwargs (rotary cos/sin, causal mask). Layers before i are unchanged by removing visual tokens from
layer i on, so run i starts from the recorded input of layer i restricted to the text tokens and runs
layers i..L-1 on text tokens only, with their original RoPE positions (the recorded cos/sin gathered
at the text positions, which carries Qwen2.5-VL's 3-D M-RoPE unchanged). All L runs go through each
layer as one batch. Naive path (:func:`info_loss_naive`): L ordinary full forwards, each with the text
queries' attention to visual keys masked from layer i on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from posbias.errors import PosbiasError

__all__ = ["feature_angle", "info_loss", "info_loss_naive", "profile_info_loss"]


def feature_angle(f: Any, g: Any) -> np.ndarray:
    """Angle between feature rows, ``arccos(cos(f, g))`` computed stably as ``2 atan2(|a-b|, |a+b|)``.

    Parameters
    ----------
    f : array-like
        (..., D) features.
    g : array-like
        (D,) or (..., D) reference feature.

    Returns
    -------
    np.ndarray
        (...,) float64 angles in [0, pi].
    """
    f = np.asarray(f, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    a = f / np.linalg.norm(f, axis=-1, keepdims=True)  # (..., D)
    b = g / np.linalg.norm(g, axis=-1, keepdims=True)  # (..., D)
    return 2.0 * np.arctan2(np.linalg.norm(a - b, axis=-1), np.linalg.norm(a + b, axis=-1))


def _check_inputs(adapter: Any, inputs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(text positions (T_t,), visual positions (V,)) int64 of one prepared prompt."""
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise PosbiasError(f"inputs hold a batch of {ids.shape[0]}; pass one prompt at a time")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise PosbiasError("inputs contain padding; info_loss needs one unpadded prompt (adapter.prepare)")
    layout = adapter.layout(inputs)
    vis = np.asarray(layout.visual_index, dtype=np.int64)  # (V,)
    text = np.setdiff1d(np.arange(int(ids.shape[1]), dtype=np.int64), vis)  # (T_t,)
    if text.size == 0 or text[-1] != ids.shape[1] - 1:
        raise PosbiasError("the prompt must end with a text token (the question); check the adapter's prompt")
    return text, vis


def _record_full(adapter: Any, inputs: dict[str, Any]) -> tuple[list[Any], list[dict[str, Any]], Any]:
    """Full forward; returns (input hidden state per layer, layer kwargs per layer, final feature (D,))."""
    import torch

    lm = adapter.language_model()
    layers = list(lm.layers)
    hidden: list[Any] = [None] * len(layers)
    kwargs_seen: list[dict[str, Any]] = [{} for _ in layers]
    final: list[Any] = [None]

    def pre_hook(idx: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            hs = args[0] if args else kwargs["hidden_states"]
            hidden[idx] = hs.detach()
            kwargs_seen[idx] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return hook

    def norm_hook(module: Any, args: tuple, out: Any) -> None:
        final[0] = out.detach()

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(lm.norm.register_forward_hook(norm_hook))
    try:
        with torch.inference_mode():
            adapter.model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return hidden, kwargs_seen, final[0][0, -1]  # final: (D,)


def _gather_kwargs(kw: dict[str, Any], text_idx: Any, batch: int) -> dict[str, Any]:
    """Layer kwargs restricted to the text positions and expanded to ``batch`` runs."""
    import torch

    out: dict[str, Any] = {}
    for key, val in kw.items():
        if key == "position_embeddings":
            cos, sin = val  # (..., 1, S, D) each
            cos = cos.index_select(-2, text_idx)
            sin = sin.index_select(-2, text_idx)
            shape = list(cos.shape)
            shape[-3] = batch
            out[key] = (cos.expand(*shape), sin.expand(*shape))
        elif key == "attention_mask" and isinstance(val, torch.Tensor):
            m = val.index_select(-2, text_idx).index_select(-1, text_idx)  # (1, 1, T_t, T_t)
            out[key] = m.expand(batch, *m.shape[1:])
        elif key == "position_ids" and isinstance(val, torch.Tensor):
            p = val.index_select(-1, text_idx)
            shape = list(p.shape)
            shape[-2] = batch
            out[key] = p.expand(*shape)
        elif key in ("past_key_values", "cache_position"):
            out[key] = None
        elif key == "use_cache":
            out[key] = False
        else:
            out[key] = val
    return out


def info_loss(adapter: Any, inputs: dict[str, Any], *, return_features: bool = False) -> Any:
    """Information loss ``ell`` (L,) of one prompt, fast path (reuses the full forward's layer inputs).

    Parameters
    ----------
    adapter : posbias.models.base.TransformersAdapter
        Loaded model adapter.
    inputs : dict
        ``adapter.prepare(image, question)`` output (batch of one, no padding).
    return_features : bool
        Also return ``(f, g)``: (L, D) float64 features with visual tokens removed from layer i on and
        the (D,) full-model feature.

    Returns
    -------
    np.ndarray or tuple
        (L,) float64 angles; with ``return_features`` the tuple ``(ell, f, g)``.
    """
    import torch

    text, _ = _check_inputs(adapter, inputs)
    hidden, kwargs_seen, g = _record_full(adapter, inputs)
    lm = adapter.language_model()
    layers = list(lm.layers)
    n_layers = len(layers)
    dev = hidden[0].device
    text_idx = torch.as_tensor(text, device=dev)
    h = None  # (runs, T_t, D)
    with torch.inference_mode():
        for i, layer in enumerate(layers):
            start = hidden[i].index_select(1, text_idx)  # (1, T_t, D) run i starts here
            h = start if h is None else torch.cat([h, start], dim=0)
            kw = _gather_kwargs(kwargs_seen[i], text_idx, int(h.shape[0]))
            out = layer(h, **kw)
            h = out[0] if isinstance(out, tuple) else out
        feats = lm.norm(h[:, -1:, :])[:, 0, :]  # (L, D)
    f = feats.double().cpu().numpy()  # (L, D) float64
    g_np = g.double().cpu().numpy()  # (D,) float64
    ell = feature_angle(f, g_np)  # (L,)
    if n_layers != f.shape[0]:  # pragma: no cover - defensive
        raise RuntimeError("internal: one feature per layer expected")
    return (ell, f, g_np) if return_features else ell


def info_loss_naive(adapter: Any, inputs: dict[str, Any], *, return_features: bool = False) -> Any:
    """Information loss ``ell`` (L,) by L full forwards (reference for :func:`info_loss`).

    Forward i runs the unmodified model except that, from layer i on, text queries cannot attend to
    visual keys (the causal mask of those layers is edited): the text tokens then compute exactly what
    they would with the visual tokens removed from layer i on. Needs a tensor mask, so it runs the model
    with eager attention for the duration of the call.
    """
    import torch

    text, vis = _check_inputs(adapter, inputs)
    lm = adapter.language_model()
    layers = list(lm.layers)
    model = adapter.model
    _, _, g = _record_full(adapter, inputs)
    s = int(inputs["input_ids"].shape[1])
    dtype = adapter.model.get_input_embeddings().weight.dtype
    dev = g.device
    neg = torch.finfo(dtype).min
    base = torch.full((s, s), neg, dtype=dtype, device=dev).triu(1)  # (S, S) additive causal
    blocked = base.clone()
    ti = torch.as_tensor(text, device=dev)
    vi = torch.as_tensor(vis, device=dev)
    blocked[ti.unsqueeze(1), vi.unsqueeze(0)] = neg  # text queries cannot see visual keys
    base4 = base[None, None]  # (1, 1, S, S)
    blocked4 = blocked[None, None]  # (1, 1, S, S)

    feats = []
    for start in range(len(layers)):

        def pre_hook(idx: int):
            def hook(module: Any, args: tuple, kwargs: dict) -> tuple:
                kwargs = dict(kwargs)
                kwargs["attention_mask"] = blocked4 if idx >= start else base4
                return args, kwargs

            return hook

        handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        final: list[Any] = [None]
        handles.append(lm.norm.register_forward_hook(lambda m, a, o: final.__setitem__(0, o.detach())))
        old = _set_eager(model)
        try:
            with torch.inference_mode():
                model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            _restore_attn(model, old)
            for h in handles:
                h.remove()
        feats.append(final[0][0, -1].double().cpu().numpy())
    f = np.stack(feats)  # (L, D) float64
    g_np = g.double().cpu().numpy()  # (D,)
    ell = feature_angle(f, g_np)
    return (ell, f, g_np) if return_features else ell


def _set_eager(model: Any) -> Any:
    """Switch the decoder to eager attention; returns the previous implementation name."""
    lm_config = model.model.language_model.config
    old = getattr(lm_config, "_attn_implementation", None)
    lm_config._attn_implementation = "eager"
    return old


def _restore_attn(model: Any, old: Any) -> None:
    model.model.language_model.config._attn_implementation = old


def profile_info_loss(
    adapter: Any, samples: Iterable[Any], *, progress: bool = False
) -> tuple[list[str], np.ndarray]:
    """Information loss of every sample.

    Parameters
    ----------
    adapter : TransformersAdapter
        Loaded model.
    samples : iterable of posbias.data.base.Sample
        Samples to profile (BadSample items are skipped).
    progress : bool
        Show a progress bar.

    Returns
    -------
    ids : list of str
        (S,) sample ids in order.
    loss : np.ndarray
        (S, L) float32 information loss.
    """
    from tqdm import tqdm

    from posbias.data.base import BadSample

    ids: list[str] = []
    rows: list[np.ndarray] = []
    for item in tqdm(samples, disable=not progress, unit="sample", desc="utr loss"):
        if isinstance(item, BadSample):
            continue
        inputs = adapter.prepare(item.image, item.question)
        rows.append(info_loss(adapter, inputs).astype(np.float32))
        ids.append(item.id)
    loss = np.stack(rows) if rows else np.zeros((0, adapter.n_layers), dtype=np.float32)  # (S, L)
    return ids, loss
