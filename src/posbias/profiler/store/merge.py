"""Rewriting closed stores: merging several into one, adding a per-sample dataset."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posbias.atomic import atomic_path, ensure_folder
from posbias.errors import PosbiasError
from posbias.profiler.store.format import (
    parts_dir,
    resolve_store_path,
    store_exists,
    _encode_attr,
    _IDENTITY_ATTRS,
    _NAME_RE,
    _SAMPLE_SPEC,
    _STR,
    _to_python,
    _WRITER_ONLY,
)
from posbias.profiler.store.reader import ProfileStore
from posbias.profiler.store.compact import (
    _expected_bytes,
    _write_compact,
)

# ------------------------------------------------------------------------------------------- merging


def merge_stores(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    order: Sequence[str] | None = None,
    dedupe: bool = False,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
    durable: bool = True,
) -> Path:
    """Merge several stores (e.g. the shards of a torchrun run) into one store file ``out``.

    Every input may be a finished store or an interrupted one (with segments). The inputs must share
    model fingerprint, adapter, n_layers, rope_dims, seed and signal datasets.

    Parameters
    ----------
    inputs : sequence of path
        Store files or run folders.
    out : path
        Store file to write (atomically: temp file, fsync, rename).
    order : sequence of str, optional
        Sample ids in the wanted order (e.g. the run's plan); samples not listed follow in input order.
    dedupe : bool
        Keep the first copy of an id found in several inputs (for re-merging after an interrupted
        merge) instead of raising.
    overwrite : bool
        Replace an existing ``out``.
    attrs : dict, optional
        Caller attributes to add or replace in the merged store.
    durable : bool
        fsync the output.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    posbias.errors.PosbiasError
        For no inputs, incompatible inputs, an id in two inputs (without ``dedupe``) or an existing
        ``out`` without ``overwrite``.
    """
    out_path = Path(out)
    if not inputs:
        raise PosbiasError("merge: no input stores given; pass the shard stores to merge")
    in_paths = [resolve_store_path(p) for p in inputs]
    if out_path.resolve() in [p.resolve() for p in in_paths] and not overwrite:
        raise PosbiasError(f"merge: output {out_path} is also an input; pass --overwrite to merge into it or choose another output")
    if store_exists(out_path) and not overwrite:
        raise PosbiasError(f"merge: output store {out_path} already exists; pass --overwrite or choose another --out")
    views: list[ProfileStore] = []
    try:
        for p in in_paths:
            views.append(ProfileStore(p))
        ref = views[0]
        for v in views[1:]:
            for key in _IDENTITY_ATTRS:
                a, b = ref.attrs.get(key), v.attrs.get(key)
                if a != b:
                    raise PosbiasError(
                        f"merge: {v.path} has {key}={b!r} but {ref.path} has {key}={a!r}; merge only stores of one model and seed"
                    )
            if v.n_samples and ref.n_samples and v._schema.describe() != ref._schema.describe():
                raise PosbiasError(
                    f"merge: {v.path} holds signal datasets {v._schema.describe()} but {ref.path} holds "
                    f"{ref._schema.describe()}; profile all shards with the same signal options"
                )
        base_view = next((v for v in views if v.n_samples), ref)
        if base_view is not ref:
            views.remove(base_view)
            views.insert(0, base_view)
        selection: list[tuple[int, int]] = []
        seen: dict[str, Path] = {}
        for vi, v in enumerate(views):
            for s, sid in enumerate(v.sample_ids):
                if sid in seen:
                    if dedupe:
                        continue
                    raise PosbiasError(
                        f"merge: sample id {sid!r} is in both {seen[sid]} and {v.path}; merge disjoint shards "
                        "(or pass --dedupe to keep the first copy)"
                    )
                seen[sid] = v.path
                selection.append((vi, s))
        skipped: list[tuple[str, str, str]] = []
        for v in views:
            for row in v.skipped():
                if row[0] in seen:
                    if dedupe:
                        continue
                    raise PosbiasError(f"merge: id {row[0]!r} is both stored and skipped across inputs; merge disjoint shards")
                seen[row[0]] = v.path
                skipped.append(row)
        if order is not None:
            rank = {sid: i for i, sid in enumerate(order)}
            big = len(rank)
            keyed = [(rank.get(views[vi].sample_ids[s], big + j), (vi, s)) for j, (vi, s) in enumerate(selection)]
            selection = [sel for _, sel in sorted(keyed, key=lambda t: t[0])]
            skipped.sort(key=lambda r: rank.get(r[0], big))
        merged = {
            k: v for k, v in views[0].raw_attrs.items() if k not in ("segment", "static_datasets") and not k.startswith("shard_")
        }
        json_keys = set(_to_python(merged.get("json_attrs", [])) or [])
        json_keys = {k for k in json_keys if not k.startswith("shard_")}
        for key, value in (attrs or {}).items():
            if key in _WRITER_ONLY or key in ("n_layers", "rope_dims"):
                raise PosbiasError(f"merge: attribute {key!r} is set by the writer; do not pass it")
            merged[key], as_json = _encode_attr(value, f"merge {out_path}", key)
            (json_keys.add if as_json else json_keys.discard)(key)
        merged["json_attrs"] = np.array(sorted(json_keys), dtype=_STR)
        merged["complete"] = all(v.complete for v in views)
        # above every input's generation: segments of an input that is also the output are then ignored
        merged["generation"] = np.int64(1 + max(v.generation for v in views))
        ensure_folder(out_path.parent, create=True)
        with atomic_path(out_path, durable=durable, expect_bytes=_expected_bytes(views)) as tmp:
            _write_compact(views, tmp, merged, selection=selection, skipped=skipped, durable=False)
            for v in views:  # the inputs are read whole: close them before the rename replaces one of them
                v.close()
            # the segments of an input that is also the output are in the new file now (generation above
            # theirs); they go only after the rename below
    finally:
        for v in views:
            v.close()
    if overwrite and parts_dir(out_path).is_dir():
        shutil.rmtree(parts_dir(out_path), ignore_errors=True)
    return out_path


def add_sample_data(
    path: str | os.PathLike[str],
    name: str,
    ids: Sequence[str],
    values: Any,
    *,
    fill: float = np.nan,
    durable: bool = True,
) -> Path:
    """Add (or replace) the per-sample dataset ``/samples/<name>`` of a closed store, crash-safely.

    The store is rewritten to a temporary file and renamed over the old one, so a kill leaves either
    the old or the new store. Samples not in ``ids`` get ``fill``.

    Parameters
    ----------
    path : path
        The store (file or run folder); an interrupted store is compacted on the way.
    name : str
        Dataset name (an identifier, not a base dataset).
    ids : sequence of str
        Sample ids the rows of ``values`` belong to.
    values : array-like
        (len(ids), ...) numeric values.
    fill : float
        Value of the rows of samples not in ``ids``.
    durable : bool
        fsync the new file.
    """
    store_path = resolve_store_path(path)
    arr = np.asarray(values)
    where = f"store {store_path}"
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _SAMPLE_SPEC:
        raise PosbiasError(f"{where}: dataset name {name!r} must be an identifier other than the base datasets")
    if arr.dtype.kind not in "biuf" or arr.ndim < 1 or arr.shape[0] != len(ids):
        raise PosbiasError(f"{where}: {name} values must be numeric with one row per id ({len(ids)}), got {arr.shape}")
    with ProfileStore(store_path) as view:
        index = {sid: i for i, sid in enumerate(view.sample_ids)}
        unknown = [sid for sid in ids if sid not in index]
        if unknown:
            raise PosbiasError(f"{where}: sample ids {unknown[:3]} are not in the store; pass ids of stored samples")
        out_dtype = np.result_type(arr.dtype, np.float32) if np.isnan(fill) else arr.dtype
        full = np.full((view.n_samples, *arr.shape[1:]), fill, dtype=out_dtype)  # (S, ...)
        full[[index[sid] for sid in ids]] = arr
        view._schema.samples.pop(name, None)  # replaced, not copied
        attrs = {k: v for k, v in view.raw_attrs.items() if k not in ("segment", "static_datasets")}
        attrs["complete"] = view.complete
        attrs["generation"] = np.int64(view.generation + 1)
        with atomic_path(store_path, durable=durable, expect_bytes=_expected_bytes([view]) + full.nbytes) as tmp:
            _write_compact([view], tmp, attrs, extra_samples={name: full}, durable=False)
    return store_path


def write_utr_loss(path: str | os.PathLike[str], ids: Sequence[str], loss: Any) -> Path:
    """Write UTP's information loss ``/samples/utr_loss`` (S, L) float32 into a closed store (NaN rows for
    samples not in ``ids``); see :func:`add_sample_data`."""
    arr = np.asarray(loss, dtype=np.float32)  # (k, L)
    with ProfileStore(path) as view:
        n_layers = view.n_layers
    if arr.ndim != 2 or arr.shape[1] != n_layers:
        raise PosbiasError(f"utr_loss has shape {arr.shape}; expected (len(ids), {n_layers}) = one value per decoder layer")
    return add_sample_data(path, "utr_loss", ids, arr)
