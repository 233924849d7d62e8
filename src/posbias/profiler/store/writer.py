"""Writing a store crash-safely: :class:`ProfileStoreWriter` (segments, lock, resume, compaction)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posbias.atomic import atomic_path, sweep_stale_temps
from posbias.errors import PosbiasError
from posbias.models.base import VisualLayout
from posbias.profiler.store.format import (
    parts_dir,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    store_exists,
    _CALLER_REQUIRED,
    _check_extra_array,
    _check_tiles,
    _encode_attr,
    _IDENTITY_ATTRS,
    _LOCK_NAME,
    _NAME_RE,
    _package_version,
    _posbias_version,
    _SAMPLE_FIELDS,
    _SAMPLE_SPEC,
    _Schema,
    _SEG_RE,
    _STR,
    _STRING_SAMPLE_FIELDS,
    _to_python,
    _TOKEN_DTYPES,
    _TOKEN_FIELDS,
    _WRITER_ONLY,
)
from posbias.profiler.store.reader import ProfileStore
from posbias.profiler.store.compact import (
    _expected_bytes,
    _write_compact,
)

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
