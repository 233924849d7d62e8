"""Model fingerprint: a hash of the config fields that decide visual-token shapes and positions.

Two checkpoints with the same fingerprint lay out visual tokens identically (same grid, same number of
decoder layers and heads, same RoPE), so a calibration made on one applies to the other. Weights are
not hashed: fine-tunes of one architecture share a fingerprint on purpose. stdlib only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["FINGERPRINT_KEYS", "fingerprint_fields", "model_fingerprint"]

#: config keys (at any nesting depth) that decide shapes and positions
FINGERPRINT_KEYS: frozenset[str] = frozenset(
    {
        "model_type",
        # language model geometry
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "mrope_section",
        # vision geometry
        "image_size",
        "patch_size",
        "spatial_merge_size",
        "temporal_patch_size",
        "window_size",
        "fullatt_block_indexes",
        "depth",
        "out_hidden_size",
        # how visual tokens enter the LLM
        "image_token_id",
        "image_token_index",
        "vision_start_token_id",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    }
)


def fingerprint_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The subset of a (nested) config dict that the fingerprint hashes."""

    def pick(node: Any) -> Any:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key in sorted(node):
                value = node[key]
                if isinstance(value, dict):
                    sub = pick(value)
                    if sub:
                        out[key] = sub
                elif key in FINGERPRINT_KEYS:
                    out[key] = value
            return out
        return node

    return pick(config)


def model_fingerprint(config: dict[str, Any]) -> str:
    """``"sha256:" + 16 hex digits`` of the canonical JSON of :func:`fingerprint_fields`."""
    canonical = json.dumps(fingerprint_fields(config), sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
