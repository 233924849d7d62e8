"""Sample sources: where profiling and evaluation samples come from.

A source is a deterministic, indexable collection of (image, question[, answer]) records. Loading a
record may fail (unreadable image, empty question); that raises :class:`BadSample` with a reason, and
the profiler records the skip instead of stopping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Sample", "BadSample", "SampleSource", "select_indices"]


@dataclass(frozen=True)
class Sample:
    """One profiling record.

    Attributes
    ----------
    id : str
        Unique "source:key" identifier, stable across runs.
    source : str
        Source name ("embedded", "mme", "pope", "coco").
    image : PIL.Image.Image
        RGB image.
    question : str
        The text prompt.
    answer : str or None
        Reference answer when the source has one.
    meta : dict
        Free-form extras (category, image name, ...).
    """

    id: str
    source: str
    image: Any
    question: str
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class BadSample(Exception):
    """A record that cannot be used; ``sample_id`` and ``reason`` say which and why."""

    def __init__(self, sample_id: str, reason: str) -> None:
        super().__init__(f"{sample_id}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


class SampleSource(ABC):
    """An indexable, deterministic collection of samples."""

    #: registry name
    name: str

    @abstractmethod
    def __len__(self) -> int:
        """Number of records."""

    @abstractmethod
    def key(self, index: int) -> str:
        """Stable key of record ``index`` (the part after "source:" in the sample id)."""

    @abstractmethod
    def load(self, index: int) -> Sample:
        """Load record ``index``; raise :class:`BadSample` when it cannot be used."""

    def sample_id(self, index: int) -> str:
        return f"{self.name}:{self.key(index)}"


def select_indices(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Deterministic subsample of ``n`` of ``n_total`` record indices (all, shuffled, when n is None).

    The same (n_total, seed) always yields the same permutation, and the first n of it, so a larger n
    extends a smaller one.
    """
    perm = np.random.default_rng(seed).permutation(n_total)
    if n is None or n >= n_total:
        return perm
    return perm[:n]
