"""Peak resident-memory measurement of a code block (CPU: sample RSS in a background thread)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

__all__ = ["peak_rss_delta"]


def peak_rss_delta(fn: Callable[[], Any], *, interval: float = 0.0005) -> tuple[Any, int]:
    """Run ``fn`` and return (its result, peak RSS during the call minus RSS before it, in bytes)."""
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            rss = proc.memory_info().rss
            if rss > peak:
                peak = rss
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    peak = max(peak, proc.memory_info().rss)
    return result, peak - base
