"""``profile-bias utr``: fill ``/samples/utr_loss`` (UTP information loss, docs/utp.md) for a store's samples.

A separate stage after ``profile``: it reloads the store's samples from their sources (the ``--data``
options recorded in the store, or the ones given), runs :func:`posbias.profiler.utr.info_loss` on each
(about 1.3 full forwards per sample) and writes the (S, L) array into the closed store. Samples that
already have a finite row are kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from posbias.errors import PosbiasError

__all__ = ["add_parser", "run", "fill_utr_loss"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "utr",
        help="UTP information loss per sample and layer into a store (for 'solve')",
        description="Compute seed 003's per-layer information loss (angle between the last token's final feature "
        "with the visual tokens removed from layer l on and the full model's) for every sample of a store and "
        "write it as /samples/utr_loss, which 'profile-bias solve' needs (docs/utp.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--store", required=True, help="profile.h5 written by 'profile-bias profile'")
    p.add_argument("--model", default=None, help="model (default: the store's model_id); must match the store's fingerprint")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights dtype")
    p.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="SOURCE[:PATH]",
        help="sample sources holding the store's samples (default: the --data recorded in the store)",
    )
    p.add_argument("--overwrite", action="store_true", help="recompute samples that already have utr_loss")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _find_samples(wanted: list[str], specs: list[str]) -> list[Any]:
    """Load the samples with ids ``wanted`` (in that order) from the sources ``specs``."""
    from posbias.data.registry import resolve_sources, split_quotas

    names, _ = split_quotas(specs)
    sources = resolve_sources(names)
    where: dict[str, tuple[Any, int]] = {}
    need = set(wanted)
    for src in sources:
        for i in range(len(src)):
            sid = src.sample_id(i)
            if sid in need and sid not in where:
                where[sid] = (src, i)
    missing = [s for s in wanted if s not in where]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise PosbiasError(
            f"{len(missing)} store sample(s) are in none of the sources {', '.join(specs)} ({shown}); "
            "pass the --data the store was profiled with"
        )
    return [where[s] for s in wanted]


def fill_utr_loss(
    store_path: str,
    *,
    model: str | None = None,
    data: list[str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = False,
    adapter: Any = None,
) -> tuple[int, int]:
    """Compute and write ``/samples/utr_loss`` for a store; returns (samples computed, samples kept).

    Parameters
    ----------
    store_path : str
        Closed profile store.
    model : str or None
        Model to load (default: the store's ``model_id``); ignored when ``adapter`` is given.
    data : list of str or None
        Source specs holding the samples (default: the store's recorded ``data`` attribute).
    device, dtype : str
        Where/how to load the model.
    overwrite : bool
        Recompute rows that are already finite.
    progress : bool
        Show a progress bar.
    adapter : ModelAdapter or None
        An already loaded adapter (tests, notebooks).
    """
    from posbias.data.base import BadSample
    from posbias.profiler.store import ProfileStore, write_utr_loss
    from posbias.profiler.utr import profile_info_loss

    with ProfileStore(store_path) as store:
        ids = list(store.sample_ids)
        attrs = dict(store.attrs)
        old = store.utr_loss  # (S, L) or None
        n_layers = store.n_layers
    if not ids:
        raise PosbiasError(f"store {store_path} has no samples; run 'profile-bias profile' first")
    have = np.zeros(len(ids), dtype=bool) if old is None or overwrite else np.isfinite(old).all(axis=1)
    todo = [sid for sid, ok in zip(ids, have, strict=True) if not ok]
    if not todo:
        return 0, int(have.sum())
    specs = list(data) if data else [s for s in str(attrs.get("data", "")).split(",") if s]
    if not specs:
        raise PosbiasError(f"store {store_path} records no --data; pass --data with the sources it was profiled from")
    located = _find_samples(todo, specs)
    if adapter is None:
        from posbias.models import load_adapter

        adapter = load_adapter(model or str(attrs.get("model_id")), device=device, dtype=dtype)
    fp = attrs.get("model_fingerprint")
    if fp and adapter.fingerprint() != fp:
        raise PosbiasError(
            f"model {adapter.model_id!r} has fingerprint {adapter.fingerprint()} but store {store_path} was profiled "
            f"with {fp}; pass the store's model (--model {attrs.get('model_id')})"
        )
    if adapter.n_layers != n_layers:
        raise PosbiasError(f"model has {adapter.n_layers} decoder layers, the store {n_layers}; pass the store's model")

    def samples() -> Any:
        for src, i in located:
            try:
                yield src.load(i)
            except BadSample as bad:
                raise PosbiasError(f"store sample {bad.sample_id} can no longer be loaded ({bad.reason}); re-profile") from bad

    new_ids, loss = profile_info_loss(adapter, samples(), progress=progress)  # (k, L)
    rows = {sid: row for sid, row in zip(new_ids, loss, strict=True)}
    keep_ids = [sid for sid, ok in zip(ids, have, strict=True) if ok]
    all_ids = keep_ids + new_ids
    pos = {sid: k for k, sid in enumerate(ids)}
    kept = [old[pos[sid]] for sid in keep_ids]
    arr = np.stack(kept + [rows[s] for s in new_ids]).astype(np.float32)  # (k', L)
    write_utr_loss(store_path, all_ids, arr)
    return len(new_ids), len(keep_ids)


def run(args: argparse.Namespace) -> int:
    done, kept = fill_utr_loss(
        args.store, model=args.model, data=args.data, device=args.device, dtype=args.dtype,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"utr_loss: computed {done} sample(s), kept {kept} -> {args.store} (next: profile-bias solve --store {args.store} ...)")
    return 0
