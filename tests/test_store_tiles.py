"""Multi-tile layouts in the profile store (schema_version 2): per-token tile index and separator flag,
per-sample tile grids, written through the real writer and read back from segments, compacted files,
resumed, merged and rewritten stores; version-1 stores read as one tile without separators."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from posbias.errors import PosbiasError
from posbias.models.base import VisualLayout
from posbias.profiler.store import (
    SCHEMA_VERSION,
    ProfileStore,
    ProfileStoreWriter,
    add_sample_data,
    merge_stores,
    parts_dir,
)

L = 4
ATTRS = {"model_id": "tiny/next", "model_fingerprint": "sha256:00112233445566ff", "adapter": "llava_next", "seed": 1}


def tiled_layout(tiles: list[tuple[int, int]], *, newline_from: int = 1, start: int = 5) -> VisualLayout:
    """LLaVA-NeXT-like layout: tile 0 without separators, every later tile with one newline token after each
    of its rows (row = the row it ends, col = -1)."""
    rows, cols, tile, sep = [], [], [], []
    for t, (r, c) in enumerate(tiles):
        for i in range(r):
            for j in range(c):
                rows.append(i), cols.append(j), tile.append(t), sep.append(False)
            if t >= newline_from:
                rows.append(i), cols.append(-1), tile.append(t), sep.append(True)
    v = len(rows)
    return VisualLayout(
        visual_index=start + np.arange(v, dtype=np.int64),
        rows=np.array(rows, np.int64),
        cols=np.array(cols, np.int64),
        grid=tiles[0],
        position_ids=(start + np.arange(v, dtype=np.int64))[:, None],
        seq_len=start + v + 4,
        tile=np.array(tile, np.int64),
        tiles=tuple(tiles),
        separator=np.array(sep, bool),
    )


SAMPLES = {
    "embedded:a": [(3, 3), (2, 4), (3, 2)],
    "embedded:b": [(2, 2)],
    "embedded:c": [(3, 3), (4, 1), (1, 5), (2, 2)],
}


def attn(v: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((v, L), dtype=np.float32)  # (V, L)


def write(path: Path, ids: list[str], **kw: object) -> ProfileStoreWriter:
    w = ProfileStoreWriter(path, n_layers=L, rope_dims=1, attrs=ATTRS, **kw)
    for sid in ids:
        lay = tiled_layout(SAMPLES[sid])
        w.append(sample_id=sid, source="embedded", question="q?", answer="yes", layout=lay,
                 attn=attn(lay.n_visual, len(sid) + ord(sid[-1])), token_data={"vi": np.arange(lay.n_visual, dtype=np.float32)})
    return w


def check(st: ProfileStore, ids: list[str]) -> None:
    """Every tile field of ``st`` equals the layouts of ``ids``, in that order."""
    assert st.sample_ids == ids
    lays = [tiled_layout(SAMPLES[sid]) for sid in ids]
    np.testing.assert_array_equal(st.n_tiles, [len(SAMPLES[sid]) for sid in ids])
    np.testing.assert_array_equal(st.tile_grids, np.concatenate([SAMPLES[sid] for sid in ids]))
    np.testing.assert_array_equal(st.grids, [SAMPLES[sid][0] for sid in ids])
    np.testing.assert_array_equal(st.token_tile, np.concatenate([lay.tile for lay in lays]))
    np.testing.assert_array_equal(st.token_separator, np.concatenate([lay.separator for lay in lays]))
    np.testing.assert_array_equal(st.rows, np.concatenate([lay.rows for lay in lays]))
    np.testing.assert_array_equal(st.cols, np.concatenate([lay.cols for lay in lays]))
    assert st.token_separator.dtype == bool and st.token_tile.dtype == np.int32
    for i, (sid, lay) in enumerate(zip(ids, lays, strict=True)):
        np.testing.assert_array_equal(st.sample_tiles(i), SAMPLES[sid])
        np.testing.assert_array_equal(st.sample_token_tile(i), lay.tile)
        np.testing.assert_array_equal(st.sample_token_separator(i), lay.separator)
        np.testing.assert_array_equal(st.sample_attn(i), attn(lay.n_visual, len(sid) + ord(sid[-1])))
        # raster index within the token's own tile; separators -1
        tile_cols = np.asarray(SAMPLES[sid])[lay.tile, 1]
        want = np.where(lay.separator, -1, lay.rows * tile_cols + lay.cols)
        np.testing.assert_array_equal(st.token_index()[st.sample_slice(i)], want)
    assert st.multi_tile == any(len(SAMPLES[s]) > 1 for s in ids)


def test_round_trip_segments_and_compacted(tmp_path: Path) -> None:
    path = tmp_path / "profile.h5"
    ids = ["embedded:a", "embedded:b", "embedded:c"]
    w = write(path, ids)
    snapshot = tmp_path / "killed" / "profile.h5"  # what a SIGKILL now would leave: base-less segments
    shutil.copytree(parts_dir(path), parts_dir(snapshot))
    w.close()
    with ProfileStore(snapshot) as st:
        assert st.pending_segments == 4 and not st.complete
        check(st, ids)
    with ProfileStore(path) as st:
        assert st.pending_segments == 0 and st.complete
        check(st, ids)
    with h5py.File(path, "r") as f:  # the documented plain-HDF5 layout
        assert int(f.attrs["schema_version"]) == SCHEMA_VERSION == 2
        np.testing.assert_array_equal(f["samples/n_tiles"][:], [3, 1, 4])
        assert f["tiles/grid"].shape == (8, 2) and f["tokens/separator"].dtype == bool
        assert f["tokens/tile"].shape == f["tokens/attn"].shape[:1]


def test_resume_merge_and_rewrite_keep_tiles(tmp_path: Path) -> None:
    path = tmp_path / "a" / "profile.h5"
    write(path, ["embedded:a"]).close(complete=False)
    w = write(path, ["embedded:c"], resume=True)
    with ProfileStore(path) as st:  # compacted base + a new segment
        assert st.pending_segments >= 1
        check(st, ["embedded:a", "embedded:c"])
    w.close()
    other = tmp_path / "b.h5"
    write(other, ["embedded:b"]).close()
    out = merge_stores([path, other], tmp_path / "m.h5", order=["embedded:c", "embedded:b", "embedded:a"])
    with ProfileStore(out) as st:
        check(st, ["embedded:c", "embedded:b", "embedded:a"])
    add_sample_data(out, "score", ["embedded:b"], np.array([2.5]))
    with ProfileStore(out) as st:
        check(st, ["embedded:c", "embedded:b", "embedded:a"])
        np.testing.assert_array_equal(st.sample_data("score"), [np.nan, 2.5, np.nan])


def _downgrade_to_v1(path: Path) -> None:
    """Rewrite a one-tile store as the version-1 writer left it: no tile datasets, schema_version 1."""
    with h5py.File(path, "r+") as f:
        for name in ("samples/n_tiles", "tokens/tile", "tokens/separator", "tiles"):
            del f[name]
        f.attrs["schema_version"] = 1


def test_version_1_store_reads_as_one_tile_and_upgrades(tmp_path: Path) -> None:
    old = tmp_path / "old.h5"
    write(old, ["embedded:b"]).close()
    _downgrade_to_v1(old)
    with ProfileStore(old) as st:
        assert st.attrs["schema_version"] == 1
        check(st, ["embedded:b"])  # one tile = grid, tile 0, no separators
        np.testing.assert_array_equal(st.token_index(), np.arange(4))
    # resuming a version-1 store appends version-2 segments; compaction writes version 2
    w = write(old, ["embedded:a"], resume=True)
    with ProfileStore(old) as st:
        check(st, ["embedded:b", "embedded:a"])
    w.close()
    with ProfileStore(old) as st:
        assert st.attrs["schema_version"] == SCHEMA_VERSION
        check(st, ["embedded:b", "embedded:a"])
    # merging a version-1 store with a multi-tile one
    old2 = tmp_path / "old2.h5"
    write(old2, ["embedded:b"]).close()
    _downgrade_to_v1(old2)
    new = tmp_path / "new.h5"
    write(new, ["embedded:c"]).close()
    with ProfileStore(merge_stores([old2, new], tmp_path / "m.h5")) as st:
        check(st, ["embedded:b", "embedded:c"])


def test_baseline_store_of_version_1(tmp_path: Path) -> None:
    """A store written by posbias before tiles existed (if this checkout has one) opens as one tile."""
    base = Path("/work/wt/baseline/demo-llava-n32.h5")
    if not base.is_file():
        pytest.skip("no version-1 store written by an earlier posbias on this machine")
    with ProfileStore(base) as st:
        assert st.attrs["schema_version"] == 1 and not st.multi_tile
        np.testing.assert_array_equal(st.tile_grids, st.grids)
        assert not st.token_tile.any() and not st.token_separator.any()
        np.testing.assert_array_equal(st.token_index(), np.tile(np.arange(576), st.n_samples))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tile": np.full(13, 3)}, "tile indices must ascend from 0 to at most 1"),
        ({"tile": np.r_[np.zeros(12, int), 1][::-1].copy()}, "tile indices must ascend"),
        ({"grid": (2, 3)}, r"layout grid \(2, 3\) differs from the first tile's grid \(3, 3\)"),
        ({"tiles": ((3, 3), (1, 1))}, r"falls outside its tile 1 grid \(1, 1\)"),
        ({"separator": np.zeros(13, np.int8)}, "layout separator has shape .* expected \\(13,\\) bool"),
        ({"tiles": ((3, 3), (0, 2))}, "at least one \\(rows, cols\\) of positive ints"),
    ],
)
def test_writer_refuses_bad_tiles(tmp_path: Path, change: dict, message: str) -> None:
    lay = tiled_layout([(3, 3), (2, 1)])  # 9 + 2 grid tokens + 2 newlines = 13
    fields = {k: getattr(lay, k) for k in ("visual_index", "rows", "cols", "grid", "position_ids", "seq_len", "tile", "tiles", "separator")}
    bad = VisualLayout(**{**fields, **change})
    with ProfileStoreWriter(tmp_path / "p.h5", n_layers=L, rope_dims=1, attrs=ATTRS) as w:
        with pytest.raises(PosbiasError, match=message) as ei:
            w.append(sample_id="embedded:x", source="embedded", question="q", answer=None, layout=bad, attn=attn(13, 0))
        assert "\n" not in str(ei.value)
        w.append(sample_id="embedded:y", source="embedded", question="q", answer=None, layout=lay, attn=attn(13, 0))
    with ProfileStore(tmp_path / "p.h5") as st:
        assert st.sample_ids == ["embedded:y"]
