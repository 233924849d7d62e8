"""The profile store: last-token attention to every visual token, in HDF5, crash-safe.

The normative format is ``docs/store.md``; this module is its reference writer and reader. A finished
store is ONE plain HDF5 file (``profile.h5``) meant to be read with plain h5py too: variable-length UTF-8
strings, int32/int64 tables and one ``(T, L)`` float32 attention matrix whose rows are the visual tokens
of all samples, stacked sample after sample, plus optional signal datasets (``/tokens/<name>``,
``/samples/<name>``, ``/static/<name>``).

Crash safety. HDF5 is not crash-safe: a process killed while HDF5 updates metadata in place can leave a
file no library opens. So no file is ever modified in place. While a run is going, every committed batch
of samples (by default every single sample) is written to a small, complete store file of its own, a
*segment*, in the folder ``profile.h5.parts/``: written to a temporary file, fsync'ed, then atomically
renamed (:mod:`posbias.atomic`, as every file posbias writes).
A killed run therefore leaves the last good ``profile.h5`` (if any) plus whole segments;
:class:`ProfileStore` reads the union as one store. Closing the writer *compacts*: it writes base and
segments into a temporary file next to ``profile.h5``, fsyncs, renames it over ``profile.h5`` and deletes the segments. The
base records a ``generation`` counter and segments carry the generation they were written against, so a
kill between the rename and the deletion cannot count a sample twice (segments of an older generation are
ignored and deleted by the next writer).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from posbias.atomic import atomic_path, ensure_folder, environment_fault, fsync_file, sweep_stale_temps
from posbias.errors import PosbiasError, SchemaError
from posbias.models.base import VisualLayout

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "REQUIRED_ATTRS",
    "PARTS_SUFFIX",
    "ProfileStoreWriter",
    "ProfileStore",
    "parts_dir",
    "store_exists",
    "resolve_store_path",
    "merge_stores",
    "remove_store",
    "add_sample_data",
    "write_utr_loss",
]

SCHEMA_NAME = "posbias.profile"
SCHEMA_VERSION = 2
#: versions this reader opens (version 1: one grid per sample, read as one tile without separators)
READABLE_VERSIONS: tuple[int, ...] = (1, 2)

#: root attributes every store carries (docs/store.md, "Root attributes")
REQUIRED_ATTRS: tuple[str, ...] = (
    "schema",
    "schema_version",
    "posbias_version",
    "model_id",
    "model_revision",
    "model_fingerprint",
    "adapter",
    "n_layers",
    "rope_dims",
    "transformers_version",
    "torch_version",
    "seed",
    "created",
)

#: folder of committed segments next to the store file: ``profile.h5`` -> ``profile.h5.parts/``
PARTS_SUFFIX = ".parts"
_DEFAULT_NAME = "profile.h5"
_LOCK_NAME = "LOCK"
_SEG_RE = re.compile(r"^seg-(\d{6})-(\d{8})\.npz$")

#: attributes the caller of the writer must supply
_CALLER_REQUIRED = ("model_id", "model_fingerprint", "adapter", "seed")
#: attributes only the writer sets
_WRITER_ONLY = (
    "schema",
    "schema_version",
    "created",
    "complete",
    "json_attrs",
    "generation",
    "segment",
    "static_datasets",
)
#: attributes that must agree to resume a store or merge stores
_IDENTITY_ATTRS = ("model_fingerprint", "adapter", "n_layers", "rope_dims", "seed")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ROW_CHUNK = 4096  # token rows per chunk
_LAYER_CHUNK = 4  # layers per chunk of (T, L) datasets: one-layer reads touch T/4096 small chunks
_SAMPLE_CHUNK = 256
_MAX_CHUNK_BYTES = 2**20
_COPY_ROWS = 65536  # token rows copied per step when compacting
_CACHE_BYTES = 16 * 2**20  # chunk cache per dataset

_STR = h5py.string_dtype(encoding="utf-8")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# name -> (dtype, trailing shape); the order is the write order of one append
_SAMPLE_SPEC: dict[str, tuple[Any, tuple[int, ...]]] = {
    "source": (_STR, ()),
    "question": (_STR, ()),
    "answer": (_STR, ()),
    "n_visual": (np.dtype(np.int32), ()),
    "offset": (np.dtype(np.int64), ()),
    "grid": (np.dtype(np.int32), (2,)),
    "n_tiles": (np.dtype(np.int32), ()),
    "visual_start": (np.dtype(np.int32), ()),
    "seq_len": (np.dtype(np.int32), ()),
    "id": (_STR, ()),
}
_SAMPLE_FIELDS: tuple[str, ...] = tuple(_SAMPLE_SPEC)
_TOKEN_FIELDS: tuple[str, ...] = ("attn", "row", "col", "position", "tile", "separator")
_TOKEN_DTYPES: dict[str, Any] = {"row": np.int32, "col": np.int32, "tile": np.int32, "separator": np.bool_}
#: datasets added by version 2 (multi-tile layouts); a version-1 part reads them as one tile, no separator
_V2_DATASETS: tuple[str, ...] = ("samples/n_tiles", "tokens/tile", "tokens/separator", "tiles/grid")
_SKIP_FIELDS: tuple[str, ...] = ("source", "reason", "id")
_STRING_SAMPLE_FIELDS = ("id", "source", "question", "answer")


# --------------------------------------------------------------------------------------------- helpers


def _package_version(name: str) -> str:
    try:
        return _metadata.version(name)
    except _metadata.PackageNotFoundError:
        return ""


def _posbias_version() -> str:
    import posbias

    return str(posbias.__version__)


def _is_plain_attr(value: Any) -> bool:
    """True when ``value`` maps to an HDF5 attribute without JSON (str, number, bool, flat list of them)."""
    scalar = (str, bool, int, float, np.integer, np.floating, np.bool_)
    if isinstance(value, scalar):
        return True
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            return True
        return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value)
    return False


def _encode_attr(value: Any, where: str, key: str) -> tuple[Any, bool]:
    """``(value as stored, stored_as_json)`` for a caller attribute (docs/store.md, root attributes)."""
    if isinstance(value, str):
        return str(value), False  # str subclasses (e.g. torch's TorchVersion) as plain str
    if _is_plain_attr(value):
        if isinstance(value, (list, tuple)) and isinstance(value[0], str):
            return np.array(list(value), dtype=_STR), False
        return value, False
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False), True
    except (TypeError, ValueError) as exc:
        raise PosbiasError(f"{where}: attrs[{key!r}] is not JSON-serialisable ({exc}); pass plain values") from exc


def _to_python(value: Any) -> Any:
    """An attribute value as a plain Python/JSON type."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode_attrs(raw: Mapping[str, Any]) -> dict[str, Any]:
    attrs = {k: _to_python(v) for k, v in raw.items()}
    for key in attrs.get("json_attrs", []) or []:
        if key in attrs and isinstance(attrs[key], str):
            attrs[key] = json.loads(attrs[key])
    return attrs


def _looks_like_hdf5(path: Path) -> bool:
    """HDF5 signature at offset 0, 512, 1024, ... (the superblock may follow a user block)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            offset = 0
            while offset + 8 <= size:
                fh.seek(offset)
                if fh.read(8) == _HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False


def parts_dir(path: str | os.PathLike[str]) -> Path:
    """Folder of the committed segments of the store at ``path`` (``profile.h5`` -> ``profile.h5.parts``)."""
    p = Path(path)
    return p.with_name(p.name + PARTS_SUFFIX)


def resolve_store_path(path: str | os.PathLike[str]) -> Path:
    """The store file for ``path``: the path itself, or ``path/profile.h5`` when ``path`` is a run folder."""
    p = Path(path)
    if p.is_dir() and not p.name.endswith(PARTS_SUFFIX):
        inner = p / _DEFAULT_NAME
        if inner.exists() or parts_dir(inner).is_dir():
            return inner
    if p.is_dir() and p.name.endswith(PARTS_SUFFIX):
        return p.with_name(p.name[: -len(PARTS_SUFFIX)])
    return p


def _segments(path: Path, min_generation: int = 0) -> list[tuple[int, int, Path]]:
    """Committed segments ``(generation, seq, file)`` of the store at ``path``, in commit order."""
    d = parts_dir(path)
    out: list[tuple[int, int, Path]] = []
    if not d.is_dir():
        return out
    for entry in d.iterdir():
        m = _SEG_RE.match(entry.name)
        if m and int(m.group(1)) >= min_generation:
            out.append((int(m.group(1)), int(m.group(2)), entry))
    out.sort()
    return out


def store_exists(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a store: the file, or committed segments of an interrupted run."""
    p = resolve_store_path(path)
    return p.is_file() or bool(_segments(p))


def remove_store(path: str | os.PathLike[str]) -> None:
    """Delete the store at ``path``: its file, its segment folder and any temporary file."""
    p = Path(path)
    for f in (p, p.with_name(p.name + ".tmp")):
        if f.is_file() or f.is_symlink():
            f.unlink()
    sweep_stale_temps(p)
    d = parts_dir(p)
    if d.is_dir():
        shutil.rmtree(d)


def _chunk_rows(trailing: tuple[int, ...], itemsize: int, rows: int) -> int:
    per_row = max(1, int(np.prod(trailing, dtype=np.int64)) * max(1, itemsize))
    return max(1, min(rows, _MAX_CHUNK_BYTES // per_row))


def _dtype_key(dt: Any) -> str:
    if h5py.check_string_dtype(np.dtype(dt)) is not None:
        return "str"
    return np.dtype(dt).str


@dataclass
class _Schema:
    """Optional datasets of a store: ``name -> (dtype, trailing shape)`` per group, and static paths."""

    tokens: dict[str, tuple[np.dtype, tuple[int, ...]]] = field(default_factory=dict)
    samples: dict[str, tuple[np.dtype, tuple[int, ...]]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "tokens": {k: [_dtype_key(d), list(s)] for k, (d, s) in sorted(self.tokens.items())},
            "samples": {k: [_dtype_key(d), list(s)] for k, (d, s) in sorted(self.samples.items())},
        }


def _check_extra_array(where: str, kind: str, name: str, value: Any) -> np.ndarray:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PosbiasError(f"{where}: {kind} name {name!r} must be an identifier (letters, digits, '_')")
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise PosbiasError(
            f"{where}: {kind}[{name!r}] has dtype {arr.dtype}; pass a numeric or bool numpy array"
        )
    return arr


def _check_tiles(
    where: str, layout: VisualLayout, v: int, grid: tuple[int, ...], rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tiles (n, 2) int32, tile (V,) int32, separator (V,) bool)`` of a layout, validated: tile indices
    ascending from 0, tile 0's grid equal to ``grid``, every grid token inside its tile's grid, separator
    tokens inside their tile's rows with a column in ``-1 .. cols - 1``."""
    raw_tiles = layout.tiles if layout.tiles is not None else (grid,)
    try:
        tiles = np.array([[int(r), int(c)] for r, c in raw_tiles], dtype=np.int64).reshape(-1, 2)  # (n, 2)
    except (TypeError, ValueError):
        raise PosbiasError(f"{where}: layout tiles {raw_tiles!r} must be a sequence of (rows, cols) pairs") from None
    if tiles.shape[0] < 1 or tiles.min() < 1:
        raise PosbiasError(f"{where}: layout tiles {raw_tiles!r} must hold at least one (rows, cols) of positive ints")
    if tuple(tiles[0]) != grid:
        raise PosbiasError(f"{where}: layout grid {grid} differs from the first tile's grid {tuple(int(x) for x in tiles[0])}; check the adapter's layout")
    tile = np.asarray(layout.tile if layout.tile is not None else np.zeros(v, np.int64))  # (V,)
    sep = np.asarray(layout.separator if layout.separator is not None else np.zeros(v, bool))  # (V,)
    if tile.shape != (v,) or not np.issubdtype(tile.dtype, np.integer):
        raise PosbiasError(f"{where}: layout tile has shape {tile.shape} and dtype {tile.dtype}; expected ({v},) integers")
    if sep.shape != (v,) or sep.dtype != np.bool_:
        raise PosbiasError(f"{where}: layout separator has shape {sep.shape} and dtype {sep.dtype}; expected ({v},) bool")
    if tile.min() < 0 or tile.max() >= len(tiles) or np.any(np.diff(tile) < 0):
        raise PosbiasError(
            f"{where}: layout tile indices must ascend from 0 to at most {len(tiles) - 1} (one per tile in layout.tiles)"
        )
    t_rows, t_cols = tiles[tile, 0], tiles[tile, 1]  # (V,) each
    col_lo = np.where(sep, -1, 0)  # a separator ends a row: column -1 (or a column of that row)
    if np.any(rows < 0) or np.any(rows >= t_rows) or np.any(cols < col_lo) or np.any(cols >= t_cols):
        bad = int(np.flatnonzero((rows < 0) | (rows >= t_rows) | (cols < col_lo) | (cols >= t_cols))[0])
        raise PosbiasError(
            f"{where}: layout token {bad} at (row, col) = ({int(rows[bad])}, {int(cols[bad])}) falls outside its tile "
            f"{int(tile[bad])} grid {tuple(int(x) for x in tiles[tile[bad]])}; check the adapter's layout"
        )
    return tiles.astype(np.int32), tile.astype(np.int32), sep.copy()


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


#: what a profile run stopped by the machine should do once the cause is gone
_RESUME_HINT = "then run the same command with --resume: every committed sample is kept"


# ---------------------------------------------------------------------------------------------- writer


@dataclass
class _Pending:
    """Samples, skips and statics appended since the last commit."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    statics: dict[str, np.ndarray] = field(default_factory=dict)
    attrs_dirty: bool = False

    def __bool__(self) -> bool:
        return bool(self.samples or self.skipped or self.statics or self.attrs_dirty)


class ProfileStoreWriter:
    """Create (or resume) a profile store and append samples to it, crash-safely.

    Every ``commit_every`` appended samples (or skips) are committed as one segment file (written to a
    temporary name, fsync'ed, atomically renamed into ``<path>.parts/``). ``close()`` compacts everything
    into the single file ``path``. A process killed at any moment leaves a store that
    :class:`ProfileStore` opens and that holds every committed sample exactly once.

    Parameters
    ----------
    path : str or Path
        Store file to create (parent folders are created).
    n_layers : int
        Number of decoder layers L; every ``attn`` has L columns.
    rope_dims : int
        RoPE position components per token P (1, or 3 for M-RoPE).
    attrs : dict
        Root attributes. Must contain ``model_id``, ``model_fingerprint``, ``adapter`` and ``seed``;
        ``model_revision`` defaults to ``""``; ``posbias_version``, ``transformers_version`` and
        ``torch_version`` default to the installed versions; ``n_layers``/``rope_dims`` may be repeated
        if equal to the arguments. Any other key is stored as given (str, number, bool, or a flat list
        of them) or, for other JSON values (dicts, nested lists, None), as JSON text listed in the
        ``json_attrs`` attribute.
    overwrite : bool
        Replace an existing store at ``path`` (file and segments).
    resume : bool
        Continue the store at ``path``: its samples and skips are kept (:attr:`done_ids`), new appends
        go after them. Model fingerprint, adapter, n_layers, rope_dims and seed must match; other
        caller attributes are updated.
    commit_every : int
        Samples or skips per committed segment (1: every sample is durable once ``append`` returns).
    durable : bool
        fsync segment files and folders (survives power loss, not only a killed process).

    Raises
    ------
    posbias.errors.PosbiasError
        If ``path`` exists and neither ``overwrite`` nor ``resume`` is set, another process writes the
        store, the store to resume was made with another model or seed, or the arguments are invalid.

    Examples
    --------
    >>> with ProfileStoreWriter("profile.h5", n_layers=30, rope_dims=1, attrs=attrs) as w:  # doctest: +SKIP
    ...     w.append(sample_id="embedded:chelsea/pope-cat", source="embedded", question=q,
    ...              answer="yes", layout=layout, attn=attn)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_layers: int,
        rope_dims: int,
        attrs: Mapping[str, Any],
        overwrite: bool = False,
        resume: bool = False,
        commit_every: int = 1,
        durable: bool = True,
    ) -> None:
        self.path = Path(path)
        where = f"store {self.path}"
        if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
            raise PosbiasError(f"{where}: n_layers={n_layers!r} must be a positive int")
        if isinstance(rope_dims, bool) or not isinstance(rope_dims, (int, np.integer)) or rope_dims < 1:
            raise PosbiasError(f"{where}: rope_dims={rope_dims!r} must be a positive int (1, or 3 for M-RoPE)")
        if isinstance(commit_every, bool) or not isinstance(commit_every, (int, np.integer)) or commit_every < 1:
            raise PosbiasError(f"{where}: commit_every={commit_every!r} must be a positive int")
        if overwrite and resume:
            raise PosbiasError(f"{where}: pass either overwrite (start again) or resume (continue), not both")
        self.n_layers = int(n_layers)
        self.rope_dims = int(rope_dims)
        self.commit_every = int(commit_every)
        self.durable = bool(durable)
        caller = dict(attrs)
        root_attrs = self._root_attrs(caller)  # validates before anything is created

        if self.path.is_dir():
            raise PosbiasError(f"{where} is a directory; choose a file path for the store")
        exists = store_exists(self.path)
        if exists and not (overwrite or resume):
            raise PosbiasError(f"{where} already exists; pass --overwrite or choose another --out")
        if resume and not exists:
            raise PosbiasError(f"{where} does not exist, so there is nothing to resume; run without --resume")

        self._closed = True  # until fully opened
        self._lock_fd: int | None = None
        self._parts = parts_dir(self.path)
        self._parts.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._ids: set[str] = set()
            self._skipped_ids: set[str] = set()
            self._n_tokens = 0
            self._schema = _Schema()
            self._schema_fixed = False
            self._static_paths: set[str] = set()
            self._pending = _Pending()
            if resume:
                self._open_existing(root_attrs)
            else:
                if overwrite:
                    for f in (self.path, self.path.with_name(self.path.name + ".tmp")):
                        if f.is_file():
                            f.unlink()
                    for entry in list(self._parts.iterdir()):
                        if entry.name != _LOCK_NAME:
                            entry.unlink() if entry.is_file() else shutil.rmtree(entry)
                self._generation = 0
                self._seq = 0
                self._attrs = root_attrs
                self._cleanup_stale()
            self._closed = False
            self._pending.attrs_dirty = True
            self.commit()  # the header: from now on the store opens, even before the first sample
        except BaseException:
            self._unlock()
            raise

    # -- construction helpers

    def _root_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        where = f"store {self.path}"
        reserved = [k for k in _WRITER_ONLY if k in attrs]
        if reserved:
            raise PosbiasError(f"{where}: attrs {reserved} are set by the writer; remove them from attrs")
        missing = [k for k in _CALLER_REQUIRED if k not in attrs]
        if missing:
            raise PosbiasError(f"{where}: attrs lack {missing}; pass them (see docs/store.md, root attributes)")
        for key, value in (("n_layers", self.n_layers), ("rope_dims", self.rope_dims)):
            if key in attrs and int(attrs[key]) != value:
                raise PosbiasError(
                    f"{where}: attrs[{key!r}]={attrs[key]!r} differs from {key}={value}; pass equal values"
                )
        for key in ("model_id", "model_fingerprint", "adapter"):
            if not isinstance(attrs[key], str) or not attrs[key]:
                raise PosbiasError(f"{where}: attrs[{key!r}]={attrs[key]!r} must be a non-empty string")
        if isinstance(attrs["seed"], bool) or not isinstance(attrs["seed"], (int, np.integer)):
            raise PosbiasError(f"{where}: attrs['seed']={attrs['seed']!r} must be an int")
        if attrs.get("model_revision") is None:
            attrs["model_revision"] = ""

        out: dict[str, Any] = {
            "schema": SCHEMA_NAME,
            "schema_version": np.int64(SCHEMA_VERSION),
            "posbias_version": _posbias_version(),
            "transformers_version": _package_version("transformers"),
            "torch_version": _package_version("torch"),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "complete": False,
        }
        json_keys: list[str] = []
        for key, value in attrs.items():
            if not isinstance(key, str) or not key:
                raise PosbiasError(f"{where}: attribute name {key!r} must be a non-empty string")
            if key in ("n_layers", "rope_dims", "seed"):
                out[key] = np.int64(value)
                continue
            out[key], as_json = _encode_attr(value, where, key)
            if as_json:
                json_keys.append(key)
        out["n_layers"] = np.int64(self.n_layers)
        out["rope_dims"] = np.int64(self.rope_dims)
        out["json_attrs"] = np.array(sorted(json_keys), dtype=_STR)
        return out

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no advisory locks on this platform
            return
        fd = os.open(self._parts / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PosbiasError(
                f"store {self.path} is being written by another process; wait for it to finish or choose another --out"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _cleanup_stale(self) -> None:
        """Delete temporary files and segments already compacted into the base (we hold the lock)."""
        tmp = self.path.with_name(self.path.name + ".tmp")  # the fixed name of earlier versions
        if tmp.is_file():
            tmp.unlink()
        sweep_stale_temps(self.path)
        for entry in list(self._parts.iterdir()):
            m = _SEG_RE.match(entry.name)
            if entry.name.endswith(".tmp") or (m and int(m.group(1)) < self._generation):
                with contextlib.suppress(OSError):
                    entry.unlink()

    def _open_existing(self, new_attrs: dict[str, Any]) -> None:
        where = f"store {self.path}"
        with ProfileStore(self.path) as old:
            self._generation = old.generation
            old_attrs = dict(old.raw_attrs)
            for key in _IDENTITY_ATTRS:
                a, b = _to_python(old_attrs.get(key)), _to_python(new_attrs.get(key))
                if a != b:
                    raise PosbiasError(
                        f"cannot resume {where}: it was written with {key}={a!r}, this run has {key}={b!r}; "
                        "use the same model and options, or pass --overwrite to start again"
                    )
            self._ids = set(old.sample_ids)
            self._skipped_ids = {sid for sid, _, _ in old.skipped()}
            self._n_tokens = old.n_tokens
            self._schema = old._schema
            self._schema_fixed = old.n_samples > 0
            self._static_paths = set(old.static_names())
            self._seq = old._next_seq
        merged = {k: v for k, v in old_attrs.items() if k not in ("json_attrs", "static_datasets")}
        json_keys = set(_to_python(old_attrs.get("json_attrs", [])) or [])
        for key, value in new_attrs.items():
            if key in ("created", "json_attrs"):
                continue
            merged[key] = value
        new_json = set(_to_python(new_attrs["json_attrs"]))
        json_keys = (json_keys - set(new_attrs)) | new_json
        merged["json_attrs"] = np.array(sorted(json_keys), dtype=_STR)
        merged["complete"] = False
        self._attrs = merged
        self._cleanup_stale()

    # -- public API

    @property
    def n_samples(self) -> int:
        """Samples in the store so far (including those of a resumed store)."""
        return len(self._ids)

    @property
    def n_skipped(self) -> int:
        """Skips recorded so far."""
        return len(self._skipped_ids)

    @property
    def n_tokens(self) -> int:
        """Token rows appended so far (T)."""
        return self._n_tokens

    @property
    def done_ids(self) -> set[str]:
        """Ids already stored or skipped (a resumed run does not profile them again)."""
        return self._ids | self._skipped_ids

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"store {self.path} writer is closed")

    def _check_id(self, sample_id: str, source: str) -> None:
        where = f"store {self.path}"
        if not isinstance(source, str) or not source or ":" in source:
            raise PosbiasError(f"{where}: source {source!r} must be a non-empty name without ':'")
        if not isinstance(sample_id, str) or not sample_id.startswith(source + ":") or sample_id == source + ":":
            raise PosbiasError(f"{where}: sample id {sample_id!r} must be '{source}:<key>' (source:key)")
        if sample_id in self._ids:
            raise PosbiasError(f"{where}: duplicate sample id {sample_id!r}; sample ids must be unique within a store")
        if sample_id in self._skipped_ids:
            raise PosbiasError(f"{where}: sample id {sample_id!r} was already recorded as skipped; ids must be unique")

    def _check_extras(
        self,
        where: str,
        v: int,
        token_data: Mapping[str, Any] | None,
        sample_data: Mapping[str, Any] | None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        tok: dict[str, np.ndarray] = {}
        smp: dict[str, np.ndarray] = {}
        for name, value in (token_data or {}).items():
            if name in _TOKEN_FIELDS:
                raise PosbiasError(f"{where}: token_data name {name!r} is reserved; choose another name")
            arr = _check_extra_array(where, "token_data", name, value)
            if arr.ndim < 1 or arr.shape[0] != v:
                raise PosbiasError(
                    f"{where}: token_data[{name!r}] has shape {arr.shape}; expected ({v}, ...) with one row per visual token"
                )
            tok[name] = arr
        for name, value in (sample_data or {}).items():
            if name in _SAMPLE_SPEC:
                raise PosbiasError(f"{where}: sample_data name {name!r} is reserved; choose another name")
            if f"samples/{name}" in self._static_paths:
                raise PosbiasError(f"{where}: sample_data name {name!r} is already a static dataset; choose another name")
            smp[name] = _check_extra_array(where, "sample_data", name, value)
        want_tok = {k: (a.dtype, tuple(a.shape[1:])) for k, a in tok.items()}
        want_smp = {k: (a.dtype, tuple(a.shape)) for k, a in smp.items()}
        if not self._schema_fixed:
            return tok, smp
        for kind, got, have in (("token_data", want_tok, self._schema.tokens), ("sample_data", want_smp, self._schema.samples)):
            if set(got) != set(have):
                raise PosbiasError(
                    f"{where}: {kind} names {sorted(got)} differ from the store's {sorted(have)}; "
                    "every sample of a store must supply the same datasets (same signal options as the first sample)"
                )
            for name, (dt, shape) in got.items():
                hdt, hshape = have[name]
                if shape != hshape or np.dtype(dt) != np.dtype(hdt):
                    raise PosbiasError(
                        f"{where}: {kind}[{name!r}] is {np.dtype(dt)} with trailing shape {shape}; the store has "
                        f"{np.dtype(hdt)} {hshape}: pass arrays of the store's dtype and shape"
                    )
        return tok, smp

    def append(
        self,
        *,
        sample_id: str,
        source: str,
        question: str,
        answer: str | None,
        layout: VisualLayout,
        attn: np.ndarray,
        token_data: Mapping[str, np.ndarray] | None = None,
        sample_data: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Append one profiled sample (committed to disk once ``commit_every`` are pending).

        Parameters
        ----------
        sample_id : str
            Unique ``"source:key"`` id.
        source : str
            Source name (the part of ``sample_id`` before the first ':').
        question : str
            The prompt text.
        answer : str or None
            Reference answer; ``None`` is stored as ``""``.
        layout : VisualLayout
            Where the V visual tokens are (grid coordinates, RoPE positions, sequence positions).
        attn : np.ndarray
            (V, L) float32 last-token attention, head mean, one column per decoder layer. Stored
            exactly as given, NaN/inf included (readers decide what to do with non-finite rows).
        token_data : dict of str to np.ndarray, optional
            More per-token rows: each ``(V, ...)`` numeric array goes to ``/tokens/<name>`` (T, ...).
        sample_data : dict of str to np.ndarray, optional
            More per-sample values: each fixed-shape numeric array goes to ``/samples/<name>`` (S, ...).
            The first sample fixes the names, dtypes and trailing shapes of both dicts; every later
            sample must supply the same.

        Raises
        ------
        posbias.errors.PosbiasError
            On a duplicate or malformed id, or arrays whose shapes/dtypes disagree with the store.
        """
        self._check_open()
        self._check_id(sample_id, source)
        where = f"store {self.path}, sample {sample_id!r}"
        if not isinstance(question, str):
            raise PosbiasError(f"{where}: question must be a str, got {type(question).__name__}")
        if answer is not None and not isinstance(answer, str):
            raise PosbiasError(f"{where}: answer must be a str or None, got {type(answer).__name__}")
        if not isinstance(layout, VisualLayout):
            raise PosbiasError(
                f"{where}: layout must be a posbias.models.base.VisualLayout, got {type(layout).__name__}"
            )
        if not isinstance(attn, np.ndarray):
            raise PosbiasError(
                f"{where}: attn must be a numpy array (V, {self.n_layers}) float32, got {type(attn).__name__}"
            )
        if attn.dtype != np.float32:
            raise PosbiasError(f"{where}: attn dtype is {attn.dtype}; pass float32 (e.g. attn.astype(np.float32))")
        v = layout.n_visual
        if v < 1:
            raise PosbiasError(f"{where}: layout has no visual tokens; record the sample with skip() instead")
        if attn.shape != (v, self.n_layers):
            raise PosbiasError(
                f"{where}: attn has shape {attn.shape}; "
                f"expected (V, L) = ({v}, {self.n_layers}) from the layout and n_layers"
            )
        rows = np.asarray(layout.rows)  # (V,)
        cols = np.asarray(layout.cols)  # (V,)
        pos = np.asarray(layout.position_ids)  # (V, P)
        if rows.shape != (v,) or cols.shape != (v,):
            raise PosbiasError(f"{where}: layout rows/cols have shapes {rows.shape}/{cols.shape}; expected ({v},)")
        if pos.shape != (v, self.rope_dims):
            raise PosbiasError(
                f"{where}: layout position_ids has shape {pos.shape}; "
                f"expected (V, P) = ({v}, {self.rope_dims}) (rope_dims)"
            )
        for name, arr in (("rows", rows), ("cols", cols), ("position_ids", pos)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise PosbiasError(f"{where}: layout {name} has dtype {arr.dtype}; expected integers")
        grid = tuple(int(g) for g in layout.grid)
        if len(grid) != 2 or min(grid) < 1:
            raise PosbiasError(f"{where}: layout grid {layout.grid!r} must be two positive ints (rows, cols)")
        tiles, tile, sep = _check_tiles(where, layout, v, grid, rows, cols)
        vis = np.asarray(layout.visual_index)  # (V,)
        if vis.shape != (v,):
            raise PosbiasError(f"{where}: layout visual_index has shape {vis.shape}; expected ({v},)")
        if int(layout.seq_len) <= int(vis.max()):
            raise PosbiasError(f"{where}: layout seq_len {layout.seq_len} does not cover visual index {int(vis.max())}")
        tok, smp = self._check_extras(where, v, token_data, sample_data)
        if not self._schema_fixed:
            self._schema = _Schema(
                tokens={k: (a.dtype, tuple(a.shape[1:])) for k, a in tok.items()},
                samples={k: (a.dtype, tuple(a.shape)) for k, a in smp.items()},
            )
            self._schema_fixed = True

        self._pending.samples.append(
            {
                "tokens": {
                    "attn": np.array(attn, dtype=np.float32, copy=True),  # (V, L) float32
                    "row": rows.astype(np.int32),  # (V,) int32
                    "col": cols.astype(np.int32),  # (V,) int32
                    "position": pos.astype(np.int64),  # (V, P) int64
                    "tile": tile,  # (V,) int32
                    "separator": sep,  # (V,) bool
                    **{k: np.array(a, copy=True) for k, a in tok.items()},
                },
                "samples": {
                    "source": source,
                    "question": question,
                    "answer": "" if answer is None else answer,
                    "n_visual": v,
                    "grid": grid,
                    "n_tiles": len(tiles),
                    "visual_start": int(layout.visual_start),
                    "seq_len": int(layout.seq_len),
                    "id": sample_id,
                    **{k: np.array(a, copy=True) for k, a in smp.items()},
                },
                "tiles": tiles,  # (n_tiles, 2) int32
            }
        )
        self._ids.add(sample_id)
        self._n_tokens += v
        self._maybe_commit()

    def skip(self, *, sample_id: str, source: str, reason: str) -> None:
        """Record a sample that could not be profiled, with why.

        Raises
        ------
        posbias.errors.PosbiasError
            On a malformed id, an id already stored or skipped, or an empty reason.
        """
        self._check_open()
        self._check_id(sample_id, source)
        if not isinstance(reason, str) or not reason.strip():
            raise PosbiasError(f"store {self.path}, sample {sample_id!r}: skip reason must be a non-empty string")
        self._pending.skipped.append((sample_id, source, " ".join(reason.split())))
        self._skipped_ids.add(sample_id)
        self._maybe_commit()

    def set_static(self, name: str, array: Any) -> None:
        """Store a dataset written once per store (e.g. which region blocks are edge blocks); committed now.

        ``name`` without a group goes to ``/static/<name>``; ``"samples/<name>"`` or ``"static/<name>"``
        put it at that path (``/samples/region_is_edge`` is where the density fitter looks). Setting the
        same name again replaces the value.
        """
        self._check_open()
        where = f"store {self.path}"
        if not isinstance(name, str) or not name:
            raise PosbiasError(f"{where}: static name {name!r} must be a non-empty string")
        group, _, leaf = name.rpartition("/")
        group = group or "static"
        if group not in ("static", "samples") or not _NAME_RE.match(leaf):
            raise PosbiasError(f"{where}: static name {name!r} must be NAME, 'static/NAME' or 'samples/NAME'")
        if group == "samples" and (leaf in _SAMPLE_SPEC or leaf in self._schema.samples):
            raise PosbiasError(f"{where}: static name {name!r} collides with a per-sample dataset; choose another name")
        arr = np.asarray(array)
        if arr.dtype.kind not in "biuf":
            raise PosbiasError(f"{where}: static {name!r} has dtype {arr.dtype}; pass a numeric or bool array")
        path = f"{group}/{leaf}"
        self._pending.statics[path] = np.array(arr, copy=True)
        self._static_paths.add(path)
        self.commit()

    def update_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Add or replace caller attributes (same rules as the constructor's ``attrs``); committed now."""
        self._check_open()
        where = f"store {self.path}"
        json_keys = set(_to_python(self._attrs["json_attrs"]))
        staged: dict[str, Any] = {}
        for key, value in attrs.items():
            if key in _WRITER_ONLY or key in ("n_layers", "rope_dims"):
                raise PosbiasError(f"{where}: attribute {key!r} is set by the writer; do not update it")
            staged[key], as_json = _encode_attr(value, where, key)
            if as_json:
                json_keys.add(key)
            else:
                json_keys.discard(key)
        self._attrs.update(staged)
        self._attrs["json_attrs"] = np.array(sorted(json_keys), dtype=_STR)
        self._pending.attrs_dirty = True
        self.commit()

    def _maybe_commit(self) -> None:
        if len(self._pending.samples) + len(self._pending.skipped) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        """Write everything pending as one segment (temp file, fsync, atomic rename). No-op if nothing is."""
        self._check_open()
        pend = self._pending
        if not pend:
            return
        name = f"seg-{self._generation:06d}-{self._seq:08d}.npz"
        final = self._parts / name
        arrays: dict[str, np.ndarray] = {}
        if pend.samples:
            for name_ in pend.samples[0]["tokens"]:
                arrays[f"tokens.{name_}"] = np.concatenate([s["tokens"][name_] for s in pend.samples])
            n_vis = [int(s["samples"]["n_visual"]) for s in pend.samples]
            for name_ in _SAMPLE_FIELDS:
                if name_ == "offset":
                    arrays["samples.offset"] = np.cumsum([0] + n_vis)[:-1].astype(np.int64)  # (k,) int64
                elif name_ in _STRING_SAMPLE_FIELDS:
                    arrays[f"samples.{name_}"] = np.array([s["samples"][name_] for s in pend.samples], dtype=str)
                else:
                    arrays[f"samples.{name_}"] = np.asarray(
                        [s["samples"][name_] for s in pend.samples], dtype=_SAMPLE_SPEC[name_][0]
                    )
            for name_ in self._schema.samples:
                arrays[f"samples.{name_}"] = np.stack([s["samples"][name_] for s in pend.samples])
            arrays["tiles.grid"] = np.concatenate([s["tiles"] for s in pend.samples])  # (n_tiles, 2) int32
        else:  # a segment without samples still holds every base dataset, empty
            arrays["tokens.attn"] = np.zeros((0, self.n_layers), np.float32)
            arrays["tokens.position"] = np.zeros((0, self.rope_dims), np.int64)
            for name_, dt in _TOKEN_DTYPES.items():
                arrays[f"tokens.{name_}"] = np.zeros(0, dt)
            arrays["tiles.grid"] = np.zeros((0, 2), np.int32)
            for name_, (dt, trailing) in _SAMPLE_SPEC.items():
                strings = name_ in _STRING_SAMPLE_FIELDS
                arrays[f"samples.{name_}"] = np.zeros((0, *trailing), dtype=str if strings else dt)
        for i, field_ in enumerate(("id", "source", "reason")):
            arrays[f"skipped.{field_}"] = np.array([r[i] for r in pend.skipped], dtype=str)
        for path, value in pend.statics.items():
            arrays["static." + path.replace("/", ".")] = value
        attrs = dict(self._attrs)
        attrs["generation"] = np.int64(self._generation)
        attrs["segment"] = np.int64(self._seq)
        attrs["static_datasets"] = sorted(pend.statics)
        arrays["attrs"] = np.array(json.dumps({k: _to_python(v) for k, v in attrs.items()}))
        # the folder was cleaned when the writer opened it (under its lock): no sweep per segment
        with atomic_path(final, durable=self.durable, resume=_RESUME_HINT, sweep=False) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        self._seq += 1
        self._pending = _Pending()

    def compact(self, *, complete: bool = False) -> None:
        """Commit what is pending and rewrite base + segments as the single file ``path``."""
        self._check_open()
        self.commit()
        with ProfileStore(self.path) as view:
            if not view._segment_parts and view.complete == complete:
                return  # nothing to do: the base already is the store
            attrs = {k: v for k, v in view.raw_attrs.items() if k not in ("segment", "static_datasets")}
            attrs["complete"] = bool(complete)
            attrs["generation"] = np.int64(self._generation + 1)
            with atomic_path(self.path, durable=self.durable, resume=_RESUME_HINT, expect_bytes=_expected_bytes([view])) as tmp:
                _write_compact([view], tmp, attrs, durable=False)
        self._generation += 1
        self._seq = 0
        self._cleanup_stale()

    def close(self, *, complete: bool = True) -> None:
        """Commit, compact into the single file ``path`` (marked ``complete`` unless told otherwise) and
        release the store. Idempotent."""
        if self._closed:
            return
        try:
            self.compact(complete=complete)
            self._closed = True
            with contextlib.suppress(OSError):
                (self._parts / _LOCK_NAME).unlink()
                self._parts.rmdir()
        finally:
            self._closed = True
            self._unlock()

    def __enter__(self) -> ProfileStoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # an exception leaves a readable store of the samples so far, marked incomplete
        self.close(complete=exc_type is None)

    def __del__(self) -> None:  # pragma: no cover - best effort on garbage collection
        try:
            if not self._closed:
                self.close(complete=False)
        except Exception:
            pass


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


# ---------------------------------------------------------------------------------------------- reader


def _reencode(key: str, value: Any) -> Any:
    """A root attribute read back from JSON (a segment) as the HDF5 attribute the writer stores."""
    if key in ("json_attrs", "static_datasets") or (
        isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    ):
        return np.array(list(value), dtype=_STR)
    if isinstance(value, int) and not isinstance(value, bool):
        return np.int64(value)
    return value


class _Part:
    """One file of a store (the HDF5 base or an npz segment), with its per-sample tables in memory.

    Subclasses fill ``raw_attrs`` (HDF5-ready values) and a ``fields`` mapping of dataset path -> shape
    and dtype, and implement :meth:`read`.
    """

    path: Path
    raw_attrs: dict[str, Any]
    #: datasets a version-1 part lacks, synthesised: dataset path -> dtype of its (rows,) zeros
    _virtual: dict[str, Any] = {}

    def read(self, path: str, sel: Any = slice(None)) -> np.ndarray:
        """Rows ``sel`` of the dataset at ``path`` (a version-1 part gives tile 0 / no separator)."""
        if path in self._virtual:
            return np.zeros(self.n_tokens, dtype=self._virtual[path])[sel]
        return self._read(path, sel)

    def _read(self, path: str, sel: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release the file, if held."""

    def _finish_load(self, where: str, shapes: dict[str, tuple[tuple[int, ...], np.dtype]], static: set[str]) -> None:
        """Validate and read the tables, given ``shapes`` = {path: (shape, dtype)} of every dataset."""
        raw = self.raw_attrs
        schema = _to_python(raw.get("schema", None))
        if schema != SCHEMA_NAME:
            raise SchemaError(
                f"{where} is not a posbias profile store (schema={schema!r}); "
                "pass a profile.h5 written by 'profile-bias profile'"
            )
        version = _to_python(raw.get("schema_version", None))
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            readable = ", ".join(str(v) for v in READABLE_VERSIONS)
            raise SchemaError(
                f"{where} has schema_version {version}; this posbias reads versions {readable}: "
                "upgrade posbias or re-run profile-bias profile"
            )
        self.version = int(version)
        # version 1 stores lack the tile datasets: one tile (the sample's grid), no separator
        absent = set(_V2_DATASETS) if self.version == 1 else set()
        self._virtual = {p: _TOKEN_DTYPES[p.split("/")[1]] for p in absent if p.startswith("tokens/")}
        missing = [k for k in REQUIRED_ATTRS if k not in raw]
        missing += [
            f"/{g}/{n}"
            for g, names in (("samples", _SAMPLE_FIELDS), ("skipped", _SKIP_FIELDS), ("tokens", _TOKEN_FIELDS), ("tiles", ("grid",)))
            for n in names
            if f"{g}/{n}" not in shapes and f"{g}/{n}" not in absent
        ]
        if missing:
            raise SchemaError(f"{where} lacks {missing}; it is damaged or not from posbias: re-run profile-bias profile")
        self.attrs: dict[str, Any] = _decode_attrs(raw)
        self.n_layers = int(self.attrs["n_layers"])
        self.rope_dims = int(self.attrs["rope_dims"])
        if shapes["tokens/attn"][0][1:] != (self.n_layers,) or shapes["tokens/position"][0][1:] != (self.rope_dims,):
            raise SchemaError(
                f"{where}: /tokens/attn or /tokens/position disagree with n_layers={self.n_layers}, "
                f"rope_dims={self.rope_dims}; re-run profile-bias profile"
            )
        # optional datasets: per-sample (per-token) when they have a row per /samples/id (/tokens/attn) row;
        # any other dataset there (e.g. an (n, n) mask added with plain h5py) is read as a static one
        s_rows, t_rows = shapes["samples/id"][0][0], shapes["tokens/attn"][0][0]
        tokens_x: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        samples_x: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        for path, (shape, dt) in shapes.items():
            group, _, leaf = path.partition("/")
            if path in static or group not in ("tokens", "samples") or "/" in leaf:
                continue
            if leaf in (_TOKEN_FIELDS if group == "tokens" else _SAMPLE_SPEC):
                continue
            rows = t_rows if group == "tokens" else s_rows
            if len(shape) >= 1 and shape[0] == rows:
                (tokens_x if group == "tokens" else samples_x)[leaf] = (np.dtype(dt), tuple(shape[1:]))
            else:
                static.add(path)
        self.static_paths: list[str] = sorted(static)
        self.schema = _Schema(tokens=tokens_x, samples=samples_x)
        # a writer killed inside an in-place update may leave a torn last sample: count a sample only if
        # every row of it exists (cannot happen with segments, which are renamed into place whole)
        sample_names = [f"samples/{n}" for n in (*_SAMPLE_FIELDS, *samples_x) if f"samples/{n}" not in absent]
        token_names = [f"tokens/{n}" for n in (*_TOKEN_FIELDS, *tokens_x) if f"tokens/{n}" not in absent]
        s = min(shapes[n][0][0] for n in sample_names)
        t_avail = min(shapes[n][0][0] for n in token_names)
        n_visual = self.read("samples/n_visual", slice(0, s)).astype(np.int32)  # (S,)
        offsets = self.read("samples/offset", slice(0, s)).astype(np.int64)  # (S,)
        if self.version == 1:
            n_tiles = np.ones(s, dtype=np.int32)  # (S,)
            g_avail = s
        else:
            n_tiles = self.read("samples/n_tiles", slice(0, s)).astype(np.int32)  # (S,)
            g_avail = shapes["tiles/grid"][0][0]
        tile_ends = np.cumsum(n_tiles, dtype=np.int64)  # (S,)
        while s > 0 and (offsets[s - 1] + n_visual[s - 1] > t_avail or tile_ends[s - 1] > g_avail):
            s -= 1
        n_visual, offsets, n_tiles = n_visual[:s], offsets[:s], n_tiles[:s]
        if s and n_tiles.min() < 1:
            raise SchemaError(f"{where}: /samples/n_tiles holds a value below 1; the file is damaged")
        expected = np.concatenate([[0], np.cumsum(n_visual, dtype=np.int64)[:-1]]) if s else np.zeros(0, np.int64)
        if not np.array_equal(offsets, expected):
            raise SchemaError(f"{where}: /samples/offset is not the running sum of n_visual; the file is damaged")
        self.n_samples = int(s)
        self.n_tokens = int(n_visual.sum()) if s else 0
        self.torn_rows = int(max(shapes[n][0][0] for n in sample_names) - s) + int(t_avail - self.n_tokens)
        self.samples: dict[str, Any] = {
            "n_visual": n_visual,  # (S,) int32
            "offset": offsets,  # (S,) int64
            "grid": self.read("samples/grid", slice(0, s)).astype(np.int32).reshape(-1, 2),  # (S, 2) int32
            "n_tiles": n_tiles,  # (S,) int32
            "visual_start": self.read("samples/visual_start", slice(0, s)).astype(np.int32),  # (S,) int32
            "seq_len": self.read("samples/seq_len", slice(0, s)).astype(np.int32),  # (S,) int32
        }
        for name in _STRING_SAMPLE_FIELDS:
            self.samples[name] = self._strings(f"samples/{name}", s)
        n_tile_rows = int(n_tiles.sum()) if s else 0
        self.tile_offsets = (tile_ends[:s] - n_tiles).astype(np.int64)  # (S,) first row of each sample in tile_grid
        if self.version == 1:
            self.tile_grid = self.samples["grid"].copy()  # (S, 2) int32: one tile per sample
        else:
            self.tile_grid = self.read("tiles/grid", slice(0, n_tile_rows)).astype(np.int32).reshape(-1, 2)  # (n, 2)
        k = min(shapes[f"skipped/{n}"][0][0] for n in _SKIP_FIELDS)
        self.skipped = list(
            zip(self._strings("skipped/id", k), self._strings("skipped/source", k), self._strings("skipped/reason", k), strict=True)
        )

    def _strings(self, path: str, n: int) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError


class _H5Part(_Part):
    """The compacted HDF5 store file; kept open."""

    def __init__(self, path: Path, where: str, *, locking: bool | None) -> None:
        self.path = path
        try:
            self._file: h5py.File | None = h5py.File(path, "r", locking=locking, rdcc_nbytes=_CACHE_BYTES)
        except OSError as exc:
            text = str(exc).lower()
            if "truncated" in text:
                raise SchemaError(
                    f"{where} is truncated (an incomplete copy, or written by a process that was stopped); "
                    "copy it again or re-run 'profile-bias profile' (with --resume if its folder holds segments)"
                ) from exc
            # the word "lock", not "sblock" inside HDF5's superblock messages
            if re.search(r"\block", text):
                raise SchemaError(
                    f"{where} is locked (a writer has it open, or the filesystem lacks file locks); "
                    "wait for the writer, or open with locking=False / set HDF5_USE_FILE_LOCKING=FALSE"
                ) from exc
            msg = " ".join(str(exc).split())
            raise SchemaError(f"{where} cannot be opened as HDF5 ({msg}); re-run 'profile-bias profile'") from exc
        try:
            f = self._file
            self.raw_attrs = dict(f.attrs.items())
            shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    shapes[name] = (tuple(obj.shape), obj.dtype)

            f.visititems(visit)
            static = {str(p) for p in _to_python(self.raw_attrs.get("static_datasets", [])) or []}
            self._finish_load(where, shapes, static)
        except BaseException:
            self.close()
            raise

    def _read(self, path: str, sel: Any) -> np.ndarray:
        assert self._file is not None
        return self._file[path][sel]

    def _strings(self, path: str, n: int) -> list[str]:
        assert self._file is not None
        return list(self._file[path].asstr()[:n])

    def close(self) -> None:
        if self._file is not None and self._file.id.valid:
            self._file.close()
        self._file = None


class _NpzPart(_Part):
    """A committed segment (``.npz``, no pickles); token arrays are read from the file on access."""

    def __init__(self, path: Path, where: str) -> None:
        self.path = path
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["attrs"][()]))
                shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
                self._small: dict[str, np.ndarray] = {}
                for key in z.files:
                    if key == "attrs":
                        continue
                    if key.startswith("static."):
                        path_ = key[len("static."):].replace(".", "/")
                        arr = z[key]
                        self._small[path_] = arr
                        shapes[path_] = (arr.shape, arr.dtype)
                        continue
                    arr = z[key]
                    path_ = key.replace(".", "/")
                    shapes[path_] = (arr.shape, arr.dtype)
                    if not path_.startswith("tokens/"):
                        self._small[path_] = arr
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            msg = " ".join(str(exc).split())
            raise SchemaError(f"{where} cannot be read ({msg}); delete that segment file and resume the run") from exc
        self.raw_attrs = {k: _reencode(k, v) for k, v in meta.items()}
        self._finish_load(where, shapes, set(meta.get("static_datasets", []) or []))

    # the token arrays of the most recently read segment (reads and compaction visit segments in turn)
    _recent: tuple[Path, dict[str, np.ndarray]] | None = None

    def _read(self, path: str, sel: Any) -> np.ndarray:
        if path in self._small:
            return self._small[path][sel]
        recent = _NpzPart._recent
        if recent is None or recent[0] != self.path:
            with np.load(self.path, allow_pickle=False) as z:
                arrays = {k.replace(".", "/"): z[k] for k in z.files if k.startswith("tokens.")}
            recent = (self.path, arrays)
            _NpzPart._recent = recent
        return recent[1][path][sel]

    def close(self) -> None:
        if _NpzPart._recent is not None and _NpzPart._recent[0] == self.path:
            _NpzPart._recent = None

    def _strings(self, path: str, n: int) -> list[str]:
        return [str(x) for x in self._small[path][:n]]


class ProfileStore:
    """Read-only view of a profile store; validates the schema name and version on open.

    Reads a finished store (one file) and an interrupted one (the last compacted file plus the committed
    segments in ``<path>.parts/``) alike. Per-sample tables are read into memory on open; token arrays
    are read on demand.

    Parameters
    ----------
    path : str or Path
        The store file, or a run folder holding ``profile.h5``.
    locking : bool, optional
        HDF5 file locking (``None``: the HDF5 default, which honours ``HDF5_USE_FILE_LOCKING``). Store
        files are never written in place, so reading never needs a writer's lock.

    Attributes
    ----------
    attrs : dict
        Root attributes as plain Python values (JSON-encoded ones decoded).
    n_samples, n_layers, rope_dims, n_tokens : int
        S, L, P and T.
    sample_ids, sources, questions, answers : list of str
        (S,) per-sample strings.
    n_visual : np.ndarray
        (S,) int32 visual tokens per sample.
    offsets : np.ndarray
        (S,) int64 first token row of each sample.
    grids : np.ndarray
        (S, 2) int32 (rows, cols) of each sample's grid.
    visual_start, seq_len : np.ndarray
        (S,) int32.
    complete : bool
        False for an interrupted run (segments not yet compacted) or a run closed after an error.
    pending_segments : int
        Committed segments not yet compacted into the store file (0 for a finished store).
    generation : int
        Compactions so far.

    Raises
    ------
    posbias.errors.SchemaError
        For a missing file, a file that is not HDF5, not a posbias store, or of another schema version.
    """

    def __init__(self, path: str | os.PathLike[str], *, locking: bool | None = None) -> None:
        self.path = resolve_store_path(path)
        where = f"store {self.path}"
        if self.path.is_dir():
            raise SchemaError(f"{where} is a directory; pass the profile.h5 file inside it")
        self._base: _Part | None = None
        self._segment_parts: list[_Part] = []
        self._parts: list[_Part] = []
        try:
            if self.path.exists():
                if not _looks_like_hdf5(self.path):
                    raise SchemaError(f"{where} is not an HDF5 file; pass a profile.h5 written by 'profile-bias profile'")
                self._base = _H5Part(self.path, where, locking=locking)
            generation = int(self._base.attrs.get("generation", 0)) if self._base else 0
            segs = _segments(self.path, generation)
            if self._base is None and not segs:
                raise SchemaError(f"{where} does not exist; check the path or run 'profile-bias profile' first")
            for _gen, _seq, seg in segs:
                self._segment_parts.append(_NpzPart(seg, f"{where} (segment {seg.name})"))
            self._parts = ([self._base] if self._base else []) + self._segment_parts
            self.generation: int = generation
            self._next_seq: int = (segs[-1][1] + 1) if segs else 0
            self._load(where)
        except BaseException:
            self.close()
            raise

    def _load(self, where: str) -> None:
        parts = self._parts
        first, last = parts[0], parts[-1]
        for p in parts[1:]:
            if (p.n_layers, p.rope_dims) != (first.n_layers, first.rope_dims):
                raise SchemaError(f"{where}: segment {p.path.name} has another n_layers/rope_dims; the store is damaged")
        # latest attributes win (a resumed run may update caller attributes); creation time of the first
        self.raw_attrs: dict[str, Any] = dict(last.raw_attrs)
        self.raw_attrs["created"] = first.raw_attrs["created"]
        attrs = dict(last.attrs)
        attrs["created"] = first.attrs["created"]
        self.pending_segments: int = len(self._segment_parts)
        self.complete: bool = bool(self._base is not None and self._base.attrs.get("complete", False) and not self._segment_parts)
        attrs["complete"] = self.complete
        self.attrs: dict[str, Any] = attrs
        self.n_layers: int = first.n_layers
        self.rope_dims: int = first.rope_dims

        # optional datasets must be the same in every part that holds samples
        with_samples = [p for p in parts if p.n_samples > 0]
        ref = with_samples[0].schema if with_samples else _Schema()
        for p in with_samples[1:]:
            if p.schema.describe() != ref.describe():
                raise SchemaError(
                    f"{where}: {p.path.name} holds signal datasets {p.schema.describe()} but earlier parts hold "
                    f"{ref.describe()}; the run mixed signal options: re-run with --overwrite"
                )
        self._schema: _Schema = ref

        self.torn_rows: int = sum(p.torn_rows for p in parts)
        if self.torn_rows:
            warnings.warn(
                f"{where}: ignoring {self.torn_rows} row(s) of an interrupted write after the last complete sample",
                RuntimeWarning,
                stacklevel=3,
            )
        self._part_samples = np.cumsum([0] + [p.n_samples for p in parts]).astype(np.int64)  # (n_parts+1,)
        self._part_tokens = np.cumsum([0] + [p.n_tokens for p in parts]).astype(np.int64)  # (n_parts+1,)
        self.n_samples: int = int(self._part_samples[-1])
        self.n_tokens: int = int(self._part_tokens[-1])
        self.n_visual: np.ndarray = np.concatenate([p.samples["n_visual"] for p in parts]).astype(np.int32)  # (S,)
        self.offsets: np.ndarray = (
            np.concatenate([[0], np.cumsum(self.n_visual, dtype=np.int64)[:-1]]) if self.n_samples else np.zeros(0, np.int64)
        )  # (S,) int64
        self.grids: np.ndarray = np.concatenate([p.samples["grid"] for p in parts]).reshape(-1, 2).astype(np.int32)  # (S, 2)
        self.n_tiles: np.ndarray = np.concatenate([p.samples["n_tiles"] for p in parts]).astype(np.int32)  # (S,)
        self.tile_offsets: np.ndarray = (
            np.concatenate([[0], np.cumsum(self.n_tiles, dtype=np.int64)[:-1]]) if self.n_samples else np.zeros(0, np.int64)
        )  # (S,) int64
        self.tile_grids: np.ndarray = np.concatenate([p.tile_grid for p in parts]).reshape(-1, 2).astype(np.int32)  # (sum n_tiles, 2)
        self.visual_start: np.ndarray = np.concatenate([p.samples["visual_start"] for p in parts]).astype(np.int32)  # (S,)
        self.seq_len: np.ndarray = np.concatenate([p.samples["seq_len"] for p in parts]).astype(np.int32)  # (S,)
        self.sample_ids: list[str] = [x for p in parts for x in p.samples["id"]]
        self.sources: list[str] = [x for p in parts for x in p.samples["source"]]
        self.questions: list[str] = [x for p in parts for x in p.samples["question"]]
        self.answers: list[str] = [x for p in parts for x in p.samples["answer"]]
        self._skipped = [row for p in parts for row in p.skipped]
        dup = {i for i in self.sample_ids if self.sample_ids.count(i) > 1} if len(set(self.sample_ids)) != self.n_samples else set()
        if dup:
            raise SchemaError(f"{where}: sample ids {sorted(dup)[:3]} appear twice; the store is damaged")
        self._statics: dict[str, _Part] = {}
        for p in parts:  # latest value wins
            for sp in p.static_paths:
                self._statics[sp] = p
        self._cache: dict[str, np.ndarray] = {}

    # -- internal access

    def _locate(self, s: int) -> tuple[_Part, int]:
        """(part, index within the part) of global sample ``s``."""
        k = int(np.searchsorted(self._part_samples, s, side="right") - 1)
        return self._parts[k], int(s - self._part_samples[k])

    def _read_tokens(self, name: str, col: int | None = None) -> np.ndarray:
        """(T, ...) rows of ``/tokens/<name>`` over all parts (column ``col`` only, if given)."""
        chunks: list[np.ndarray] = []
        for p in self._parts:
            if p.n_tokens == 0:
                continue
            sel = slice(0, p.n_tokens) if col is None else (slice(0, p.n_tokens), col)
            chunks.append(p.read(f"tokens/{name}", sel))
        if not chunks:
            if name == "attn":
                return np.zeros((0, self.n_layers) if col is None else (0,), dtype=np.float32)
            dt, trailing = self._schema.tokens.get(name, (np.dtype(np.float32), ()))
            return np.zeros((0, *(trailing if col is None else trailing[1:])), dtype=dt)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    # -- attention

    def _layer_index(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise PosbiasError(f"layer {layer!r} must be an int (store {self.path} has {self.n_layers} layers)")
        li = int(layer)
        if li < 0:
            li += self.n_layers
        if not 0 <= li < self.n_layers:
            raise PosbiasError(
                f"layer {layer} is out of range for store {self.path} with {self.n_layers} layers; "
                f"choose 0..{self.n_layers - 1}"
            )
        return li

    def layer(self, l: int) -> np.ndarray:  # noqa: E741 - the spec's name
        """(T,) float32 attention of every token at decoder layer ``l`` (negative counts from the end)."""
        li = self._layer_index(l)
        if self.n_tokens == 0:
            return np.zeros(0, dtype=np.float32)
        return self._read_tokens("attn", li)  # (T,) float32

    def layers(self, ls: Iterable[int]) -> np.ndarray:
        """(T, len(ls)) float32 attention at the given layers, in the given order (repeats allowed)."""
        idx = [self._layer_index(l) for l in ls]
        out = np.empty((self.n_tokens, len(idx)), dtype=np.float32)  # (T, n)
        for j, li in enumerate(idx):
            if j and li in idx[:j]:
                out[:, j] = out[:, idx.index(li)]
            else:
                out[:, j] = self.layer(li)
        return out

    def all_layers(self) -> np.ndarray:
        """(T, L) float32, the whole attention matrix (T * L * 4 bytes of memory)."""
        return self._read_tokens("attn")  # (T, L) float32

    def _sample_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise PosbiasError(f"sample index {i!r} must be an int (store {self.path} has {self.n_samples} samples)")
        ii = int(i) + (self.n_samples if int(i) < 0 else 0)
        if not 0 <= ii < self.n_samples:
            raise PosbiasError(f"sample index {i} is out of range for store {self.path} with {self.n_samples} samples")
        return ii

    def _sample_rows(self, i: int, name: str) -> np.ndarray:
        part, local = self._locate(self._sample_index(i))
        lo = int(part.samples["offset"][local])
        return part.read(f"tokens/{name}", slice(lo, lo + int(part.samples["n_visual"][local])))

    def sample_attn(self, i: int) -> np.ndarray:
        """(V_i, L) float32 attention of sample ``i``."""
        return self._sample_rows(i, "attn")  # (V_i, L) float32

    def sample_slice(self, i: int) -> slice:
        """Token rows of sample ``i`` in the (T, ...) arrays."""
        ii = self._sample_index(i)
        lo = int(self.offsets[ii])
        return slice(lo, lo + int(self.n_visual[ii]))

    # -- optional signal datasets

    def _where_is(self, name: str) -> str | None:
        if "/" in name:
            group, _, leaf = name.rpartition("/")
            if group == "tokens" and leaf in self._schema.tokens:
                return "tokens"
            if group == "samples" and leaf in self._schema.samples:
                return "samples"
            return "static" if name in self._statics else None
        if name in self._schema.tokens:
            return "tokens"
        if name in self._schema.samples:
            return "samples"
        if f"static/{name}" in self._statics:
            return "static"
        return None

    def has(self, name: str) -> bool:
        """True when the store holds signal ``name``: ``/tokens/<name>``, ``/samples/<name>`` or a static.

        ``name`` may also be a path (``"tokens/attn_pa"``, ``"samples/region_is_edge"``). The base
        datasets (attn, id, ...) are always present and are not reported here.
        """
        return self._where_is(name) is not None

    def signal_names(self) -> dict[str, list[str]]:
        """Names of the optional datasets: ``{"tokens": [...], "samples": [...], "static": [paths]}``."""
        return {"tokens": sorted(self._schema.tokens), "samples": sorted(self._schema.samples), "static": sorted(self._statics)}

    def token_data(self, name: str) -> np.ndarray:
        """(T, ...) rows of ``/tokens/<name>``, sample after sample like :meth:`all_layers`."""
        leaf = name.split("/", 1)[1] if name.startswith("tokens/") else name
        if leaf not in self._schema.tokens:
            raise PosbiasError(
                f"store {self.path} has no /tokens/{leaf}; it holds {sorted(self._schema.tokens) or 'none'}: "
                "re-profile with that signal enabled"
            )
        return self._tokens(leaf)

    def sample_token_data(self, name: str, i: int) -> np.ndarray:
        """(V_i, ...) rows of ``/tokens/<name>`` of sample ``i``."""
        leaf = name.split("/", 1)[1] if name.startswith("tokens/") else name
        if leaf not in self._schema.tokens:
            raise PosbiasError(f"store {self.path} has no /tokens/{leaf}; re-profile with that signal enabled")
        return self._sample_rows(i, leaf)

    def sample_data(self, name: str) -> np.ndarray:
        """(S, ...) values of ``/samples/<name>``."""
        leaf = name.split("/", 1)[1] if name.startswith("samples/") else name
        if leaf not in self._schema.samples:
            raise PosbiasError(
                f"store {self.path} has no per-sample /samples/{leaf}; it holds {sorted(self._schema.samples) or 'none'}: "
                "re-profile with that signal enabled"
            )
        key = f"samples/{leaf}"
        if key not in self._cache:
            chunks = []
            for p in self._parts:
                if p.n_samples:
                    chunks.append(p.read(key, slice(0, p.n_samples)))
            dt, trailing = self._schema.samples[leaf]
            self._cache[key] = np.concatenate(chunks) if chunks else np.zeros((0, *trailing), dtype=dt)
        return self._cache[key]

    @property
    def utr_loss(self) -> np.ndarray | None:
        """(S, L) float32 ``/samples/utr_loss`` (UTP information loss, docs/utp.md), or None when absent."""
        return self.sample_data("utr_loss") if "utr_loss" in self._schema.samples else None

    @property
    def has_attn_pa(self) -> bool:
        """True when the store holds ``/tokens/attn_pa`` (position-agnostic attention)."""
        return "attn_pa" in self._schema.tokens

    def sample_attn_pa(self, i: int) -> np.ndarray:
        """(V_i, K) ``/tokens/attn_pa`` rows of sample ``i``."""
        return self.sample_token_data("attn_pa", i)

    def static_names(self) -> list[str]:
        """Paths of the static datasets (``"static/<name>"`` or ``"samples/<name>"``)."""
        return sorted(self._statics)

    def static(self, name: str) -> np.ndarray:
        """A dataset written once per store (``name``, ``"static/<name>"`` or ``"samples/<name>"``)."""
        path = name if "/" in name else f"static/{name}"
        if path not in self._statics:
            raise PosbiasError(
                f"store {self.path} has no static dataset {path}; it holds {sorted(self._statics) or 'none'}"
            )
        return np.asarray(self._statics[path].read(path, ...))

    # -- token tables

    def _tokens(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._read_tokens(name)
        return self._cache[name]

    @property
    def rows(self) -> np.ndarray:
        """(T,) int32 grid row of every token."""
        return self._tokens("row")

    @property
    def cols(self) -> np.ndarray:
        """(T,) int32 grid column of every token."""
        return self._tokens("col")

    @property
    def positions(self) -> np.ndarray:
        """(T, P) int64 RoPE position ids of every token."""
        return self._tokens("position")

    @property
    def token_tile(self) -> np.ndarray:
        """(T,) int32 tile (sub-image) index of every token within its sample (0 for one-tile layouts)."""
        return self._tokens("tile")

    @property
    def token_separator(self) -> np.ndarray:
        """(T,) bool, True for separator tokens (e.g. LLaVA-NeXT's image newline), which sit in no grid cell."""
        return self._tokens("separator")

    @property
    def multi_tile(self) -> bool:
        """True when some sample has more than one tile or a separator token."""
        return bool(self.n_samples and (self.n_tiles.max() > 1 or self.token_separator.any()))

    def sample_tiles(self, i: int) -> np.ndarray:
        """(n_tiles_i, 2) int32 grid (rows, cols) of each tile of sample ``i``, index = tile."""
        ii = self._sample_index(i)
        lo = int(self.tile_offsets[ii])
        return self.tile_grids[lo : lo + int(self.n_tiles[ii])]

    def sample_token_tile(self, i: int) -> np.ndarray:
        """(V_i,) int32 tile index of every token of sample ``i``."""
        return self._sample_rows(i, "tile").astype(np.int32)

    def sample_token_separator(self, i: int) -> np.ndarray:
        """(V_i,) bool separator flag of every token of sample ``i``."""
        return self._sample_rows(i, "separator").astype(bool)

    def token_sample(self) -> np.ndarray:
        """(T,) int64 index of the sample each token belongs to."""
        return np.repeat(np.arange(self.n_samples, dtype=np.int64), self.n_visual)  # (T,)

    def token_index(self) -> np.ndarray:
        """(T,) int64 raster index ``row * tile_cols + col`` of each token within its tile's grid.

        For one image laid out in raster order (LLaVA's 24x24 grid, Qwen2.5-VL's merged grid) this is
        0..V-1 per sample, PoRe's index ``i``. Separator tokens get -1.
        """
        tile_row = np.repeat(self.tile_offsets, self.n_visual) + self.token_tile  # (T,) row in tile_grids
        tile_cols = self.tile_grids[tile_row, 1].astype(np.int64) if self.n_tokens else np.zeros(0, np.int64)  # (T,)
        index = self.rows.astype(np.int64) * tile_cols + self.cols.astype(np.int64)  # (T,)
        return np.where(self.token_separator, -1, index)  # (T,) int64

    # -- bookkeeping

    def skipped(self) -> list[tuple[str, str, str]]:
        """(id, source, reason) of every sample the run could not use, in the order they were skipped."""
        return list(self._skipped)

    def sources_count(self) -> dict[str, int]:
        """Number of stored samples per source name."""
        counts: dict[str, int] = {}
        for src in self.sources:
            counts[src] = counts.get(src, 0) + 1
        return counts

    def non_finite_samples(self) -> np.ndarray:
        """(S,) bool, True for samples whose attention has a NaN or inf anywhere (reads /tokens/attn in
        row blocks)."""
        if self.n_samples == 0:
            return np.zeros(0, dtype=bool)
        bad_tok = np.zeros(self.n_tokens, dtype=bool)  # (T,)
        for k, p in enumerate(self._parts):
            if p.n_tokens == 0:
                continue
            base = int(self._part_tokens[k])
            step = _ROW_CHUNK * 16
            for lo in range(0, p.n_tokens, step):
                hi = min(lo + step, p.n_tokens)
                bad_tok[base + lo : base + hi] = ~np.isfinite(p.read("tokens/attn", slice(lo, hi))).all(axis=1)
        return np.logical_or.reduceat(bad_tok, self.offsets)

    def close(self) -> None:
        """Close the files. Idempotent."""
        for p in self._parts or ([self._base] if self._base else []):
            p.close()

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        return (
            f"ProfileStore({str(self.path)!r}, samples={self.n_samples}, tokens={self.n_tokens}, "
            f"layers={self.n_layers}, rope_dims={self.rope_dims}, skipped={len(self._skipped)}, "
            f"pending_segments={self.pending_segments})"
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
