"""Helpers shared by the benchmark sources: image decoding and row access to parquet files.

Nothing here downloads anything; every reader works on local copies of the benchmarks.
"""

from __future__ import annotations

import io
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from posbias.data.base import BadSample, SampleSource
from posbias.errors import PosbiasError

__all__ = [
    "IMAGE_SUFFIXES",
    "open_image",
    "to_rgb",
    "PIXEL_BUDGET",
    "MAX_DECODE_PIXELS",
    "find_parquet_files",
    "ParquetRows",
    "one_line",
    "split_spec",
    "RecordSource",
    "note",
    "drop_repeats",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def note(message: str) -> None:
    """One line for the user about what a reader did with the data (stderr, so stdout stays a report)."""
    print(f"note: {one_line(message, 400)}", file=sys.stderr, flush=True)


def drop_repeats(records: list[Any], where: list[str], same: Any, label: str) -> list[Any]:
    """``records`` without later records whose key an earlier one has (the first copy is kept).

    Real downloads reach the same rows through mirrored folders (lmms-lab/POPE holds ``data/`` and
    ``Full/``): identical records are read once and one line says so. A later record with the key of an
    earlier one but other content (``same(a, b)`` false) is dropped too, and counted separately.
    ``where[i]`` names the file or folder of record i, for that line.
    """
    first: dict[str, int] = {}
    kept: list[Any] = []
    repeats: dict[tuple[str, str], int] = {}
    conflicts = 0
    for i, rec in enumerate(records):
        j = first.get(rec.key)
        if j is None:
            first[rec.key] = i
            kept.append(rec)
            continue
        if same(records[j], rec):
            pair = (where[i], where[j])
            repeats[pair] = repeats.get(pair, 0) + 1
        else:
            conflicts += 1
    if repeats:
        parts = ", ".join(f"{n} in {a} repeat {b}" for (a, b), n in sorted(repeats.items()))
        note(f"{label}: {sum(repeats.values())} record(s) are copies of earlier ones ({parts}); each is read once")
    if conflicts:
        note(f"{label}: {conflicts} record(s) reuse the id of an earlier record with another question or answer; "
             "the first is kept")
    return kept


def split_spec(arg: str) -> tuple[str, str | None]:
    """``PATH[:EXTRA]`` of a ``--data`` argument: ``(arg, None)`` when ``arg`` names an existing path or holds
    no ``:``, else the parts around the last ``:``."""
    if not Path(arg).exists() and ":" in arg:
        path, _, extra = arg.rpartition(":")
        return path, extra
    return arg, None


#: images are scaled down (aspect ratio kept) to at most this many pixels before the model sees them: a
#: 24 MP photo or a scan is profiled, not refused, and no adapter resizes more than that (docs/reliability.md)
PIXEL_BUDGET = 4096 * 4096
#: images with more pixels than this are not decoded at all (decompression bombs: a small file that would
#: expand to gigabytes); the sample is skipped with the reason. JPEGs are decoded at a reduced scale first.
MAX_DECODE_PIXELS = 12_000 * 12_000


def to_rgb(img: Any) -> Any:
    """An 8-bit RGB copy of a PIL image of any mode, values mapped rather than clipped.

    16-bit and 32-bit integer images are scaled by their bit depth (a 16-bit PNG keeps its contrast
    instead of turning white), float images from [0, 1] (or their own range when outside it), images
    with transparency (RGBA, LA, PA, palette with a transparent colour) are composited on white, CMYK
    and YCbCr go through PIL's conversion.
    """
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode in ("RGB",):
        return img.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        finite = arr[np.isfinite(arr)]
        if mode.startswith("I;16"):
            scaled = arr / 257.0
        elif mode == "F" and finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            scaled = arr * 255.0
        elif mode == "I" and finite.size and finite.min() >= 0 and finite.max() <= 255:
            scaled = arr
        elif mode == "I" and finite.size and finite.min() >= 0 and finite.max() <= 65535:
            scaled = arr / 257.0
        else:  # any other range: stretch it
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        grey = np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).round().astype(np.uint8)  # (H, W)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _cap_pixels(img: Any, budget: int) -> Any:
    """``img`` scaled down (aspect kept) to at most ``budget`` pixels."""
    from PIL import Image

    w, h = img.size
    if w * h <= budget:
        return img
    scale = (budget / float(w * h)) ** 0.5
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS if hasattr(Image, "Resampling") else Image.LANCZOS)


def open_image(source: bytes | str | os.PathLike[str], sample_id: str) -> Any:
    """Decode an image (bytes or a file) to an 8-bit RGB PIL image within :data:`PIXEL_BUDGET` pixels.

    Anything that cannot be used (missing, empty, truncated or undecodable file, a decompression bomb
    over :data:`MAX_DECODE_PIXELS`) raises :class:`BadSample` with the reason; the run records the skip
    and goes on.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise BadSample(sample_id, "image bytes are empty")
            fh: Any = io.BytesIO(bytes(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise BadSample(sample_id, f"image file {path} is missing")
            fh = path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limits below decide
            img = Image.open(fh)
            w, h = img.size
            if img.format == "JPEG" and w * h > PIXEL_BUDGET:
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)) if w * h > MAX_DECODE_PIXELS else
                          (int(w * (PIXEL_BUDGET / (w * h)) ** 0.5), int(h * (PIXEL_BUDGET / (w * h)) ** 0.5)))
                w, h = img.size
            if w * h > MAX_DECODE_PIXELS:
                raise BadSample(sample_id, f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the decode limit "
                                f"of {MAX_DECODE_PIXELS / 1e6:.0f} MP (decompression bomb?); downscale the file")
            img.load()
        return _cap_pixels(to_rgb(img), PIXEL_BUDGET)
    except BadSample:
        raise
    except Image.DecompressionBombError as exc:
        raise BadSample(sample_id, one_line(f"image too large: decompression bomb ({exc})")) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise BadSample(sample_id, one_line(f"cannot decode image: {type(exc).__name__}: {exc}")) from exc


def find_parquet_files(path: Path) -> list[Path]:
    """``path`` itself if it is a .parquet file, else every .parquet file below the folder, sorted."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    if path.is_dir():
        return sorted(p for p in path.rglob("*.parquet") if p.is_file())
    return []


class ParquetRows:
    """Rows of one or more parquet files: small columns in memory, the image column read on demand.

    The image column is read one row group at a time (the smallest unit parquet can read) and the two
    most recent row groups are cached, so random access costs one row-group read per miss.

    Parameters
    ----------
    files : list of Path
        Parquet files, in order.
    columns : list of str
        Small columns to load (missing optional ones are filled with None).
    required : list of str
        Columns every file must have (the image column included).
    image_column : str
        Column holding the image (struct {bytes, path} or binary).
    layout : str
        Name of the layout, for messages.
    """

    def __init__(self, files: list[Path], columns: list[str], required: list[str], image_column: str, layout: str) -> None:
        import pyarrow.parquet as pq

        self.files = files
        self.image_column = image_column
        self.columns: dict[str, list[Any]] = {c: [] for c in columns}
        self._where: list[tuple[int, int, int]] = []  # global row -> (file, row group, row in group)
        self._handles: dict[int, Any] = {}
        self._cache: OrderedDict[tuple[int, int], list[Any]] = OrderedDict()
        for fi, f in enumerate(files):
            try:
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
            except Exception as exc:  # pyarrow raises several types for damaged files
                raise PosbiasError(
                    f"{f} is not a readable parquet file ({one_line(str(exc), 120)}); re-download it or remove it from the folder"
                ) from exc
            missing = [c for c in required if c not in names]
            if missing:
                raise PosbiasError(
                    f"{f} lacks columns {missing} of the {layout} layout (has {sorted(names)}); pass a copy of that layout"
                )
            present = [c for c in columns if c in names]
            try:
                table = pf.read(columns=present)
            except Exception as exc:
                raise PosbiasError(f"{f}: cannot read columns {present} ({one_line(str(exc), 120)}); re-download the file") from exc
            n = table.num_rows
            for c in columns:
                self.columns[c].extend(table.column(c).to_pylist() if c in present else [None] * n)
            for rg in range(pf.metadata.num_row_groups):
                k = pf.metadata.row_group(rg).num_rows
                self._where.extend((fi, rg, r) for r in range(k))
        if len(self._where) != sum(1 for _ in self.columns[columns[0]]):
            raise PosbiasError(f"{files[0]}: row-group metadata disagrees with the data; re-download the files")

    def __len__(self) -> int:
        return len(self._where)

    def file_of(self, row: int) -> int:
        """Index in ``files`` of the file holding ``row``."""
        return self._where[row][0]

    def image(self, row: int) -> Any:
        """The raw image cell of ``row``: bytes, a dict {bytes, path}, or None."""
        import pyarrow.parquet as pq

        fi, rg, r = self._where[row]
        key = (fi, rg)
        if key not in self._cache:
            if fi not in self._handles:
                self._handles[fi] = pq.ParquetFile(self.files[fi])
            self._cache[key] = self._handles[fi].read_row_group(rg, columns=[self.image_column]).column(0).to_pylist()
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key][r]

    def image_bytes(self, row: int, sample_id: str, base: Path | None = None) -> bytes | Path:
        """Bytes of the image of ``row`` (or the file its ``path`` names); :class:`BadSample` if absent."""
        cell = self.image(row)
        if isinstance(cell, dict):
            data = cell.get("bytes")
            if data:
                return bytes(data)
            p = cell.get("path")
            if p and base is not None and (base / p).is_file():
                return base / p
            raise BadSample(sample_id, "parquet row has no image bytes")
        if isinstance(cell, (bytes, bytearray)) and cell:
            return bytes(cell)
        raise BadSample(sample_id, "parquet row has no image")


class RecordSource(SampleSource):
    """Base of the sources that index their samples up front as records (``self._records``, each with a
    ``key``; optionally ``bad``, the reason a record cannot be used, and ``row``/``image``, where its image
    is: a row of ``self._rows`` or a file)."""

    _records: list[Any]
    _rows: ParquetRows | None = None
    path: Path

    def _open_path(self, path: str | Path, name: str, benchmark: str, layouts: tuple[str, ...]) -> list[Path]:
        """Set ``name``, ``path`` (must exist) and ``_rows``; the parquet files at ``path`` (empty when none)."""
        self.name = name
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise PosbiasError(
                f"data source {name}:{path}: no such file or folder; pass a local copy of {benchmark} ({'; or '.join(layouts)})"
            )
        self._rows = None
        return find_parquet_files(self.path)

    def __len__(self) -> int:
        return len(self._records)

    def key(self, index: int) -> str:
        return self._records[index].key

    def _usable(self, index: int) -> tuple[Any, str]:
        """Record ``index`` and its sample id; :class:`BadSample` with the reason if it was indexed as bad."""
        rec = self._records[index]
        sid = f"{self.name}:{rec.key}"
        if getattr(rec, "bad", None):
            raise BadSample(sid, rec.bad)
        return rec, sid

    def _record_image(self, rec: Any, sid: str) -> Any:
        """RGB image of ``rec``: from its parquet row (``rec.row``) or its file (``rec.image``)."""
        if rec.row is not None:
            assert self._rows is not None
            return open_image(self._rows.image_bytes(rec.row, sid, base=self.path if self.path.is_dir() else self.path.parent), sid)
        assert rec.image is not None
        return open_image(rec.image, sid)
