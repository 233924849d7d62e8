"""The profiling loop: samples -> model forward with capture -> store rows."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posbias.data.base import BadSample, Sample
from posbias.models.base import ModelAdapter

__all__ = ["ProfileSummary", "profile_samples", "store_attrs"]


@dataclass
class ProfileSummary:
    """What one profiling run did."""

    store: Path
    n_profiled: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason)
    seconds: float = 0.0
    non_finite_samples: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.n_profiled / self.seconds if self.seconds > 0 else 0.0


def store_attrs(adapter: ModelAdapter, *, seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Root attributes of a store written from ``adapter`` (the writer adds schema and versions)."""
    attrs: dict[str, Any] = {
        "model_id": adapter.model_id,
        "model_revision": adapter.revision or "",
        "model_fingerprint": adapter.fingerprint(),
        "adapter": adapter.name,
        "n_layers": adapter.n_layers,
        "rope_dims": adapter.rope_dims,
        "seed": int(seed),
    }
    if extra:
        attrs.update(extra)
    return attrs


def profile_samples(
    adapter: ModelAdapter,
    samples: Iterable[Sample | BadSample],
    store_path: str | Path,
    *,
    seed: int,
    total: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extra_attrs: dict[str, Any] | None = None,
) -> ProfileSummary:
    """Profile every sample into a new store at ``store_path``.

    A :class:`~posbias.data.base.BadSample` (from the source, or raised while preparing the inputs) is
    recorded in the store's ``/skipped`` group with its reason and the run goes on.

    Parameters
    ----------
    adapter : ModelAdapter
        The loaded model.
    samples : iterable of Sample or BadSample
        What to profile, in order.
    store_path : path
        The HDF5 store to create.
    seed : int
        Recorded in the store.
    total : int, optional
        Number of items ``samples`` yields (for the progress bar's ETA).
    overwrite : bool
        Replace an existing file at ``store_path``.
    progress : bool
        Show a progress bar (samples/s, ETA) on stderr.
    extra_attrs : dict, optional
        More root attributes.
    """
    import torch
    from tqdm.auto import tqdm

    from posbias.profiler.capture import LastTokenAttentionCapture
    from posbias.profiler.store import ProfileStoreWriter

    summary = ProfileSummary(store=Path(store_path))
    attrs = store_attrs(adapter, seed=seed, extra=extra_attrs)
    start = time.perf_counter()
    bar = tqdm(total=total, disable=not progress, unit="sample", desc="profiling", dynamic_ncols=True)
    with ProfileStoreWriter(
        store_path, n_layers=adapter.n_layers, rope_dims=adapter.rope_dims, attrs=attrs, overwrite=overwrite
    ) as writer, LastTokenAttentionCapture(adapter) as capture, torch.inference_mode():
        for item in samples:
            bar.update(1)
            if isinstance(item, BadSample):
                writer.skip(sample_id=item.sample_id, source=item.sample_id.split(":", 1)[0], reason=item.reason)
                summary.skipped.append((item.sample_id, item.reason))
                continue
            try:
                inputs = adapter.prepare(item.image, item.question)
            except BadSample as bad:
                writer.skip(sample_id=item.id, source=item.source, reason=bad.reason)
                summary.skipped.append((item.id, bad.reason))
                continue
            layout = adapter.layout(inputs)
            attn = capture.run(inputs, layout)  # (V, L) float32
            if not np.all(np.isfinite(attn)):
                summary.non_finite_samples += 1
            writer.append(
                sample_id=item.id,
                source=item.source,
                question=item.question,
                answer=item.answer,
                layout=layout,
                attn=attn,
            )
            summary.n_profiled += 1
            bar.set_postfix(skipped=len(summary.skipped), refresh=False)
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary
