"""Reading a store: :class:`ProfileStore` over the compacted HDF5 file and the committed segments."""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from posbias.errors import PosbiasError, SchemaError
from posbias.profiler.store.format import (
    READABLE_VERSIONS,
    REQUIRED_ATTRS,
    resolve_store_path,
    SCHEMA_NAME,
    _CACHE_BYTES,
    _decode_attrs,
    _looks_like_hdf5,
    _reencode,
    _ROW_CHUNK,
    _SAMPLE_FIELDS,
    _SAMPLE_SPEC,
    _Schema,
    _segments,
    _SKIP_FIELDS,
    _STRING_SAMPLE_FIELDS,
    _to_python,
    _TOKEN_DTYPES,
    _TOKEN_FIELDS,
    _V2_DATASETS,
)

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
        (S, 2) int32 (rows, cols) of each sample's first tile (its only grid for one-tile layouts).
    n_tiles : np.ndarray
        (S,) int32 tiles (sub-images) per sample (1 for a version-1 store).
    tile_offsets : np.ndarray
        (S,) int64 first row of each sample in ``tile_grids``.
    tile_grids : np.ndarray
        (sum n_tiles, 2) int32 (rows, cols) of every tile, sample after sample (:meth:`sample_tiles`).
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
        """(T,) int32 row of every token in its tile's grid."""
        return self._tokens("row")

    @property
    def cols(self) -> np.ndarray:
        """(T,) int32 column of every token in its tile's grid (-1 MAY mark a separator)."""
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
