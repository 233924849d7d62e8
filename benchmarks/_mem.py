"""Make CPU peak-memory figures trustworthy: fix glibc's mmap threshold before anything allocates.

glibc raises its mmap threshold after large frees, so freed tensors stay resident and later forwards reuse
them without RSS growing: a sampled-RSS peak (posbias.evaluate.fidelity.peak_memory) would read ~0. With a
fixed threshold every large buffer is an mmap that RSS sees come and go.
"""

from __future__ import annotations

import os
import sys

__all__ = ["fix_mmap_threshold"]


def fix_mmap_threshold(threshold: int = 131072) -> None:
    """Re-exec this script once with ``MALLOC_MMAP_THRESHOLD_`` set (no-op when it is already set)."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
        os.execv(sys.executable, [sys.executable, *sys.argv])
