"""Tests of the HDF5 profile store (posbias.profiler.store) on real h5py files."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from posbias.errors import PosbiasError, SchemaError
from posbias.models.base import VisualLayout
from posbias.profiler.store import SCHEMA_NAME, SCHEMA_VERSION, ProfileStore, ProfileStoreWriter

L = 5  # decoder layers of the test stores
P = 3  # M-RoPE


def make_layout(grid: tuple[int, int], start: int = 7, tail: int = 9, p: int = P) -> VisualLayout:
    """Qwen2.5-VL-like layout: one image in raster order at ``start``, M-RoPE (t, h, w) positions."""
    r, c = grid
    v = r * c
    rows, cols = np.divmod(np.arange(v, dtype=np.int64), c)  # (V,), (V,)
    if p == 3:
        pos = np.stack([np.full(v, start), start + rows, start + cols], axis=1)  # (V, 3)
    else:
        pos = (start + np.arange(v))[:, None]  # (V, 1)
    return VisualLayout(
        visual_index=start + np.arange(v, dtype=np.int64),
        rows=rows,
        cols=cols,
        grid=grid,
        position_ids=pos.astype(np.int64),
        seq_len=start + v + tail,
    )


def base_attrs(**extra: object) -> dict:
    return {
        "model_id": "tiny/qwen",
        "model_fingerprint": "sha256:0123456789abcdef",
        "adapter": "qwen2_5_vl",
        "seed": 3,
        **extra,
    }


def attn_for(v: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((v, L), dtype=np.float32)  # (V, L) float32


GRIDS = [(4, 6), (3, 5), (8, 8)]


@pytest.fixture()
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "profile.h5"  # parent folder created by the writer
    with ProfileStoreWriter(
        path, n_layers=L, rope_dims=P, attrs=base_attrs(n_requested=5, sources=["embedded", "mme"], quota={"mme": 2})
    ) as w:
        w.append(sample_id="embedded:a", source="embedded", question="Is there a cat?", answer="yes",
                 layout=make_layout(GRIDS[0]), attn=attn_for(24, 0))
        w.skip(sample_id="embedded:broken", source="embedded", reason="cannot read image: truncated JPEG")
        w.append(sample_id="mme:b", source="mme", question="Qué color — 猫?", answer=None,
                 layout=make_layout(GRIDS[1], start=3), attn=attn_for(15, 1))
        w.append(sample_id="embedded:c", source="embedded", question="What is this?", answer="a rocket",
                 layout=make_layout(GRIDS[2], start=11), attn=attn_for(64, 2))
        assert (w.n_samples, w.n_skipped, w.n_tokens) == (3, 1, 24 + 15 + 64)
    return path


def test_round_trip_dynamic_grids_mrope(store_path: Path) -> None:
    with ProfileStore(store_path) as st:
        assert (st.n_samples, st.n_layers, st.rope_dims, st.n_tokens) == (3, L, P, 103)
        assert len(st) == 3 and st.complete
        assert st.sample_ids == ["embedded:a", "mme:b", "embedded:c"]
        assert st.sources == ["embedded", "mme", "embedded"]
        assert st.questions[1] == "Qué color — 猫?"
        assert st.answers == ["yes", "", "a rocket"]
        np.testing.assert_array_equal(st.n_visual, [24, 15, 64])
        np.testing.assert_array_equal(st.offsets, [0, 24, 39])
        np.testing.assert_array_equal(st.grids, GRIDS)
        np.testing.assert_array_equal(st.visual_start, [7, 3, 11])
        np.testing.assert_array_equal(st.seq_len, [7 + 24 + 9, 3 + 15 + 9, 11 + 64 + 9])
        for i, v in enumerate([24, 15, 64]):
            np.testing.assert_array_equal(st.sample_attn(i), attn_for(v, i))
        full = np.concatenate([attn_for(v, i) for i, v in enumerate([24, 15, 64])])  # (T, L)
        np.testing.assert_array_equal(st.layer(2), full[:, 2])
        np.testing.assert_array_equal(st.layer(-1), full[:, L - 1])
        np.testing.assert_array_equal(st.layers([4, 0, 4]), full[:, [4, 0, 4]])
        np.testing.assert_array_equal(st.all_layers(), full)
        assert st.layer(0).dtype == np.float32 and st.layers([1, 2]).shape == (103, 2)
        # grid coordinates, raster index and M-RoPE positions per token
        np.testing.assert_array_equal(st.token_sample(), np.repeat([0, 1, 2], [24, 15, 64]))
        np.testing.assert_array_equal(st.token_index(), np.concatenate([np.arange(24), np.arange(15), np.arange(64)]))
        sl = st.sample_slice(1)
        np.testing.assert_array_equal(st.rows[sl], np.arange(15) // 5)
        np.testing.assert_array_equal(st.cols[sl], np.arange(15) % 5)
        assert st.positions.shape == (103, 3) and st.positions.dtype == np.int64
        np.testing.assert_array_equal(st.positions[sl], make_layout(GRIDS[1], start=3).position_ids)
        assert st.skipped() == [("embedded:broken", "embedded", "cannot read image: truncated JPEG")]
        assert st.sources_count() == {"embedded": 2, "mme": 1}
        # root attributes: writer-set, caller-set, JSON-encoded
        a = st.attrs
        assert a["schema"] == SCHEMA_NAME and a["schema_version"] == SCHEMA_VERSION
        assert a["n_layers"] == L and a["rope_dims"] == P and a["seed"] == 3
        assert a["model_revision"] == "" and a["adapter"] == "qwen2_5_vl"
        assert a["n_requested"] == 5 and a["sources"] == ["embedded", "mme"] and a["quota"] == {"mme": 2}
        assert a["torch_version"] and a["transformers_version"] and a["posbias_version"]
        created = dt.datetime.fromisoformat(a["created"].replace("Z", "+00:00"))
        assert created.tzinfo is not None and abs(dt.datetime.now(dt.timezone.utc) - created).total_seconds() < 600
        assert not st.non_finite_samples().any()


def test_plain_h5py_reads_the_documented_layout(store_path: Path) -> None:
    with h5py.File(store_path, "r") as f:
        assert f.attrs["schema"] == "posbias.profile"
        assert f["tokens/attn"].shape == (103, L) and f["tokens/attn"].dtype == np.float32
        assert f["tokens/position"].shape == (103, P) and f["tokens/position"].dtype == np.int64
        assert f["tokens/row"].dtype == np.int32 and f["samples/offset"].dtype == np.int64
        assert f["samples/grid"].shape == (3, 2) and f["samples/n_visual"].dtype == np.int32
        assert h5py.check_string_dtype(f["samples/id"].dtype).encoding == "utf-8"
        assert list(f["samples/id"].asstr()[:]) == ["embedded:a", "mme:b", "embedded:c"]
        attn = f["tokens/attn"]
        assert attn.maxshape == (None, L) and attn.chunks is not None and attn.compression == "gzip"


def test_non_finite_attention_is_stored_as_given(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    bad = attn_for(12, 5)
    bad[3, 1] = np.nan
    bad[0, 4] = np.inf
    with ProfileStoreWriter(path, n_layers=L, rope_dims=1, attrs=base_attrs()) as w:
        w.append(sample_id="s:0", source="s", question="q", answer=None, layout=make_layout((3, 4), p=1),
                 attn=attn_for(12, 4))
        w.append(sample_id="s:1", source="s", question="q", answer=None, layout=make_layout((3, 4), p=1), attn=bad)
    with ProfileStore(path) as st:
        got = st.sample_attn(1)
        assert np.isnan(got[3, 1]) and np.isposinf(got[0, 4])
        np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(bad))
        np.testing.assert_array_equal(st.non_finite_samples(), [False, True])
        assert st.positions.shape == (24, 1)


def test_invalid_appends_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    lay = make_layout((2, 3))
    with ProfileStoreWriter(path, n_layers=L, rope_dims=P, attrs=base_attrs()) as w:
        w.append(sample_id="s:0", source="s", question="q", answer="a", layout=lay, attn=attn_for(6, 0))
        with pytest.raises(PosbiasError, match="duplicate sample id 's:0'"):
            w.append(sample_id="s:0", source="s", question="q", answer="a", layout=lay, attn=attn_for(6, 0))
        with pytest.raises(PosbiasError, match=r"expected \(V, L\) = \(6, 5\)"):
            w.append(sample_id="s:1", source="s", question="q", answer="a", layout=lay, attn=attn_for(7, 0))
        with pytest.raises(PosbiasError, match=r"expected \(V, L\)"):
            w.append(sample_id="s:1", source="s", question="q", answer="a", layout=lay,
                     attn=np.zeros((6, L + 1), np.float32))
        with pytest.raises(PosbiasError, match="dtype is float64; pass float32"):
            w.append(sample_id="s:1", source="s", question="q", answer="a", layout=lay,
                     attn=attn_for(6, 0).astype(np.float64))
        with pytest.raises(PosbiasError, match="position_ids has shape"):
            w.append(sample_id="s:1", source="s", question="q", answer="a", layout=make_layout((2, 3), p=1),
                     attn=attn_for(6, 0))
        with pytest.raises(PosbiasError, match="must be 's:<key>'"):
            w.append(sample_id="other:1", source="s", question="q", answer="a", layout=lay, attn=attn_for(6, 0))
        w.skip(sample_id="s:9", source="s", reason="empty question")
        with pytest.raises(PosbiasError, match="already recorded as skipped"):
            w.append(sample_id="s:9", source="s", question="q", answer="a", layout=lay, attn=attn_for(6, 0))
        with pytest.raises(PosbiasError, match="duplicate"):
            w.skip(sample_id="s:0", source="s", reason="x")
    with ProfileStore(path) as st:  # refused appends left nothing behind
        assert st.n_samples == 1 and st.n_tokens == 6 and st.skipped() == [("s:9", "s", "empty question")]


def test_missing_and_reserved_attrs(tmp_path: Path) -> None:
    with pytest.raises(PosbiasError, match=r"attrs lack \['model_fingerprint'"):
        ProfileStoreWriter(tmp_path / "a.h5", n_layers=2, rope_dims=1,
                           attrs={"model_id": "m", "adapter": "llava", "seed": 0})
    with pytest.raises(PosbiasError, match="set by the writer"):
        ProfileStoreWriter(tmp_path / "b.h5", n_layers=2, rope_dims=1, attrs=base_attrs(schema_version=9))
    with pytest.raises(PosbiasError, match="differs from n_layers=2"):
        ProfileStoreWriter(tmp_path / "c.h5", n_layers=2, rope_dims=1, attrs=base_attrs(n_layers=30))
    assert not any(tmp_path.iterdir())  # nothing created on refusal


def test_overwrite_refusal_and_overwrite(store_path: Path) -> None:
    before = store_path.read_bytes()
    with pytest.raises(PosbiasError, match="already exists; pass --overwrite or choose another --out") as ei:
        ProfileStoreWriter(store_path, n_layers=L, rope_dims=P, attrs=base_attrs())
    assert str(store_path) in str(ei.value)
    assert store_path.read_bytes() == before
    with ProfileStoreWriter(store_path, n_layers=L, rope_dims=1, attrs=base_attrs(), overwrite=True) as w:
        w.append(sample_id="s:0", source="s", question="q", answer=None, layout=make_layout((1, 2), p=1),
                 attn=attn_for(2, 0))
    with ProfileStore(store_path) as st:
        assert st.sample_ids == ["s:0"] and st.rope_dims == 1 and st.skipped() == []


def test_open_errors(tmp_path: Path, store_path: Path) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        ProfileStore(tmp_path / "nope.h5")
    text = tmp_path / "notes.h5"
    text.write_text("this is not hdf5\n")
    with pytest.raises(SchemaError, match=f"store {text} is not an HDF5 file"):
        ProfileStore(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(SchemaError, match="is not a posbias profile store"):
        ProfileStore(other)
    with h5py.File(store_path, "r+") as f:
        f.attrs["schema_version"] = 3
    with pytest.raises(SchemaError) as ei:
        ProfileStore(store_path)
    msg = str(ei.value)
    assert msg == (
        f"store {store_path} has schema_version 3; this posbias reads versions 1, 2: "
        "upgrade posbias or re-run profile-bias profile"
    )
    assert "\n" not in msg


def test_bad_indices(store_path: Path) -> None:
    with ProfileStore(store_path) as st:
        with pytest.raises(PosbiasError, match="layer 5 is out of range .* choose 0..4"):
            st.layer(5)
        with pytest.raises(PosbiasError, match="out of range"):
            st.sample_attn(3)


def test_exception_inside_writer_keeps_samples_marks_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    with pytest.raises(KeyboardInterrupt):
        with ProfileStoreWriter(path, n_layers=L, rope_dims=P, attrs=base_attrs()) as w:
            w.append(sample_id="s:0", source="s", question="q", answer=None, layout=make_layout((2, 2)),
                     attn=attn_for(4, 0))
            raise KeyboardInterrupt
    with ProfileStore(path) as st:
        assert st.sample_ids == ["s:0"] and not st.complete


_CHILD = textwrap.dedent(
    """
    import os, subprocess, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import attn_for, base_attrs, make_layout, L, P
    from posbias.profiler.store import ProfileStoreWriter

    path, mode = sys.argv[1], sys.argv[2]
    w = ProfileStoreWriter(path, n_layers=L, rope_dims=P, attrs=base_attrs())
    seen = []
    for i, grid in enumerate([(2, 3), (4, 4), (3, 1)]):
        lay = make_layout(grid)
        w.append(sample_id=f"s:{{i}}", source="s", question="q", answer=None, layout=lay,
                 attn=attn_for(lay.n_visual, i))
        if mode == "watch":  # a second process reads the store while this writer keeps it open
            code = ("import warnings; from posbias.profiler.store import ProfileStore; "
                    f"st = ProfileStore({{path!r}}, locking=False); print(st.n_samples, st.n_tokens, st.complete)")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            seen.append(out.stdout.strip())
    if mode == "watch":
        print("|".join(seen), flush=True)
    os._exit(0)  # killed: no close(), no atexit, no h5py cleanup
    """
)


def _run_child(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(Path(__file__).parent)))
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "p.h5"), mode],
        capture_output=True, text=True, timeout=120, check=True,
    )


def test_killed_writer_keeps_flushed_samples(tmp_path: Path) -> None:
    _run_child(tmp_path, "kill")
    with ProfileStore(tmp_path / "p.h5") as st:
        assert st.n_samples == 3 and not st.complete
        assert st.sample_ids == ["s:0", "s:1", "s:2"]
        np.testing.assert_array_equal(st.n_visual, [6, 16, 3])
        np.testing.assert_array_equal(st.sample_attn(1), attn_for(16, 1))
        np.testing.assert_array_equal(st.sample_attn(2), attn_for(3, 2))


def test_store_streams_readable_while_writer_open(tmp_path: Path) -> None:
    out = _run_child(tmp_path, "watch")
    assert out.stdout.strip() == "1 6 False|2 22 False|3 25 False"


def test_torn_tail_is_ignored_with_warning(store_path: Path) -> None:
    # simulate a write interrupted between the token rows and the sample row
    with h5py.File(store_path, "r+") as f:
        ds = f["tokens/attn"]
        ds.resize(ds.shape[0] + 10, axis=0)
        ds = f["samples/n_visual"]
        ds.resize(4, axis=0)
    with pytest.warns(RuntimeWarning, match="interrupted write"):
        st = ProfileStore(store_path)
    with st:
        assert st.n_samples == 3 and st.n_tokens == 103 and st.layer(0).shape == (103,)


def test_update_attrs_plain_and_json(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    with ProfileStoreWriter(path, n_layers=L, rope_dims=P, attrs=base_attrs(note={"a": 1})) as w:
        w.update_attrs({"note": "plain now", "planned": 12, "per_source": {"embedded": 12}, "tags": ["x", "y"]})
        with pytest.raises(PosbiasError, match="set by the writer"):
            w.update_attrs({"n_layers": 3})
        with pytest.raises(PosbiasError, match="not JSON-serialisable"):
            w.update_attrs({"bad": object()})
    with ProfileStore(path) as st:
        a = st.attrs
        assert a["note"] == "plain now" and a["planned"] == 12 and a["tags"] == ["x", "y"]
        assert a["per_source"] == {"embedded": 12} and a["json_attrs"] == ["per_source"]
        assert st.n_samples == 0 and st.n_tokens == 0 and st.layer(0).shape == (0,)
        assert st.token_index().shape == (0,) and st.non_finite_samples().shape == (0,)


# ------------------------------------------------------------------ signal datasets, segments, utr_loss


def test_token_sample_static_data_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    lays = [make_layout(g) for g in GRIDS]
    with ProfileStoreWriter(path, n_layers=L, rope_dims=P, attrs=base_attrs()) as w:
        w.set_static("samples/region_is_edge", np.eye(6, dtype=bool))
        w.set_static("region_grid", np.array([6, 6]))
        for i, lay in enumerate(lays):
            v = lay.n_visual
            w.append(sample_id=f"s:{i}", source="s", question="q", answer=None, layout=lay, attn=attn_for(v, i),
                     token_data={"attn_pa": attn_for(v, 10 + i), "heads": np.ones((v, L, 2), np.float16) * i},
                     sample_data={"region_logdet": np.full((6, 6), i, np.float64)})
        # every sample must supply the same names, dtypes and shapes
        bad = make_layout((1, 2))
        with pytest.raises(PosbiasError, match="differ from the store's"):
            w.append(sample_id="s:x", source="s", question="q", answer=None, layout=bad, attn=attn_for(2, 0),
                     token_data={"attn_pa": attn_for(2, 0)}, sample_data={"region_logdet": np.zeros((6, 6))})
        with pytest.raises(PosbiasError, match="trailing shape"):
            w.append(sample_id="s:x", source="s", question="q", answer=None, layout=bad, attn=attn_for(2, 0),
                     token_data={"attn_pa": attn_for(2, 0), "heads": np.ones((2, L, 3), np.float16)},
                     sample_data={"region_logdet": np.zeros((6, 6))})
        with pytest.raises(PosbiasError, match=r"expected \(2, \.\.\.\)"):
            w.append(sample_id="s:x", source="s", question="q", answer=None, layout=bad, attn=attn_for(2, 0),
                     token_data={"attn_pa": attn_for(3, 0), "heads": np.ones((2, L, 2), np.float16)},
                     sample_data={"region_logdet": np.zeros((6, 6))})
        with pytest.raises(PosbiasError, match="reserved"):
            w.append(sample_id="s:x", source="s", question="q", answer=None, layout=bad, attn=attn_for(2, 0),
                     token_data={"attn": attn_for(2, 0)})
    with ProfileStore(path) as st:
        assert st.n_samples == 3 and st.has("attn_pa") and st.has("tokens/heads") and st.has("region_logdet")
        assert st.has("samples/region_is_edge") and st.has("region_grid") and not st.has("vision_importance")
        full = np.concatenate([attn_for(lay.n_visual, 10 + i) for i, lay in enumerate(lays)])  # (T, L)
        np.testing.assert_array_equal(st.token_data("attn_pa"), full)
        assert st.token_data("heads").shape == (st.n_tokens, L, 2) and st.token_data("heads").dtype == np.float16
        np.testing.assert_array_equal(st.sample_token_data("attn_pa", 1), attn_for(15, 11))
        np.testing.assert_array_equal(st.sample_data("region_logdet")[:, 0, 0], [0, 1, 2])
        np.testing.assert_array_equal(st.static("samples/region_is_edge"), np.eye(6, dtype=bool))
        np.testing.assert_array_equal(st.static("region_grid"), [6, 6])
        assert st.signal_names() == {"tokens": ["attn_pa", "heads"], "samples": ["region_logdet"],
                                     "static": ["samples/region_is_edge", "static/region_grid"]}
        with pytest.raises(PosbiasError, match="no /tokens/nope"):
            st.token_data("nope")
    with h5py.File(path, "r") as f:  # plain h5py sees the documented paths
        assert f["tokens/attn_pa"].shape == (103, L) and f["samples/region_logdet"].shape == (3, 6, 6)
        assert f["samples/region_is_edge"].shape == (6, 6) and f["static/region_grid"].shape == (2,)


def test_interrupted_store_reads_segments_and_compacts_once(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    w = ProfileStoreWriter(path, n_layers=L, rope_dims=P, attrs=base_attrs(), commit_every=2)
    for i in range(5):
        w.append(sample_id=f"s:{i}", source="s", question="q", answer=None, layout=make_layout((2, 3)),
                 attn=attn_for(6, i), token_data={"x": np.full(6, i, np.int32)})
    # 4 committed (2 segments), 1 pending: what a kill here would leave
    with ProfileStore(path) as st:
        assert st.sample_ids == ["s:0", "s:1", "s:2", "s:3"] and st.pending_segments == 3 and not st.complete
        np.testing.assert_array_equal(st.layer(1), np.concatenate([attn_for(6, i)[:, 1] for i in range(4)]))
        np.testing.assert_array_equal(st.token_data("x"), np.repeat(np.arange(4), 6))
    w.compact()  # into the base; a reader sees the same, and stale segments are gone
    with ProfileStore(path) as st:
        assert st.n_samples == 5 and st.pending_segments == 0 and st.generation == 1
    w.append(sample_id="s:5", source="s", question="q", answer=None, layout=make_layout((2, 3)),
             attn=attn_for(6, 5), token_data={"x": np.full(6, 5, np.int32)})
    w.close()
    with ProfileStore(path) as st:
        assert st.sample_ids == [f"s:{i}" for i in range(6)] and st.complete and st.generation == 2
        np.testing.assert_array_equal(st.token_data("x"), np.repeat(np.arange(6), 6))
    assert not (tmp_path / "p.h5.parts").exists() and sorted(x.name for x in tmp_path.iterdir()) == ["p.h5"]


def test_write_utr_loss_rewrites_atomically(store_path: Path) -> None:
    from posbias.profiler.store import write_utr_loss

    loss = np.arange(2 * L, dtype=np.float32).reshape(2, L)
    write_utr_loss(store_path, ["mme:b", "embedded:a"], loss)
    with ProfileStore(store_path) as st:
        got = st.utr_loss
        np.testing.assert_array_equal(got[[1, 0]], loss) and np.isnan(got[2]).all()
        assert st.complete and st.n_samples == 3 and not st.has_attn_pa
    with pytest.raises(PosbiasError, match="not in the store"):
        write_utr_loss(store_path, ["zzz:1"], loss[:1])


def test_token_data_is_read_once(store_path: Path) -> None:
    """token_data caches what it read: the second call returns the same array, not a new read."""
    with ProfileStoreWriter(store_path.with_name("sig.h5"), n_layers=L, rope_dims=P, attrs=base_attrs()) as w:
        for i, grid in enumerate(GRIDS):
            v = grid[0] * grid[1]
            w.append(sample_id=f"embedded:{i}", source="embedded", question="q", answer=None,
                     layout=make_layout(grid), attn=attn_for(v, i), token_data={"vi": np.full(v, i, np.float32)})
    with ProfileStore(store_path.with_name("sig.h5")) as st:
        first = st.token_data("vi")
        np.testing.assert_array_equal(first, np.repeat([0, 1, 2], [24, 15, 64]))
        assert st.token_data("vi") is first and st.token_data("tokens/vi") is first
