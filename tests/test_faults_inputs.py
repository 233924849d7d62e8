"""Truncated and corrupted inputs of every kind, and budgets/overwrites refused before anything is written:
exit 2, one line naming the input, no traceback, every existing output byte-identical."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from posbias.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    assert main(["profile", "--model", "tiny-llava", "--n", "3", "--out", str(d / "run"), "--no-progress"]) == 0
    assert main(["fit", "--store", str(d / "run" / "profile.h5"), "--out", str(d / "cal.json"), "--no-stats"]) == 0
    return d


def _call(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("profile-bias: error:")]
    assert len(lines) == 1, err
    return code, lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _damaged(run: Path, tmp: Path, kind: str) -> Path:
    good = (run / "run" / "profile.h5").read_bytes()
    p = tmp / "damaged" / "profile.h5"
    p.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        p.write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "flipped":  # a damaged block in the middle of a complete file
        data = bytearray(good)
        mid = len(data) // 2
        data[mid : mid + 512] = b"\xff" * 512
        p.write_bytes(bytes(data))
    return p


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("command", ["fit", "report", "solve", "merge", "utr"])
def test_damaged_store(kind, command, run, tmp_path, capsys):
    store = _damaged(run, tmp_path, kind)
    cal = shutil.copy(run / "cal.json", tmp_path / "cal.json")
    argv = {
        "fit": ["fit", "--store", store, "--out", tmp_path / "new.json", "--no-stats"],
        "report": ["report", "--store", store, "--calibration", cal, "--html", tmp_path / "r.html"],
        "solve": ["solve", "--store", store, "--ratios", "2", "--into", cal],
        "merge": ["merge", store, "--out", tmp_path / "merged.h5"],
        "utr": ["utr", "--store", store, "--no-progress"],
    }[command]
    before = _snapshot(tmp_path)
    code, line = _call(argv, capsys)
    assert code == 2 and str(store) in line
    assert "locked" not in line  # HDF5's "sblock" in a truncated file's message is not a lock
    if kind == "truncated" and command != "merge":
        assert "truncated" in line
    assert _snapshot(tmp_path) == before


def test_damaged_block_inside_a_store_is_one_line(run, tmp_path, capsys):
    store = _damaged(run, tmp_path, "flipped")
    capsys.readouterr()
    code = main(["fit", "--store", str(store), "--out", str(tmp_path / "new.json"), "--no-stats"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # the bytes may fall in a gzip chunk (refused) or in unused space (no harm): never a traceback
    assert code in (0, 2) and (tmp_path / "new.json").exists() == (code == 0)


def test_damaged_segment_of_an_interrupted_store(run, tmp_path, capsys):
    from posbias.profiler.store import ProfileStore, ProfileStoreWriter, parts_dir

    with ProfileStore(run / "run" / "profile.h5") as st:
        attrs = {k: st.attrs[k] for k in ("model_id", "model_fingerprint", "adapter", "seed")}
        n_layers, rope = st.n_layers, st.rope_dims
    path = tmp_path / "run" / "profile.h5"
    w = ProfileStoreWriter(path, n_layers=n_layers, rope_dims=rope, attrs=attrs)
    w.skip(sample_id="x:1", source="x", reason="test")
    w._unlock()  # as a killed writer leaves it: segments, no compaction
    w._closed = True
    seg = sorted(p for p in parts_dir(path).iterdir() if p.suffix == ".npz")[-1]
    seg.write_bytes(seg.read_bytes()[:40])
    code, line = _call(["fit", "--store", path, "--out", tmp_path / "c.json", "--no-stats"], capsys)
    assert code == 2 and seg.name in line and "delete that segment" in line


@pytest.mark.parametrize("content", ["truncated", "[]", "not json", ""])
@pytest.mark.parametrize("command", ["solve", "report", "export", "evaluate"])
def test_damaged_calibration(content, command, run, tmp_path, capsys):
    text = (run / "cal.json").read_text()
    cal = tmp_path / "cal.json"
    cal.write_text(text[: len(text) // 2] if content == "truncated" else content)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    store = run / "run" / "profile.h5"
    argv = {
        "solve": ["solve", "--store", store, "--ratios", "2", "--into", cal],
        "report": ["report", "--store", store, "--calibration", cal, "--html", tmp_path / "r.html"],
        "export": ["export", "--calibration", cal, "--to", ckpt],
        "evaluate": ["evaluate", "--model", "tiny-llava", "--calibration", cal, "--out", tmp_path / "e.json", "--n", "1"],
    }[command]
    before = _snapshot(tmp_path)
    code, line = _call(argv, capsys)
    assert code == 2 and str(cal) in line
    assert _snapshot(tmp_path) == before


def test_damaged_evaluation_for_report(run, tmp_path, capsys):
    ev = tmp_path / "eval.json"
    ev.write_text('{"schema": "posbias.evaluation", "results": [')
    before = _snapshot(tmp_path)
    code, line = _call(["report", "--store", run / "run" / "profile.h5", "--calibration", run / "cal.json",
                        "--evaluation", ev, "--html", tmp_path / "r.html"], capsys)
    assert code == 2 and str(ev) in line and _snapshot(tmp_path) == before


def test_budgets_and_overwrites_are_refused_before_anything_is_written(run, tmp_path, capsys):
    store = run / "run" / "profile.h5"
    code, line = _call(["fit", "--store", store, "--out", tmp_path / "c.json", "--keep", "100000"], capsys)
    assert code == 2 and "--keep 100000" in line and "16 visual tokens" in line
    assert not (tmp_path / "c.json").exists()
    cal = shutil.copy(run / "cal.json", tmp_path / "cal.json")
    before = _snapshot(tmp_path)
    code, line = _call(["solve", "--store", store, "--ratios", "0.5", "--into", cal], capsys)
    assert code == 2 and "--ratios 0.5" in line
    html = tmp_path / "r.html"
    html.write_text("<html>mine</html>")
    before = _snapshot(tmp_path)
    code, line = _call(["report", "--store", store, "--calibration", cal, "--html", html], capsys)
    assert code == 2 and "--overwrite" in line and _snapshot(tmp_path) == before
    code, line = _call(["evaluate", "--model", "tiny-llava", "--calibration", cal, "--out", html, "--n", "1"], capsys)
    assert code == 2 and "--overwrite" in line and _snapshot(tmp_path) == before
    (tmp_path / "blocker").write_text("")
    code, line = _call(["fit", "--store", store, "--out", tmp_path / "blocker" / "c.json"], capsys)
    assert code == 2 and "does not exist" in line


def test_solve_into_a_list_says_so(run, tmp_path, capsys):
    cal = tmp_path / "cal.json"
    cal.write_text("[]")
    code, line = _call(["solve", "--store", run / "run" / "profile.h5", "--ratios", "2", "--into", cal], capsys)
    assert code == 2 and "holds a JSON list, not a calibration" in line and cal.read_text() == "[]"


def test_export_to_a_damaged_checkpoint_config(run, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    code, line = _call(["export", "--calibration", run / "cal.json", "--to", ckpt], capsys)
    assert code == 2 and "not a transformers model config" in line
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json"]
