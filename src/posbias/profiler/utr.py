"""Per-layer information loss for UTP retention schedules (section 3.3).

``ell[i]`` (0-based decoder layer i = 0..L-1; UTP's ``l = i + 1``) is the angle
``arccos(cos(f_i, g))`` between the last prompt token's final feature (after the final norm, what the LM
head reads) when every visual token is removed from layer i on (``f_i``) and the same feature of the
full model (``g``). Column 0 removes the visual tokens from the very first layer; UTP uses
``l = 2..L``, i.e. columns 1..L-1.

Fast path (:func:`info_loss`): one full forward records the input of every decoder layer, the layer
kwargs (rotary cos/sin) and the KV cache. Layers before i are unchanged by removing visual tokens from
layer i on, and the text tokens before the image are unchanged at every layer (causal), so run i
starts from the recorded input of layer i restricted to the text tokens after the image and runs
layers i..L-1 on those only, attending to the prefix's cached keys/values and to each other, with
their original RoPE positions (the recorded cos/sin gathered, which carries Qwen2.5-VL's 3-D M-RoPE
unchanged). All L runs go through each layer as one batch. Naive path (:func:`posbias.testing.info_loss_naive`, the tests' reference): L ordinary full forwards, each with the text
queries' attention to visual keys masked from layer i on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from posbias.errors import PosbiasError
from posbias._hf_compat import (
    _CACHE_NAMES,
    PrefixCache,
    cache_layer_kv,
    layer_cache_kwarg,
    output_cache,
)

__all__ = [
    "fill_utr_loss","feature_angle", "info_loss", "profile_info_loss"]


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


def _record_full(adapter: Any, inputs: dict[str, Any], *, with_cache: bool = False) -> tuple[list[Any], list[dict[str, Any]], Any, Any]:
    """Full forward; returns (input hidden state per layer, layer kwargs per layer, final feature (D,), cache).

    ``cache`` is the forward's KV cache (``with_cache``) or None.
    """
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
            out = adapter.model(**inputs, use_cache=with_cache, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    cache = output_cache(out) if with_cache else None
    return hidden, kwargs_seen, final[0][0, -1], cache  # final: (D,)


def _suffix_kwargs(kw: dict[str, Any], suffix_idx: Any, batch: int, mask: Any, cache: Any, cache_kwarg: str) -> dict[str, Any]:
    """Layer kwargs for ``batch`` runs over the suffix tokens: gathered RoPE, explicit mask, prefix cache
    (passed under ``cache_kwarg``, the layer's own name for it)."""
    out: dict[str, Any] = {}
    for key, val in kw.items():
        if key == "position_embeddings":
            cos, sin = val  # (..., 1, S, D) each
            cos = cos.index_select(-2, suffix_idx)
            sin = sin.index_select(-2, suffix_idx)
            shape = list(cos.shape)
            shape[-3] = batch
            out[key] = (cos.expand(*shape), sin.expand(*shape))
        elif key == "position_ids" and hasattr(val, "index_select"):
            p = val.index_select(-1, suffix_idx)
            shape = list(p.shape)
            shape[-2] = batch
            out[key] = p.expand(*shape)
        elif key in ("attention_mask", "cache_position", "use_cache") or key in _CACHE_NAMES:  # our own mask and cache go in
            continue
        else:
            out[key] = val
    out["attention_mask"] = mask.expand(batch, -1, -1, -1)  # (B, 1, T_a, T_p + T_a)
    out[cache_kwarg] = cache
    out["use_cache"] = False
    return out


def info_loss(adapter: Any, inputs: dict[str, Any], *, return_features: bool = False) -> Any:
    """Information loss ``ell`` (L,) of one prompt, fast path.

    One full forward (with its KV cache) records every decoder layer's input. Removing the visual tokens
    from layer i on changes nothing before layer i, and nothing for the text tokens BEFORE the image at
    any layer (causal attention: they never see the image). So run i restarts at layer i from the
    recorded states of the text tokens AFTER the image only (``T_a`` of them), which attend to the
    prefix's keys/values taken from the full forward's cache plus their own, with their original RoPE
    positions (recorded cos/sin gathered, so Qwen2.5-VL's 3-D M-RoPE is kept). The L runs go through
    each layer as one batch (runs 0..i at layer i): ``T_a L (L+1) / 2`` token-layers in all.

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

    text, vis = _check_inputs(adapter, inputs)
    hidden, kwargs_seen, g, cache = _record_full(adapter, inputs, with_cache=True)
    lm = adapter.language_model()
    layers = list(lm.layers)
    first_vis = int(vis.min())
    prefix = text[text < first_vis]  # (T_p,) never see the image
    suffix = text[text > first_vis]  # (T_a,) recomputed per run
    dev = hidden[0].device
    dtype = hidden[0].dtype
    suffix_idx = torch.as_tensor(suffix, device=dev)
    prefix_idx = torch.as_tensor(prefix, device=dev)
    n_p, n_a = int(prefix.size), int(suffix.size)
    keys, values = [], []
    for i in range(len(layers)):
        k, v = cache_layer_kv(cache, i)  # (1, H_kv, S, D)
        keys.append(k.index_select(-2, prefix_idx))  # (1, H_kv, T_p, D)
        values.append(v.index_select(-2, prefix_idx))
    del cache
    prefix_kv = PrefixCache(keys, values)
    allowed = torch.ones(n_a, n_p + n_a, dtype=torch.bool, device=dev)  # (T_a, T_p + T_a)
    allowed[:, n_p:] = torch.ones(n_a, n_a, dtype=torch.bool, device=dev).tril()
    mask = torch.zeros(n_a, n_p + n_a, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
    mask = mask[None, None]  # (1, 1, T_a, T_p + T_a) additive
    h = None  # (runs, T_a, D)
    with torch.inference_mode():
        for i, layer in enumerate(layers):
            start = hidden[i].index_select(1, suffix_idx)  # (1, T_a, D) run i starts here
            hidden[i] = None  # free as we go
            h = start if h is None else torch.cat([h, start], dim=0)
            kw = _suffix_kwargs(kwargs_seen[i], suffix_idx, int(h.shape[0]), mask, prefix_kv, layer_cache_kwarg(layer))
            out = layer(h, **kw)
            h = out[0] if isinstance(out, tuple) else out
        feats = lm.norm(h[:, -1:, :])[:, 0, :]  # (L, D)
    f = feats.double().cpu().numpy()  # (L, D) float64
    g_np = g.double().cpu().numpy()  # (D,) float64
    ell = feature_angle(f, g_np)  # (L,)
    return (ell, f, g_np) if return_features else ell


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


def _find_samples(wanted: list[str], specs: list[str]) -> list[Any]:
    """Load the samples with ids ``wanted`` (in that order) from the sources ``specs``."""
    from posbias.data.registry import resolve_sources, split_quotas

    names, _ = split_quotas(specs)
    sources = resolve_sources(names)
    where: dict[str, tuple[Any, int]] = {}
    need = set(wanted)
    for src in sources:
        for i in range(len(src)):
            sid = src.sample_id(i)
            if sid in need and sid not in where:
                where[sid] = (src, i)
    missing = [s for s in wanted if s not in where]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise PosbiasError(
            f"{len(missing)} store sample(s) are in none of the sources {', '.join(specs)} ({shown}); "
            "pass the data sources the store was profiled with"
        )
    return [where[s] for s in wanted]


def fill_utr_loss(
    store_path: str,
    *,
    model: str | None = None,
    data: list[str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = False,
    adapter: Any = None,
) -> tuple[int, int]:
    """Compute and write ``/samples/utr_loss`` for a store; returns (samples computed, samples kept).

    Parameters
    ----------
    store_path : str
        Closed profile store.
    model : str or None
        Model to load (default: the store's ``model_id``); ignored when ``adapter`` is given.
    data : list of str or None
        Source specs holding the samples (default: the store's recorded ``data`` attribute).
    device, dtype : str
        Where/how to load the model.
    overwrite : bool
        Recompute rows that are already finite.
    progress : bool
        Show a progress bar.
    adapter : ModelAdapter or None
        An already loaded adapter (tests, notebooks).
    """
    from posbias.data.base import BadSample
    from posbias.profiler.store import ProfileStore, write_utr_loss

    with ProfileStore(store_path) as store:
        ids = list(store.sample_ids)
        attrs = dict(store.attrs)
        old = store.utr_loss  # (S, L) or None
        n_layers = store.n_layers
    if not ids:
        raise PosbiasError(f"store {store_path} has no samples; run 'profile-bias profile' first")
    have = np.zeros(len(ids), dtype=bool) if old is None or overwrite else np.isfinite(old).all(axis=1)
    todo = [sid for sid, ok in zip(ids, have, strict=True) if not ok]
    if not todo:
        return 0, int(have.sum())
    specs = list(data) if data else [s for s in str(attrs.get("data", "")).split(",") if s]
    if not specs:
        raise PosbiasError(f"store {store_path} records no data sources; pass the sources it was profiled from")
    located = _find_samples(todo, specs)
    if adapter is None:
        from posbias.models import load_adapter

        adapter = load_adapter(model or str(attrs.get("model_id")), device=device, dtype=dtype)
    fp = attrs.get("model_fingerprint")
    if fp and adapter.fingerprint() != fp:
        raise PosbiasError(
            f"model {adapter.model_id!r} has fingerprint {adapter.fingerprint()} but store {store_path} was profiled "
            f"with {fp}; pass the store's model (model={attrs.get('model_id')})"
        )
    if adapter.n_layers != n_layers:
        raise PosbiasError(f"model has {adapter.n_layers} decoder layers, the store {n_layers}; pass the store's model")

    def samples() -> Any:
        for src, i in located:
            try:
                yield src.load(i)
            except BadSample as bad:
                raise PosbiasError(f"store sample {bad.sample_id} can no longer be loaded ({bad.reason}); re-profile") from bad

    new_ids, loss = profile_info_loss(adapter, samples(), progress=progress)  # (k, L)
    rows = {sid: row for sid, row in zip(new_ids, loss, strict=True)}
    keep_ids = [sid for sid, ok in zip(ids, have, strict=True) if ok]
    all_ids = keep_ids + new_ids
    pos = {sid: k for k, sid in enumerate(ids)}
    kept = [old[pos[sid]] for sid in keep_ids]
    arr = np.stack(kept + [rows[s] for s in new_ids]).astype(np.float32)  # (k', L)
    write_utr_loss(store_path, all_ids, arr)
    return len(new_ids), len(keep_ids)
