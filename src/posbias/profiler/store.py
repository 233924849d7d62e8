"""The profile store: one HDF5 file (``profile.h5``) of last-token attention to every visual token.

The normative format is ``docs/store.md``; this module is its reference writer and reader. The file is
meant to be read with plain h5py too, so everything in it is a plain dataset or attribute: variable-length
UTF-8 strings, int32/int64 tables and one ``(T, L)`` float32 attention matrix whose rows are the visual
tokens of all samples, stacked sample after sample.

The writer appends one sample at a time and flushes after each, so a long run streams to disk and a
killed run keeps every sample appended before the kill.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from posbias.errors import PosbiasError, SchemaError
from posbias.models.base import VisualLayout

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "REQUIRED_ATTRS",
    "ProfileStoreWriter",
    "ProfileStore",
]

SCHEMA_NAME = "posbias.profile"
SCHEMA_VERSION = 1

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

#: attributes the caller of the writer must supply
_CALLER_REQUIRED = ("model_id", "model_fingerprint", "adapter", "seed")
#: attributes only the writer sets
_WRITER_ONLY = ("schema", "schema_version", "created", "complete", "json_attrs")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ROW_CHUNK = 4096  # token rows per chunk
_LAYER_CHUNK = 4  # layers per chunk of /tokens/attn: one-layer reads touch T/4096 small chunks
_SAMPLE_CHUNK = 256
_CACHE_BYTES = 16 * 2**20  # chunk cache per dataset

_STR = h5py.string_dtype(encoding="utf-8")

# name -> (dtype, trailing shape or None for 1-D); the order is the write order of one append
_SAMPLE_FIELDS: tuple[str, ...] = (
    "source",
    "question",
    "answer",
    "n_visual",
    "offset",
    "grid",
    "visual_start",
    "seq_len",
    "id",  # written last: a sample is present once its id is
)
_SKIP_FIELDS: tuple[str, ...] = ("source", "reason", "id")


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


# ---------------------------------------------------------------------------------------------- writer


class ProfileStoreWriter:
    """Create a profile store and append samples to it, one flushed sample at a time.

    Parameters
    ----------
    path : str or Path
        File to create (parent folders are created).
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
        Replace an existing file at ``path``.

    Raises
    ------
    posbias.errors.PosbiasError
        If ``path`` exists and ``overwrite`` is false, or the arguments are invalid.

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
    ) -> None:
        self.path = Path(path)
        if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
            raise PosbiasError(f"store {self.path}: n_layers={n_layers!r} must be a positive int")
        if isinstance(rope_dims, bool) or not isinstance(rope_dims, (int, np.integer)) or rope_dims < 1:
            raise PosbiasError(
                f"store {self.path}: rope_dims={rope_dims!r} must be a positive int (1, or 3 for M-RoPE)"
            )
        self.n_layers = int(n_layers)
        self.rope_dims = int(rope_dims)
        root_attrs = self._root_attrs(dict(attrs))

        if self.path.is_dir():
            raise PosbiasError(f"store {self.path} is a directory; choose a file path for the store")
        if self.path.exists() and not overwrite:
            raise PosbiasError(f"store {self.path} already exists; pass --overwrite or choose another --out")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = h5py.File(self.path, "w", rdcc_nbytes=_CACHE_BYTES)
        except OSError as exc:
            hint = ""
            if "lock" in str(exc).lower():
                hint = "set HDF5_USE_FILE_LOCKING=FALSE if the filesystem lacks file locks, "
            msg = " ".join(str(exc).split())
            raise PosbiasError(
                f"cannot create store {self.path} ({msg}); {hint}check the folder is writable or choose another --out"
            ) from exc

        f = self._file
        for key, value in root_attrs.items():
            f.attrs[key] = value

        samples = f.create_group("samples")
        for name in ("id", "source", "question", "answer"):
            self._make(samples, name, (), _STR, compress=False)
        self._make(samples, "n_visual", (), np.int32)
        self._make(samples, "offset", (), np.int64)
        self._make(samples, "grid", (2,), np.int32)
        self._make(samples, "visual_start", (), np.int32)
        self._make(samples, "seq_len", (), np.int32)

        tokens = f.create_group("tokens")
        self._make(tokens, "attn", (self.n_layers,), np.float32, rows=_ROW_CHUNK, cols=min(_LAYER_CHUNK, self.n_layers))
        self._make(tokens, "row", (), np.int32, rows=_ROW_CHUNK)
        self._make(tokens, "col", (), np.int32, rows=_ROW_CHUNK)
        self._make(tokens, "position", (self.rope_dims,), np.int64, rows=_ROW_CHUNK)

        skipped = f.create_group("skipped")
        for name in ("id", "source", "reason"):
            self._make(skipped, name, (), _STR, compress=False)
        f.flush()

        self._ids: set[str] = set()
        self._skipped_ids: set[str] = set()
        self._n_tokens = 0
        self._closed = False

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

    @staticmethod
    def _make(
        group: h5py.Group,
        name: str,
        trailing: tuple[int, ...],
        dtype: Any,
        *,
        rows: int = _SAMPLE_CHUNK,
        cols: int | None = None,
        compress: bool = True,
    ) -> None:
        chunks = (rows,) + ((cols,) if cols is not None else trailing)
        kwargs: dict[str, Any] = {}
        if compress:
            kwargs = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        group.create_dataset(
            name, shape=(0, *trailing), maxshape=(None, *trailing), dtype=dtype, chunks=chunks, **kwargs
        )

    # -- public API

    @property
    def n_samples(self) -> int:
        """Samples appended so far."""
        return len(self._ids)

    @property
    def n_skipped(self) -> int:
        """Skips recorded so far."""
        return len(self._skipped_ids)

    @property
    def n_tokens(self) -> int:
        """Token rows appended so far (T)."""
        return self._n_tokens

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

    @staticmethod
    def _append_rows(ds: h5py.Dataset, values: Any) -> None:
        n = ds.shape[0]
        k = len(values)
        ds.resize(n + k, axis=0)
        ds[n : n + k] = values

    def append(
        self,
        *,
        sample_id: str,
        source: str,
        question: str,
        answer: str | None,
        layout: VisualLayout,
        attn: np.ndarray,
    ) -> None:
        """Append one profiled sample and flush it to disk.

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
        if rows.min() < 0 or rows.max() >= grid[0] or cols.min() < 0 or cols.max() >= grid[1]:
            raise PosbiasError(f"{where}: layout rows/cols fall outside the grid {grid}; check the adapter's layout")
        vis = np.asarray(layout.visual_index)  # (V,)
        if vis.shape != (v,):
            raise PosbiasError(f"{where}: layout visual_index has shape {vis.shape}; expected ({v},)")
        if int(layout.seq_len) <= int(vis.max()):
            raise PosbiasError(f"{where}: layout seq_len {layout.seq_len} does not cover visual index {int(vis.max())}")

        f = self._file
        offset = self._n_tokens
        # tokens first, then the sample row (id last): a reader counts a sample only when all its rows exist
        tok = f["tokens"]
        self._append_rows(tok["attn"], attn)
        self._append_rows(tok["row"], rows.astype(np.int32))
        self._append_rows(tok["col"], cols.astype(np.int32))
        self._append_rows(tok["position"], pos.astype(np.int64))
        values: dict[str, Any] = {
            "source": [source],
            "question": [question],
            "answer": ["" if answer is None else answer],
            "n_visual": np.array([v], dtype=np.int32),
            "offset": np.array([offset], dtype=np.int64),
            "grid": np.array([grid], dtype=np.int32),
            "visual_start": np.array([layout.visual_start], dtype=np.int32),
            "seq_len": np.array([int(layout.seq_len)], dtype=np.int32),
            "id": [sample_id],
        }
        smp = f["samples"]
        for name in _SAMPLE_FIELDS:
            self._append_rows(smp[name], values[name])
        f.flush()
        self._ids.add(sample_id)
        self._n_tokens = offset + v

    def skip(self, *, sample_id: str, source: str, reason: str) -> None:
        """Record a sample that could not be profiled, with why, and flush.

        Raises
        ------
        posbias.errors.PosbiasError
            On a malformed id, an id already stored or skipped, or an empty reason.
        """
        self._check_open()
        self._check_id(sample_id, source)
        if not isinstance(reason, str) or not reason.strip():
            raise PosbiasError(f"store {self.path}, sample {sample_id!r}: skip reason must be a non-empty string")
        grp = self._file["skipped"]
        values = {"source": [source], "reason": [reason], "id": [sample_id]}
        for name in _SKIP_FIELDS:
            self._append_rows(grp[name], values[name])
        self._file.flush()
        self._skipped_ids.add(sample_id)

    def update_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Add or replace caller attributes (same rules as the constructor's ``attrs``)."""
        self._check_open()
        f = self._file
        json_keys = set(_to_python(f.attrs["json_attrs"]))
        for key, value in attrs.items():
            if key in _WRITER_ONLY or key in ("n_layers", "rope_dims"):
                raise PosbiasError(f"store {self.path}: attribute {key!r} is set by the writer; do not update it")
            f.attrs[key], as_json = _encode_attr(value, f"store {self.path}", key)
            if as_json:
                json_keys.add(key)
            else:
                json_keys.discard(key)
        f.attrs["json_attrs"] = np.array(sorted(json_keys), dtype=_STR)
        f.flush()

    def close(self, *, complete: bool = True) -> None:
        """Mark the store complete (unless ``complete=False``), flush and close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._file.attrs["complete"] = bool(complete)
            self._file.flush()
        finally:
            self._file.close()

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


# ---------------------------------------------------------------------------------------------- reader


class ProfileStore:
    """Read-only view of a profile store; validates the schema name and version on open.

    Per-sample tables are read into memory on open; token arrays are read on demand.

    Parameters
    ----------
    path : str or Path
        The store file.
    locking : bool, optional
        HDF5 file locking (``None``: the HDF5 default, which honours ``HDF5_USE_FILE_LOCKING``).
        ``False`` lets you read a store while a writer still has it open (you see the samples flushed
        so far).

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
        False when the writer never closed (killed run) or closed after an error.

    Raises
    ------
    posbias.errors.SchemaError
        For a missing file, a file that is not HDF5, not a posbias store, or of another schema version.
    """

    def __init__(self, path: str | os.PathLike[str], *, locking: bool | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SchemaError(f"store {self.path} does not exist; check the path or run 'profile-bias profile' first")
        if self.path.is_dir():
            raise SchemaError(f"store {self.path} is a directory; pass the profile.h5 file inside it")
        if not _looks_like_hdf5(self.path):
            raise SchemaError(
                f"store {self.path} is not an HDF5 file; pass a profile.h5 written by 'profile-bias profile'"
            )
        try:
            self._file = h5py.File(self.path, "r", locking=locking, rdcc_nbytes=_CACHE_BYTES)
        except OSError as exc:
            if "lock" in str(exc).lower():
                raise SchemaError(
                    f"store {self.path} is locked (a writer has it open, or the filesystem lacks file locks); "
                    "wait for the writer, or open with locking=False / set HDF5_USE_FILE_LOCKING=FALSE"
                ) from exc
            msg = " ".join(str(exc).split())
            raise SchemaError(f"store {self.path} cannot be opened as HDF5 ({msg}); re-run 'profile-bias profile'") from exc
        try:
            self._load()
        except BaseException:
            self._file.close()
            raise

    def _load(self) -> None:
        f = self._file
        where = f"store {self.path}"
        schema = _to_python(f.attrs.get("schema", None))
        if schema != SCHEMA_NAME:
            raise SchemaError(
                f"{where} is not a posbias profile store (schema={schema!r}); "
                "pass a profile.h5 written by 'profile-bias profile'"
            )
        version = _to_python(f.attrs.get("schema_version", None))
        if version != SCHEMA_VERSION:
            raise SchemaError(
                f"{where} has schema_version {version}; this posbias reads version {SCHEMA_VERSION}: "
                "upgrade posbias or re-run profile-bias profile"
            )
        missing = [k for k in REQUIRED_ATTRS if k not in f.attrs]
        missing += [f"/{g}/{n}" for g, names in (("samples", _SAMPLE_FIELDS), ("skipped", _SKIP_FIELDS),
                                                  ("tokens", ("attn", "row", "col", "position")))
                    for n in names if f"{g}/{n}" not in f]
        if missing:
            raise SchemaError(
                f"{where} lacks {missing}; it is damaged or not from posbias: re-run profile-bias profile"
            )

        attrs = {k: _to_python(v) for k, v in f.attrs.items()}
        for key in attrs.get("json_attrs", []) or []:
            if key in attrs:
                attrs[key] = json.loads(attrs[key])
        self.attrs: dict[str, Any] = attrs
        self.n_layers: int = int(attrs["n_layers"])
        self.rope_dims: int = int(attrs["rope_dims"])
        self.complete: bool = bool(attrs.get("complete", False))

        smp = f["samples"]
        tok = f["tokens"]
        if tok["attn"].shape[1:] != (self.n_layers,) or tok["position"].shape[1:] != (self.rope_dims,):
            raise SchemaError(
                f"{where}: /tokens/attn or /tokens/position disagree with n_layers={self.n_layers}, "
                f"rope_dims={self.rope_dims}; re-run profile-bias profile"
            )
        # a killed writer may leave a torn last sample: count a sample only if every row of it exists
        s = min(smp[name].shape[0] for name in _SAMPLE_FIELDS)
        t_avail = min(tok[name].shape[0] for name in ("attn", "row", "col", "position"))
        n_visual = smp["n_visual"][:s].astype(np.int32)  # (S,)
        offsets = smp["offset"][:s].astype(np.int64)  # (S,)
        while s > 0 and offsets[s - 1] + n_visual[s - 1] > t_avail:
            s -= 1
        n_visual, offsets = n_visual[:s], offsets[:s]
        expected = np.concatenate([[0], np.cumsum(n_visual, dtype=np.int64)[:-1]]) if s else np.zeros(0, np.int64)
        if not np.array_equal(offsets, expected):
            raise SchemaError(f"{where}: /samples/offset is not the running sum of n_visual; the file is damaged")
        self.n_samples: int = int(s)
        self.n_tokens: int = int(n_visual.sum()) if s else 0
        self.torn_rows: int = int(max(smp[name].shape[0] for name in _SAMPLE_FIELDS) - s) + int(t_avail - self.n_tokens)
        if self.torn_rows:
            warnings.warn(
                f"{where}: ignoring {self.torn_rows} row(s) of an interrupted write after the last complete sample",
                RuntimeWarning,
                stacklevel=3,
            )
        self.n_visual: np.ndarray = n_visual  # (S,) int32
        self.offsets: np.ndarray = offsets  # (S,) int64
        self.grids: np.ndarray = smp["grid"][:s].astype(np.int32)  # (S, 2) int32
        self.visual_start: np.ndarray = smp["visual_start"][:s].astype(np.int32)  # (S,) int32
        self.seq_len: np.ndarray = smp["seq_len"][:s].astype(np.int32)  # (S,) int32
        self.sample_ids: list[str] = list(smp["id"].asstr()[:s])
        self.sources: list[str] = list(smp["source"].asstr()[:s])
        self.questions: list[str] = list(smp["question"].asstr()[:s])
        self.answers: list[str] = list(smp["answer"].asstr()[:s])
        sk = f["skipped"]
        k = min(sk[name].shape[0] for name in _SKIP_FIELDS)
        self._skipped = list(
            zip(sk["id"].asstr()[:k], sk["source"].asstr()[:k], sk["reason"].asstr()[:k], strict=True)
        )
        self._cache: dict[str, np.ndarray] = {}

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
        return self._file["tokens/attn"][: self.n_tokens, li]  # (T,) float32

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
        return self._file["tokens/attn"][: self.n_tokens]  # (T, L) float32

    def _sample_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise PosbiasError(f"sample index {i!r} must be an int (store {self.path} has {self.n_samples} samples)")
        ii = int(i) + (self.n_samples if int(i) < 0 else 0)
        if not 0 <= ii < self.n_samples:
            raise PosbiasError(f"sample index {i} is out of range for store {self.path} with {self.n_samples} samples")
        return ii

    def sample_attn(self, i: int) -> np.ndarray:
        """(V_i, L) float32 attention of sample ``i``."""
        ii = self._sample_index(i)
        lo = int(self.offsets[ii])
        return self._file["tokens/attn"][lo : lo + int(self.n_visual[ii])]  # (V_i, L) float32

    def sample_slice(self, i: int) -> slice:
        """Token rows of sample ``i`` in the (T, ...) arrays."""
        ii = self._sample_index(i)
        lo = int(self.offsets[ii])
        return slice(lo, lo + int(self.n_visual[ii]))

    # -- token tables

    def _tokens(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._file[f"tokens/{name}"][: self.n_tokens]
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

    def token_sample(self) -> np.ndarray:
        """(T,) int64 index of the sample each token belongs to."""
        return np.repeat(np.arange(self.n_samples, dtype=np.int64), self.n_visual)  # (T,)

    def token_index(self) -> np.ndarray:
        """(T,) int64 raster index ``row * grid_cols + col`` of each token within its sample's grid.

        For one image laid out in raster order (LLaVA's 24x24 grid, Qwen2.5-VL's merged grid) this is
        0..V-1 per sample, PoRe's index ``i``.
        """
        grid_cols = np.repeat(self.grids[:, 1].astype(np.int64), self.n_visual)  # (T,)
        return self.rows.astype(np.int64) * grid_cols + self.cols.astype(np.int64)  # (T,)

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
        """(S,) bool, True for samples whose attention has a NaN or inf anywhere (reads all of /tokens/attn
        in row blocks)."""
        bad_tok = np.zeros(self.n_tokens, dtype=bool)  # (T,)
        ds = self._file["tokens/attn"]
        step = _ROW_CHUNK * 16
        for lo in range(0, self.n_tokens, step):
            hi = min(lo + step, self.n_tokens)
            bad_tok[lo:hi] = ~np.isfinite(ds[lo:hi]).all(axis=1)
        if self.n_samples == 0:
            return np.zeros(0, dtype=bool)
        return np.logical_or.reduceat(bad_tok, self.offsets) if self.n_tokens else np.zeros(self.n_samples, bool)

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        return (
            f"ProfileStore({str(self.path)!r}, samples={self.n_samples}, tokens={self.n_tokens}, "
            f"layers={self.n_layers}, rope_dims={self.rope_dims}, skipped={len(self._skipped)})"
        )
