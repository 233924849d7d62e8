"""Model aliases, adapter registry and :func:`load_adapter`.

``load_adapter(name_or_path)`` accepts

- a local checkpoint folder (``config.json`` inside): loaded directly;
- an alias (``qwen2.5-vl-7b``, ``llava-1.5-7b``, ...) or a hub id (``org/name``): loaded from the
  Hugging Face cache when it is there (revision = the snapshot folder's commit hash); otherwise one
  ``config.json`` metadata request with a short timeout decides whether the hub is reachable. If it is,
  ``from_pretrained`` downloads as usual; if not, :class:`~posbias.errors.ModelUnavailableError` comes
  within seconds (no long network hang);
- ``demo-llava`` / ``demo-llava-next`` / ``demo-qwen2.5-vl`` / ``demo-qwen2-vl``: SmolLM2 decoder with a seeded random vision side
  (:mod:`posbias.models.demo`), built once and cached on disk;
- ``tiny-llava`` / ``tiny-llava-next`` / ``tiny-qwen2.5-vl`` / ``tiny-qwen2-vl``: tiny random models for tests (:mod:`posbias.models.tiny`).

The adapter class is chosen from ``config.model_type`` (``"llava"``, ``"llava_next"``, ``"qwen2_5_vl"``,
``"qwen2_vl"``) and imported lazily;
:data:`ADAPTERS` holds one line per architecture. :func:`architecture_of` gives the runtime the
:class:`~posbias.models.base.Architecture` of a loaded transformers model (the adapter class names it), and
:func:`register_adapter` adds an architecture from outside the package (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from posbias.errors import ModelUnavailableError, PosbiasError
from posbias.models.base import Architecture, ModelAdapter, resolve_dtype

__all__ = [
    "HUB_ALIASES",
    "DEMO_ALIASES",
    "TINY_ALIASES",
    "ADAPTERS",
    "known_aliases",
    "adapter_class",
    "architecture_class",
    "architecture_of",
    "register_adapter",
    "supported_model_types",
    "resolve_model_id",
    "load_adapter",
    "HUB_TIMEOUT_S",
]

#: alias -> Hugging Face hub id
HUB_ALIASES: dict[str, str] = {
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
    "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
    "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "llava-v1.6-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-v1.6-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
    "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
    "internvl3-8b": "OpenGVLab/InternVL3-8B-hf",
}
#: alias -> architecture of the demo models (SmolLM2 decoder, untrained vision side)
DEMO_ALIASES: dict[str, str] = {
    "demo-llava": "llava", "demo-llava-next": "llava_next", "demo-qwen2.5-vl": "qwen2_5_vl", "demo-qwen2-vl": "qwen2_vl",
    "demo-internvl": "internvl", "demo-qwen3-vl": "qwen3_vl",
}
#: alias -> architecture of the tiny random test models
TINY_ALIASES: dict[str, str] = {
    "tiny-llava": "llava", "tiny-llava-next": "llava_next", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen2-vl": "qwen2_vl",
    "tiny-internvl": "internvl", "tiny-qwen3-vl": "qwen3_vl",
}
#: config.model_type -> "module:Class" of its adapter (imported on first use), or the class itself
#: (:func:`register_adapter`); the adapter's ``architecture`` attribute is the torch-only part the runtime uses
ADAPTERS: dict[str, Any] = {
    "llava": "posbias.models.llava:LlavaAdapter",
    "llava_next": "posbias.models.llava_next:LlavaNextAdapter",
    "qwen2_5_vl": "posbias.models.qwen2_5_vl:Qwen25VLAdapter",
    "qwen2_vl": "posbias.models.qwen2_vl:Qwen2VLAdapter",
    "internvl": "posbias.models.internvl:InternVLAdapter",
    "qwen3_vl": "posbias.models.qwen3_vl:Qwen3VLAdapter",
}
#: seconds allowed for the one reachability request to the hub
HUB_TIMEOUT_S: float = 5.0


def known_aliases() -> list[str]:
    """All aliases :func:`load_adapter` accepts besides paths and hub ids."""
    return [*HUB_ALIASES, *DEMO_ALIASES, *TINY_ALIASES]


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values an adapter is registered for, sorted."""
    return sorted(ADAPTERS)


def _unsupported(model_type: Any, what: str = "") -> PosbiasError:
    return PosbiasError(
        f"{what}model_type {model_type!r} is not a supported architecture; supported: "
        f"{', '.join(supported_model_types())} (docs/architecture.md says how to add one)"
    )


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class for a ``config.model_type``.

    Raises
    ------
    posbias.errors.PosbiasError
        When no adapter handles that architecture (one line naming the supported ones).
    """
    target = ADAPTERS.get(model_type)
    if target is None:
        raise _unsupported(model_type)
    if isinstance(target, str):
        module_name, class_name = target.split(":")
        return getattr(importlib.import_module(module_name), class_name)
    return target


def architecture_class(model_type: str) -> type[Architecture]:
    """The :class:`~posbias.models.base.Architecture` subclass for a ``config.model_type``."""
    return adapter_class(model_type).architecture  # type: ignore[attr-defined]


def architecture_of(model: Any) -> Architecture:
    """The :class:`~posbias.models.base.Architecture` of a loaded transformers VLM (or of a posbias adapter's
    model), from ``model.config.model_type``.

    Raises
    ------
    posbias.errors.PosbiasError
        For a model of an architecture without a registered adapter.
    """
    arch = getattr(model, "arch", None)
    if isinstance(arch, Architecture):  # a posbias adapter
        return arch
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise _unsupported(model_type, f"{type(model).__name__} of ")
    return architecture_class(str(model_type))(model)


def register_adapter(model_type: str, adapter: Any) -> None:
    """Register an adapter (class or ``"module:Class"``) for ``config.model_type`` (one registry line at run
    time; the package's own architectures are the lines of :data:`ADAPTERS`)."""
    if not isinstance(model_type, str) or not model_type:
        raise PosbiasError(f"model_type {model_type!r} must be a non-empty string")
    ADAPTERS[model_type] = adapter


def resolve_model_id(name: str) -> str:
    """Hub id of an alias; a string shaped like ``org/name`` passes through.

    Raises
    ------
    posbias.errors.PosbiasError
        For an unknown alias that is neither a local path nor a hub id.
    """
    if name in HUB_ALIASES:
        return HUB_ALIASES[name]
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):
        return name
    raise PosbiasError(
        f"model {name!r} is neither a local checkpoint folder nor a known alias; "
        f"use a path or one of: {', '.join(known_aliases())}"
    )


def _read_model_type(folder: Path) -> str:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PosbiasError(f"model folder {str(folder)!r} has no config.json; pass a Hugging Face checkpoint folder")
    try:
        with open(config_path, encoding="utf-8") as fh:
            model_type = json.load(fh).get("model_type")
    except (OSError, ValueError) as err:
        raise PosbiasError(f"cannot read {str(config_path)!r} ({err}); pass a valid checkpoint folder") from err
    if not model_type:
        raise PosbiasError(f"{str(config_path)!r} names no model_type; pass a Hugging Face checkpoint folder")
    return str(model_type)


def _load_folder(folder: Path, *, device: str, dtype: Any, model_id: str, revision: str | None,
                 **extra: Any) -> ModelAdapter:
    cls = adapter_class(_read_model_type(folder))
    return cls.from_pretrained(folder, device=device, dtype=dtype, model_id=model_id, revision=revision, **extra)


def _cached_snapshot(repo_id: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """The cache snapshot folder holding ``config.json`` of ``repo_id``, or None."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json", cache_dir=None if cache_dir is None else str(cache_dir))
    if isinstance(hit, str) and os.path.isfile(hit):
        return Path(hit).parent
    return None


def _hub_revision(repo_id: str) -> str:
    """Commit hash of ``repo_id`` from one metadata request with a short timeout.

    Raises
    ------
    posbias.errors.ModelUnavailableError
        When the hub is offline, unreachable, or does not serve ``repo_id``.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        raise OSError("HF_HUB_OFFLINE is set")
    meta = get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_TIMEOUT_S)
    return str(meta.commit_hash) if meta.commit_hash else ""


def _load_demo(name: str, *, device: str, dtype: Any, cache_dir: str | os.PathLike | None, **extra: Any) -> ModelAdapter:
    """Adapter for demo model ``name`` (:mod:`posbias.models.demo`), building and caching it on first use."""
    from posbias.models.demo import build_demo

    folder = build_demo(name, cache_dir)
    cls = adapter_class(DEMO_ALIASES[name])
    adapter: ModelAdapter = cls.from_pretrained(folder, device=device, dtype=dtype, model_id=name, **extra)
    adapter.revision = None
    return adapter


def load_adapter(
    name_or_path: str | os.PathLike,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    **extra: Any,
) -> ModelAdapter:
    """Load a model and wrap it in its adapter.

    Parameters
    ----------
    name_or_path : str or PathLike
        Local checkpoint folder, alias (see :func:`known_aliases`) or hub id.
    device : str
        Torch device string ("cpu", "cuda", "cuda:1").
    dtype : str
        "float32", "float16" or "bfloat16".
    cache_dir : str or PathLike, optional
        Hugging Face cache for hub models; for ``demo-*`` the demo cache folder.
    **extra
        Passed to the adapter's ``from_pretrained`` (e.g. ``min_pixels``/``max_pixels`` for Qwen2.5-VL).

    Returns
    -------
    ModelAdapter
        Model in eval mode on ``device``; ``revision`` is the checkpoint commit hash when known.

    Raises
    ------
    posbias.errors.ModelUnavailableError
        A hub model that is neither cached nor downloadable here (fails within seconds).
    posbias.errors.PosbiasError
        Unknown alias, bad dtype, a folder that is not a supported checkpoint, or a transformers/torch
        release outside the supported range (checked before anything is loaded).
    """
    from posbias._hf_compat import check_versions

    check_versions()
    resolve_dtype(dtype)  # validate early
    name = os.fspath(name_or_path)
    if name in TINY_ALIASES:
        from posbias.models import tiny

        given = {k: v for k, v in extra.items() if v is not None}
        arch = TINY_ALIASES[name]
        if arch in ("llava", "llava_next"):
            if given:
                label = "LLaVA-NeXT" if arch == "llava_next" else "LLaVA"
                raise PosbiasError(f"options {sorted(given)} do not apply to {label} models; drop them")
            adapter = getattr(tiny, f"tiny_{arch}")()
        else:
            label = adapter_class(arch).label
            unknown = sorted(set(given) - {"min_pixels", "max_pixels"})
            if unknown:
                raise PosbiasError(f"options {unknown} do not apply to {label} models; drop them")
            adapter = getattr(tiny, f"tiny_{arch}")()
            if given:
                adapter.set_pixel_limits(**given)
        adapter.model.to(device=device, dtype=resolve_dtype(dtype))
        return adapter
    if name in DEMO_ALIASES:
        return _load_demo(name, device=device, dtype=dtype, cache_dir=cache_dir, **extra)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _load_folder(folder, device=device, dtype=dtype, model_id=str(folder), revision=None, **extra)
    repo_id = resolve_model_id(name)
    label = f"model {name!r}" + (f" ({repo_id})" if repo_id != name else "")
    snapshot = _cached_snapshot(repo_id, cache_dir)
    if snapshot is not None:
        try:
            return _load_folder(snapshot, device=device, dtype=dtype, model_id=repo_id, revision=snapshot.name,
                                **extra)
        except OSError as err:
            raise ModelUnavailableError(
                f"{label} is only partly in the Hugging Face cache ({str(snapshot)!r}: "
                f"{(str(err).splitlines() or [type(err).__name__])[0]}); re-download it "
                "on a machine with access and pass model=/path/to/checkpoint"
            ) from err
    try:
        revision = _hub_revision(repo_id)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot fetch"; re-raised as one line
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(err, HfHubHTTPError):
            raise ModelUnavailableError(
                f"{label} is not in the Hugging Face cache and the hub did not serve it ({type(err).__name__}); "
                "check the model id and your hub login, or pass model=/path/to/checkpoint"
            ) from err
        raise ModelUnavailableError(
            f"{label} is not available offline: not in the Hugging Face cache and the hub cannot be reached "
            f"({type(err).__name__}); download it on a machine with access and pass model=/path/to/checkpoint"
        ) from err
    from transformers import AutoConfig

    hub_kwargs: dict[str, Any] = {"revision": revision or None}
    if cache_dir is not None:
        hub_kwargs["cache_dir"] = str(cache_dir)
    model_type = AutoConfig.from_pretrained(repo_id, **hub_kwargs).model_type
    cls = adapter_class(str(model_type))
    return cls.from_pretrained(repo_id, device=device, dtype=dtype, model_id=repo_id, revision=revision or None,
                               hub_kwargs=hub_kwargs, **extra)
