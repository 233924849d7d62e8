"""The profiling loop: samples -> model forward with capture -> store rows, crash-safe and resumable.

:func:`profile_samples` writes (or, with ``resume=True``, continues) a store through
:class:`~posbias.profiler.store.ProfileStoreWriter`, which commits every sample to disk atomically
before the next one starts: a run killed at any moment keeps every finished sample exactly once, and a
resumed run profiles only what is missing. :func:`shard_plan` and :func:`distributed_context` split a
run across ``torchrun`` ranks (docs/store.md, "Sharded runs").
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posbias.data.base import BadSample, Sample
from posbias.errors import PosbiasError
from posbias.models.base import ModelAdapter

__all__ = [
    "ProfileSummary",
    "profile_samples",
    "store_attrs",
    "DistInfo",
    "dist_info",
    "shard_items",
    "distributed_context",
]


@dataclass
class ProfileSummary:
    """What one profiling run did.

    Attributes
    ----------
    store : Path
        The store written.
    n_profiled : int
        Samples profiled by this call (not counting those a resumed store already held).
    n_resumed : int
        Samples and skips the store already held when the run started (``resume=True``).
    skipped : list of (str, str)
        (sample id, reason) of the samples this call could not use.
    seconds : float
        Wall time of the loop.
    non_finite_samples : int
        Profiled samples whose attention has NaN/inf.
    """

    store: Path
    n_profiled: int = 0
    n_resumed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason)
    seconds: float = 0.0
    non_finite_samples: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.n_profiled / self.seconds if self.seconds > 0 else 0.0

    def skip_reasons(self) -> dict[str, int]:
        """Number of skips per reason kind (the reason up to its first ':' or '(')."""
        counts: dict[str, int] = {}
        for _, reason in self.skipped:
            kind = reason.split(":", 1)[0].split("(", 1)[0].strip() or reason
            counts[kind] = counts.get(kind, 0) + 1
        return counts


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


def _item_id(item: Sample | BadSample) -> str:
    return item.sample_id if isinstance(item, BadSample) else item.id


def _without_done(samples: Iterable[Sample | BadSample], done: set[str]) -> Iterable[Sample | BadSample]:
    """``samples`` minus the ids in ``done``; a SampleStream is filtered by its plan (no image loaded)."""
    from posbias.data.registry import SampleStream

    if isinstance(samples, SampleStream):
        return SampleStream([(src, i) for src, i in samples.plan if src.sample_id(i) not in done])
    return (item for item in samples if _item_id(item) not in done)


def profile_samples(
    adapter: ModelAdapter,
    samples: Iterable[Sample | BadSample],
    store_path: str | Path,
    *,
    seed: int,
    total: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    extra_attrs: dict[str, Any] | None = None,
    capture: Any | None = None,
    commit_every: int = 1,
    on_sample: Callable[[str], None] | None = None,
) -> ProfileSummary:
    """Profile every sample into the store at ``store_path`` (created, or continued with ``resume``).

    A :class:`~posbias.data.base.BadSample` (from the source, or raised while preparing the inputs) is
    recorded in the store's ``/skipped`` group with its reason and the run goes on. Each sample is
    committed to disk before the next starts (``commit_every=1``), so a killed run loses at most the
    sample in flight; ``resume=True`` then profiles only the samples the store lacks.

    Parameters
    ----------
    adapter : ModelAdapter
        The loaded model.
    samples : iterable of Sample or BadSample
        What to profile, in order (a :class:`~posbias.data.registry.SampleStream` is filtered by id
        before any image is loaded when resuming).
    store_path : path
        The store file.
    seed : int
        Recorded in the store.
    total : int, optional
        Number of items ``samples`` yields (for the progress bar's ETA).
    overwrite : bool
        Replace an existing store at ``store_path``.
    resume : bool
        Continue the store at ``store_path`` (same model and seed), skipping ids it already holds.
    progress : bool
        Show a progress bar (samples/s, ETA) on stderr.
    extra_attrs : dict, optional
        More root attributes.
    capture : object, optional
        What runs the forward: a context manager whose ``run(inputs, layout)`` returns the (V, L)
        float32 attention, or an object with ``attn`` and optional ``token_data`` / ``sample_data``
        dicts (e.g. :class:`posbias.profiler.signals.SignalCapture`); its optional ``static_data()``
        (path -> array) and ``attrs()`` go to the store once. Default:
        :class:`~posbias.profiler.capture.LastTokenAttentionCapture`.
    commit_every : int
        Samples per committed segment (1: every finished sample is durable).
    on_sample : callable, optional
        Called with each sample id once it is committed (progress logs, tests).

    Returns
    -------
    ProfileSummary
    """
    import torch
    from tqdm.auto import tqdm

    from posbias.profiler.capture import LastTokenAttentionCapture
    from posbias.profiler.store import ProfileStoreWriter, store_exists

    store_path = Path(store_path)
    summary = ProfileSummary(store=store_path)
    if capture is None:
        capture = LastTokenAttentionCapture(adapter)
    attrs = store_attrs(adapter, seed=seed, extra=extra_attrs)
    if hasattr(capture, "attrs"):
        attrs.update(capture.attrs())
    resume = bool(resume) and store_exists(store_path)  # nothing to resume: start afresh
    start = time.perf_counter()
    writer = ProfileStoreWriter(
        store_path,
        n_layers=adapter.n_layers,
        rope_dims=adapter.rope_dims,
        attrs=attrs,
        overwrite=overwrite and not resume,
        resume=resume,
        commit_every=commit_every,
    )
    with writer:
        done = writer.done_ids
        summary.n_resumed = len(done)
        if done:
            samples = _without_done(samples, done)
            if total is not None:
                total = len(samples) if hasattr(samples, "__len__") else max(0, total - len(done))
        bar = tqdm(total=total, disable=not progress, unit="sample", desc="profiling", dynamic_ncols=True)
        with capture, torch.inference_mode():
            if hasattr(capture, "static_data"):
                for path, value in capture.static_data().items():
                    writer.set_static(path, value)
            started = False  # the bar counts finished samples, so its rate and time left are per finished sample
            for item in samples:
                if started:
                    bar.update(1)
                started = True
                if isinstance(item, BadSample):
                    writer.skip(sample_id=item.sample_id, source=item.sample_id.split(":", 1)[0], reason=item.reason)
                    summary.skipped.append((item.sample_id, item.reason))
                    if on_sample:
                        on_sample(item.sample_id)
                    continue
                try:
                    inputs = adapter.prepare(item.image, item.question)
                except PosbiasError:
                    raise  # a wrong option, not this sample: stop and say so
                except Exception as exc:  # noqa: BLE001 - this sample only: recorded in /skipped with the reason
                    reason = exc.reason if isinstance(exc, BadSample) else (
                        "cannot prepare the model inputs: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300])
                    writer.skip(sample_id=item.id, source=item.source, reason=reason)
                    summary.skipped.append((item.id, reason))
                    if on_sample:
                        on_sample(item.id)
                    continue
                layout = adapter.layout(inputs)
                out = capture.run(inputs, layout)
                if isinstance(out, np.ndarray):
                    attn, token_data, sample_data = out, None, None  # (V, L) float32
                else:
                    attn = out.attn  # (V, L) float32
                    token_data = getattr(out, "token_data", None) or None
                    sample_data = getattr(out, "sample_data", None) or None
                if not np.all(np.isfinite(attn)):
                    summary.non_finite_samples += 1
                writer.append(
                    sample_id=item.id,
                    source=item.source,
                    question=item.question,
                    answer=item.answer,
                    layout=layout,
                    attn=attn,
                    token_data=token_data,
                    sample_data=sample_data,
                )
                summary.n_profiled += 1
                if on_sample:
                    on_sample(item.id)
                bar.set_postfix(skipped=len(summary.skipped), refresh=False)
            if started:
                bar.update(1)
        bar.close()
        # provenance: the profiling time of this store (a resumed run adds its time to the earlier runs')
        earlier = writer._attrs.get("profile_seconds", 0.0) if resume else 0.0
        writer.update_attrs({"profile_seconds": round(float(earlier) + time.perf_counter() - start, 3)})
    summary.seconds = time.perf_counter() - start
    return summary


# -------------------------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info(env: dict[str, str] | None = None) -> DistInfo:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by torchrun) from the environment."""
    e = os.environ if env is None else env
    try:
        world = int(e.get("WORLD_SIZE", "1"))
        rank = int(e.get("RANK", "0"))
        local = int(e.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise PosbiasError(
            f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (got {e.get('RANK')!r}/{e.get('WORLD_SIZE')!r}); "
            "launch with torchrun or unset them"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise PosbiasError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun or unset them")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def shard_items(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Items ``rank, rank + world_size, ...``: every item in exactly one shard, shards within one of equal."""
    return list(items[rank::world_size])


@contextlib.contextmanager
def distributed_context(info: DistInfo, *, timeout_s: float = 3600.0) -> Iterator[Callable[[], None]]:
    """Initialise ``torch.distributed`` (gloo: CPU, any node) for a torchrun job; yields ``barrier()``.

    Outside torchrun (world size 1) the barrier does nothing and no process group is created.
    """
    if not info.distributed:
        yield lambda: None
        return
    import datetime

    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        created = True
    try:
        yield dist.barrier
    finally:
        if created:
            dist.destroy_process_group()

