"""posbias.models: architectures and their adapters, model loading, and the demo / tiny models.

Adapters and heavy imports (torch, transformers) load lazily on first attribute access.
"""

from __future__ import annotations

from posbias._lazy import lazy_getattr

__all__ = [
    "VisualLayout",
    "TokenGrid",
    "Architecture",
    "ModelAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "Qwen25VLAdapter",
    "Qwen2VLAdapter",
    "load_adapter",
    "known_aliases",
    "architecture_of",
    "register_adapter",
    "demo_model_dir",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
]

_LAZY = {
    "VisualLayout": "posbias.models.base",
    "TokenGrid": "posbias.models.base",
    "Architecture": "posbias.models.base",
    "ModelAdapter": "posbias.models.base",
    "LlavaAdapter": "posbias.models.llava",
    "LlavaNextAdapter": "posbias.models.llava_next",
    "Qwen25VLAdapter": "posbias.models.qwen2_5_vl",
    "Qwen2VLAdapter": "posbias.models.qwen2_vl",
    "load_adapter": "posbias.models.registry",
    "known_aliases": "posbias.models.registry",
    "architecture_of": "posbias.models.registry",
    "register_adapter": "posbias.models.registry",
    "demo_model_dir": "posbias.models.demo",
    "tiny_llava": "posbias.models.tiny",
    "tiny_llava_next": "posbias.models.tiny",
    "tiny_qwen2_5_vl": "posbias.models.tiny",
    "tiny_qwen2_vl": "posbias.models.tiny",
}

__getattr__ = lazy_getattr(__name__, _LAZY)
