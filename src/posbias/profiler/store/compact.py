"""Writing one whole store file from scratch: the HDF5 file builder and the compaction of stores
(base + segments, or several stores) into one file."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from posbias.atomic import environment_fault, fsync_file
from posbias.errors import PosbiasError
from posbias.profiler.store.format import (
    SCHEMA_VERSION,
    _CACHE_BYTES,
    _chunk_rows,
    _COPY_ROWS,
    _LAYER_CHUNK,
    _ROW_CHUNK,
    _SAMPLE_CHUNK,
    _SAMPLE_FIELDS,
    _SAMPLE_SPEC,
    _Schema,
    _SKIP_FIELDS,
    _STR,
    _STRING_SAMPLE_FIELDS,
    _TOKEN_FIELDS,
)
from posbias.profiler.store.reader import (
    ProfileStore,
    _H5Part,
    _Part,
)

# ------------------------------------------------------------------------------------- file builder


class _FileBuilder:
    """Write one complete store file (a segment or a compacted store) to ``path`` from scratch."""

    def __init__(
        self,
        path: Path,
        *,
        n_layers: int,
        rope_dims: int,
        schema: _Schema,
        compress: bool,
        sample_rows: int = _SAMPLE_CHUNK,
        token_rows: int = _ROW_CHUNK,
    ) -> None:
        self.path = path
        try:
            self.file = h5py.File(path, "w", rdcc_nbytes=_CACHE_BYTES, locking=False)
        except OSError as exc:
            fault = environment_fault(exc, path)
            if fault is not None:
                raise fault from exc
            msg = " ".join(str(exc).split())
            raise PosbiasError(
                f"cannot create store file {path} ({msg}); check the folder is writable or choose another --out"
            ) from exc
        f = self.file
        self.n_layers = n_layers
        self.compress = compress
        samples = f.create_group("samples")
        srows = max(1, min(sample_rows, _SAMPLE_CHUNK))
        trows = max(1, min(token_rows, _ROW_CHUNK))
        for name, (dt, trailing) in _SAMPLE_SPEC.items():
            self._make(samples, name, trailing, dt, rows=srows, compress=compress and name not in _STRING_SAMPLE_FIELDS)
        for name, (dt, trailing) in schema.samples.items():
            self._make(samples, name, trailing, dt, rows=srows, compress=compress)
        tokens = f.create_group("tokens")
        self._make(tokens, "attn", (n_layers,), np.float32, rows=trows, cols=min(_LAYER_CHUNK, n_layers), compress=compress)
        self._make(tokens, "row", (), np.int32, rows=trows, compress=compress)
        self._make(tokens, "col", (), np.int32, rows=trows, compress=compress)
        self._make(tokens, "position", (rope_dims,), np.int64, rows=trows, compress=compress)
        self._make(tokens, "tile", (), np.int32, rows=trows, compress=compress)
        self._make(tokens, "separator", (), np.bool_, rows=trows, compress=compress)
        for name, (dt, trailing) in schema.tokens.items():
            cols = min(_LAYER_CHUNK, n_layers) if trailing == (n_layers,) else None
            self._make(tokens, name, trailing, dt, rows=trows, cols=cols, compress=compress)
        self._make(f.create_group("tiles"), "grid", (2,), np.int32, rows=srows, compress=compress)
        skipped = f.create_group("skipped")
        for name in _SKIP_FIELDS:
            self._make(skipped, name, (), _STR, rows=srows, compress=False)
        self.static_paths: list[str] = []

    @staticmethod
    def _make(
        group: h5py.Group,
        name: str,
        trailing: tuple[int, ...],
        dtype: Any,
        *,
        rows: int,
        cols: int | None = None,
        compress: bool = True,
    ) -> None:
        dt = np.dtype(dtype)
        if cols is not None:
            chunks = (rows, cols)
        else:
            chunks = (_chunk_rows(trailing, dt.itemsize, rows), *trailing)
        kwargs: dict[str, Any] = {}
        if compress and h5py.check_string_dtype(dt) is None:
            kwargs = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        group.create_dataset(name, shape=(0, *trailing), maxshape=(None, *trailing), dtype=dt, chunks=chunks, **kwargs)

    @staticmethod
    def append(ds: h5py.Dataset, values: Any) -> None:
        n = ds.shape[0]
        k = len(values)
        if k == 0:
            return
        ds.resize(n + k, axis=0)
        ds[n : n + k] = values

    def set_static(self, path: str, value: np.ndarray) -> None:
        if path in self.file:
            del self.file[path]
        self.file.create_dataset(path, data=value)
        if path not in self.static_paths:
            self.static_paths.append(path)

    def finish(self, attrs: Mapping[str, Any], *, durable: bool) -> None:
        """Write the root attributes, close, and fsync the file."""
        f = self.file
        try:
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["static_datasets"] = np.array(sorted(self.static_paths), dtype=_STR)
            f.flush()
        except BaseException:
            with contextlib.suppress(Exception):  # HDF5 cannot close after a failed flush; the first error tells why
                f.close()
            raise
        f.close()
        if durable:
            with contextlib.suppress(OSError):  # best effort (file systems without fsync)
                fsync_file(self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _expected_bytes(views: Sequence[ProfileStore]) -> int:
    """About the size of a store rewritten from ``views``: the compacted files as they are, half of the
    (uncompressed) segments; checked against the free space before HDF5 starts writing."""
    total = 0
    for v in views:
        for part in v._parts:
            with contextlib.suppress(OSError):
                size = part.path.stat().st_size
                total += size if isinstance(part, _H5Part) else size // 2
    return total



# --------------------------------------------------------------------------------------- compaction


def _write_compact(
    views: Sequence[ProfileStore],
    out: Path,
    attrs: Mapping[str, Any],
    *,
    selection: Sequence[tuple[int, int]] | None = None,
    skipped: Sequence[tuple[str, str, str]] | None = None,
    extra_samples: Mapping[str, np.ndarray] | None = None,
    durable: bool = True,
) -> None:
    """Write the samples of ``views`` (all, or ``selection`` = (view, sample) pairs in order) to ``out``;
    ``extra_samples`` adds per-sample datasets (S_out, ...) in output order."""
    first = views[0]
    schema = _Schema(tokens=dict(first._schema.tokens), samples=dict(first._schema.samples))
    copied = list(schema.samples)
    for name, arr in (extra_samples or {}).items():
        schema.samples[name] = (arr.dtype, tuple(arr.shape[1:]))
    builder = _FileBuilder(out, n_layers=first.n_layers, rope_dims=first.rope_dims, schema=schema, compress=True)
    try:
        f = builder.file
        if selection is None:
            selection = [(vi, s) for vi, v in enumerate(views) for s in range(v.n_samples)]
        # runs of consecutive samples of the same part, copied in bulk
        runs: list[tuple[_Part, int, int]] = []
        for vi, s in selection:
            part, local = views[vi]._locate(s)
            if runs and runs[-1][0] is part and runs[-1][2] == local:
                runs[-1] = (part, runs[-1][1], local + 1)
            else:
                runs.append((part, local, local + 1))
        offset = 0
        tok_names = (*_TOKEN_FIELDS, *schema.tokens)
        buf: dict[str, list[Any]] = {}
        buffered = 0

        def flush() -> None:
            nonlocal buffered
            for key, chunks in buf.items():
                if chunks and isinstance(chunks[0], np.ndarray):
                    builder.append(f[key], np.concatenate(chunks))
                else:
                    builder.append(f[key], [x for c in chunks for x in c])
            buf.clear()
            buffered = 0

        for part, lo, hi in runs:
            n_vis = part.samples["n_visual"][lo:hi].astype(np.int64)  # (k,)
            t_lo = int(part.samples["offset"][lo])
            t_hi = t_lo + int(n_vis.sum())
            for name in tok_names:
                for a in range(t_lo, t_hi, _COPY_ROWS):
                    buf.setdefault(f"tokens/{name}", []).append(part.read(f"tokens/{name}", slice(a, min(a + _COPY_ROWS, t_hi))))
            for name in copied:
                buf.setdefault(f"samples/{name}", []).append(part.read(f"samples/{name}", slice(lo, hi)))
            g_lo = int(part.tile_offsets[lo])
            g_hi = g_lo + int(part.samples["n_tiles"][lo:hi].sum())
            buf.setdefault("tiles/grid", []).append(part.tile_grid[g_lo:g_hi])
            for name in _SAMPLE_FIELDS:
                if name == "offset":
                    values: Any = offset + np.concatenate([[0], np.cumsum(n_vis)[:-1]]).astype(np.int64)
                else:
                    values = part.samples[name][lo:hi]
                buf.setdefault(f"samples/{name}", []).append(values)
            offset += int(n_vis.sum())
            buffered += t_hi - t_lo
            if buffered >= _COPY_ROWS:
                flush()
        flush()
        for name, arr in (extra_samples or {}).items():
            builder.append(f[f"samples/{name}"], arr)
        if skipped is None:
            skipped = [row for v in views for row in v.skipped()]
        if skipped:
            builder.append(f["skipped/id"], [r[0] for r in skipped])
            builder.append(f["skipped/source"], [r[1] for r in skipped])
            builder.append(f["skipped/reason"], [r[2] for r in skipped])
        for v in views:
            for path in v.static_names():
                builder.set_static(path, v.static(path))
        # whatever version the inputs had, the file is written in this version's layout
        builder.finish({**attrs, "schema_version": np.int64(SCHEMA_VERSION)}, durable=durable)
    except BaseException:
        builder.abort()
        raise
