"""posbias.profiler: attention capture, the profiling loop, the HDF5 store, UTP information loss.

Public names load lazily (torch, transformers and h5py are imported on first use).
"""

from __future__ import annotations

from posbias._lazy import lazy_getattr

__all__ = [
    "LastTokenAttentionCapture",
    "capture_attention",
    "SignalCapture",
    "ProfileStore",
    "ProfileStoreWriter",
    "merge_stores",
    "profile_samples",
    "ProfileSummary",
    "info_loss",
    "fill_utr_loss",
]

_LAZY = {
    "LastTokenAttentionCapture": "posbias.profiler.capture",
    "capture_attention": "posbias.profiler.capture",
    "SignalCapture": "posbias.profiler.signals",
    "ProfileStore": "posbias.profiler.store",
    "ProfileStoreWriter": "posbias.profiler.store",
    "merge_stores": "posbias.profiler.store",
    "profile_samples": "posbias.profiler.run",
    "ProfileSummary": "posbias.profiler.run",
    "info_loss": "posbias.profiler.utr",
    "fill_utr_loss": "posbias.profiler.utr",
}

__getattr__ = lazy_getattr(__name__, _LAZY)
