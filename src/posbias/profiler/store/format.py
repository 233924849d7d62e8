"""The store's format: schema constants, the datasets of one sample, attribute encoding, file and
segment paths, and the validation of a layout's tiles (docs/store.md is the normative text)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from posbias.atomic import sweep_stale_temps
from posbias.errors import PosbiasError
from posbias.models.base import VisualLayout

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



def _reencode(key: str, value: Any) -> Any:
    """A root attribute read back from JSON (a segment) as the HDF5 attribute the writer stores."""
    if key in ("json_attrs", "static_datasets") or (
        isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    ):
        return np.array(list(value), dtype=_STR)
    if isinstance(value, int) and not isinstance(value, bool):
        return np.int64(value)
    return value
