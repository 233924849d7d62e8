"""The one place posbias touches transformers conventions that are not a stable public API.

Everything here needs torch and transformers only (the runtime imports it). What posbias relies on:

- **Versions.** :data:`TRANSFORMERS_RANGE` and :data:`TORCH_RANGE` are the ranges the suite was run on
  (docs/compat.md). :func:`check_versions` refuses anything else with one line naming the range and the
  installed version; it runs when a model is loaded and when pruning is enabled.
- **Decoder-layer calling convention.** Layers are called as ``layer(hidden, attention_mask=...,
  position_embeddings=(cos, sin), position_ids=..., <cache>=...)``, where the cache keyword is
  ``past_key_values`` in transformers 5.17 to 5.23 and ``cache`` in 5.25 (the old name is then deprecated
  and IGNORED when both are given). :func:`layer_cache_kwarg` reads the name from the layer's signature;
  :func:`check_decoder` checks the whole convention once per layer class.
- **Cache objects.** The attention calls ``cache.update(key, value, layer_idx, ...)`` and a
  ``DynamicCache`` exposes ``cache.layers[i].keys`` / ``.values``: :class:`PrefixCache` and
  :func:`cache_layer_kv`. Model outputs carry the cache as ``past_key_values`` (5.23) or
  ``cache`` (5.25 on): :func:`output_cache`, :func:`kwargs_cache`.
- **Attention implementation.** Reading which one a (sub)model uses has no public getter
  (``config._attn_implementation``): :func:`attention_implementation`. Switching uses the public
  ``set_attn_implementation``; a custom implementation is registered once with the public
  ``AttentionInterface.register`` under :data:`ROUTE_NAME` and dispatches per attention module
  (:func:`route_attention`), so nothing is ever unregistered from transformers' private mappings.

Other conventions the adapters use are public methods of the model classes whose behaviour the version
range guards: ``rotary_emb(x, position_ids)`` and ``rotary_emb.inv_freq``, ``model.model.get_rope_index``
(Qwen2.5-VL, ``mm_token_type_ids`` second), ``transformers.vision_utils.get_vision_window_index`` and
``ProcessorMixin.replace_image_token`` (posbias.models.processors). Below 5.17 Qwen2.5-VL hands its
decoder layers per-section M-RoPE cos/sin (3, B, S, D) and applies the sections inside attention, which
the pruner and the signals do not follow: hence the floor.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

from posbias.errors import PosbiasError

__all__ = [
    "TRANSFORMERS_RANGE",
    "TORCH_RANGE",
    "ROUTE_NAME",
    "PrefixCache",
    "attention_implementation",
    "cache_layer_kv",
    "check_decoder",
    "check_versions",
    "kwargs_cache",
    "layer_cache_kwarg",
    "output_cache",
    "query_key_modules",
    "route_attention",
    "routed_modules",
    "sdpa_attention",
    "set_attention_implementation",
    "supported_range_text",
]

#: transformers releases the suite passes on: [floor, ceiling)
TRANSFORMERS_RANGE: tuple[str, str] = ("5.17", "6")
#: torch releases the suite passes on: [floor, ceiling)
TORCH_RANGE: tuple[str, str] = ("2.13", "3")

#: keyword names decoder layers have taken for their KV cache, newest first
_CACHE_NAMES: tuple[str, ...] = ("cache", "past_key_values", "past_key_value")
#: the attention-implementation name posbias registers (once) for its captures
ROUTE_NAME = "posbias_route"


def _release(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as ``5.25.0``, ``2.13.0+cpu`` or ``5.0.0rc1``."""
    parts: list[int] = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
        if len(digits) < len(piece):
            break
    return tuple(parts + [0] * (3 - len(parts)))


def supported_range_text(name: str) -> str:
    """``"transformers>=5.0,<6"`` style text of a supported range (``name`` is transformers or torch)."""
    lo, hi = TRANSFORMERS_RANGE if name == "transformers" else TORCH_RANGE
    return f"{name}>={lo},<{hi}"


def _check_one(name: str, installed: str) -> None:
    lo, hi = TRANSFORMERS_RANGE if name == "transformers" else TORCH_RANGE
    if not _release(lo) <= _release(installed) < _release(hi):
        raise PosbiasError(
            f"{name} {installed} is installed but posbias supports {supported_range_text(name)}; "
            f"install a supported release: pip install \"{supported_range_text(name)}\""
        )


def check_versions(*, transformers_version: str | None = None, torch_version: str | None = None) -> None:
    """Raise one-line :class:`PosbiasError` when the installed transformers or torch is outside the tested range.

    Parameters
    ----------
    transformers_version, torch_version : str, optional
        Versions to check instead of the imported modules' ``__version__``.
    """
    if transformers_version is None:
        import transformers

        transformers_version = str(transformers.__version__)
    _check_one("transformers", transformers_version)
    _check_one("torch", str(torch.__version__) if torch_version is None else torch_version)


# --------------------------------------------------------------------------- decoder layers and caches
@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def layer_cache_kwarg(layer: Any) -> str:
    """The keyword a decoder layer takes its KV cache under (``cache`` from transformers 5.25 on)."""
    params = _forward_params(type(layer))
    for name in _CACHE_NAMES:
        if name in params:
            return name
    raise PosbiasError(
        f"{type(layer).__name__}.forward takes no KV-cache keyword (one of {', '.join(_CACHE_NAMES)}); "
        f"posbias supports {supported_range_text('transformers')}"
    )


def check_decoder(language_model: Any) -> None:
    """Check that the decoder follows the calling convention posbias hooks into (one-line error otherwise).

    Checked: ``language_model.layers`` (with ``self_attn.q_proj``/``k_proj``), ``rotary_emb`` and ``norm``;
    each layer's forward takes ``attention_mask``, ``position_embeddings`` and a cache keyword.
    """
    layers = getattr(language_model, "layers", None)
    missing = [a for a in ("rotary_emb", "norm") if not hasattr(language_model, a)]
    if layers is None or len(layers) == 0 or missing:
        raise PosbiasError(
            f"{type(language_model).__name__} lacks {', '.join(missing) or 'decoder layers'}; posbias supports "
            f"LLaVA and Qwen2.5-VL decoders of {supported_range_text('transformers')}"
        )
    for cls in {type(layer) for layer in layers}:
        params = _forward_params(cls)
        absent = [p for p in ("attention_mask", "position_embeddings") if p not in params]
        if absent:
            raise PosbiasError(
                f"{cls.__name__}.forward takes no {', '.join(absent)}; posbias supports "
                f"{supported_range_text('transformers')}"
            )
    layer_cache_kwarg(layers[0])
    attn = getattr(layers[0], "self_attn", None)
    if attn is None or not hasattr(attn, "q_proj") or not hasattr(attn, "k_proj"):
        raise PosbiasError(
            f"{type(layers[0]).__name__} has no self_attn.q_proj/k_proj; posbias supports "
            f"{supported_range_text('transformers')}"
        )


def query_key_modules(attention: Any) -> tuple[Any, Any]:
    """The modules whose outputs are a decoder attention's queries and keys before RoPE.

    ``q_proj`` / ``k_proj`` (Llama, Qwen2), or the per-head RMS norms after them where the attention has
    them (``q_norm`` / ``k_norm``: Qwen3, Qwen3-VL), whose outputs are (B, S, H, D) instead of (B, S, H*D).
    """
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    if isinstance(q_norm, torch.nn.Module) and isinstance(k_norm, torch.nn.Module):
        return q_norm, k_norm
    return attention.q_proj, attention.k_proj


def kwargs_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a model's or layer's forward keyword arguments (either name), or None."""
    for name in _CACHE_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (``cache`` from transformers 5.25 on, ``past_key_values`` before)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    if "cache" in fields:
        return output.cache
    return getattr(output, "past_key_values", None)


def cache_layer_kv(cache: Any, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values), each (B, H_kv, S, D), of decoder layer ``idx`` in a transformers ``DynamicCache``."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise PosbiasError(
            f"{type(cache).__name__} has no per-layer keys/values; posbias supports {supported_range_text('transformers')}"
        )
    return layers[idx].keys, layers[idx].values


class PrefixCache:
    """Stand-in for a KV cache whose ``update`` prepends fixed prefix keys/values (the ones of the prompt
    text before the image) to the keys/values of the tokens being run, for a batch of runs.

    Parameters
    ----------
    keys, values : list of torch.Tensor
        Per layer, (1, H_kv, T_p, D) keys (after RoPE) and values; expanded over the batch of each call.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """(B, H_kv, T_p + T, D) keys and values: the prefix, then ``key``/``value``; nothing is stored."""
        b = key.shape[0]
        pk = self.keys[layer_idx].expand(b, -1, -1, -1)  # (B, H_kv, T_p, D)
        pv = self.values[layer_idx].expand(b, -1, -1, -1)  # (B, H_kv, T_p, D)
        return torch.cat([pk, key], dim=-2), torch.cat([pv, value], dim=-2)


# --------------------------------------------------------------------------- attention implementations
def attention_implementation(module: Any) -> str | None:
    """Name of the attention implementation a transformers (sub)model runs (``"sdpa"``, ``"eager"``, ...)."""
    return getattr(module.config, "_attn_implementation", None)


def set_attention_implementation(module: Any, name: str) -> None:
    """Switch a transformers (sub)model to a registered attention implementation (public API)."""
    module.set_attn_implementation(name)
    if attention_implementation(module) != name:
        raise RuntimeError(
            f"could not switch {type(module).__name__} to attention {name!r} "
            f"(still {attention_implementation(module)!r})"
        )


def sdpa_attention() -> Callable[..., Any]:
    """transformers' sdpa attention function (``module, q, k, v, mask, **kw -> (out, None)``)."""
    from transformers import AttentionInterface

    return AttentionInterface()["sdpa"]


#: id(attention module) -> handler while a :func:`route_attention` block is active
_ROUTES: dict[int, Callable[..., Any]] = {}


def _dispatch(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any):
    handler = _ROUTES.get(id(module))
    if handler is None:
        handler = sdpa_attention()
    return handler(module, query, key, value, attention_mask, *args, **kwargs)


@functools.lru_cache(maxsize=1)
def _register_route() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ROUTE_NAME, _dispatch)
    AttentionMaskInterface.register(ROUTE_NAME, AttentionMaskInterface()["sdpa"])  # the masks sdpa gets


def routed_modules() -> frozenset[int]:
    """ids of the attention modules currently routed to a handler (empty outside every route block)."""
    return frozenset(_ROUTES)


@contextlib.contextmanager
def route_attention(target: Any, handler: Callable[..., Any]) -> Iterator[None]:
    """While active, every attention call inside ``target`` goes to ``handler``.

    ``handler(module, query, key, value, attention_mask, dropout=..., scaling=..., **kw)`` receives
    query and key after RoPE and must return ``(output, weights)`` as transformers' sdpa function does
    (:func:`sdpa_attention`); masks are built as for sdpa. ``target``'s previous implementation is
    restored on exit, also when the body raises.
    """
    _register_route()
    before = attention_implementation(target)
    ids = [id(m) for m in target.modules()]
    saved = {i: _ROUTES[i] for i in ids if i in _ROUTES}
    for i in ids:
        _ROUTES[i] = handler
    try:
        set_attention_implementation(target, ROUTE_NAME)
        yield
    finally:
        try:
            if before is not None and attention_implementation(target) != before:
                target.set_attn_implementation(before)
        finally:
            for i in ids:
                if i in saved:
                    _ROUTES[i] = saved[i]
                else:
                    _ROUTES.pop(i, None)
