"""Hostile and unusual images: converted properly, capped to the pixel budget, or skipped with a reason;
no sample stops a profile run and --resume gets past a bad one."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posbias.data.base import BadSample
from posbias.data.files import MAX_DECODE_PIXELS, PIXEL_BUDGET, open_image


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A 100-byte PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_16_bit_png_keeps_its_contrast():
    ramp = np.linspace(0, 65535, 64 * 256).reshape(64, 256).astype(np.uint16)  # (H, W) uint16
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I;16")
    out = np.asarray(open_image(_encode(img), "t:16bit"))  # (H, W, 3) uint8
    assert out.dtype == np.uint8 and out.shape == (64, 256, 3)
    assert out.min() == 0 and out.max() == 255 and 120 < out.mean() < 135  # a ramp, not all white
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)


@pytest.mark.parametrize("values, expect", [((0.0, 1.0), (0, 255)), ((-3.0, 5.0), (0, 255))])
def test_float_images_are_mapped_not_clipped(values, expect):
    arr = np.linspace(values[0], values[1], 32 * 32, dtype=np.float32).reshape(32, 32)  # (H, W) float32
    out = np.asarray(open_image(_encode(Image.fromarray(arr, mode="F"), "TIFF"), "t:float"))
    assert (out.min(), out.max()) == expect and 100 < out.mean() < 155


def test_cmyk_palette_and_alpha_images_become_rgb():
    red_cmyk = Image.new("CMYK", (16, 12), (0, 255, 255, 0))
    out = np.asarray(open_image(_encode(red_cmyk, "JPEG", quality=95), "t:cmyk"))
    assert out.shape == (12, 16, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60
    clear = Image.new("LA", (8, 8), (0, 0))  # fully transparent black: white once composited
    assert np.asarray(open_image(_encode(clear), "t:la")).min() == 255
    pal = Image.new("P", (8, 8), 3)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    out = np.asarray(open_image(_encode(pal), "t:p"))
    assert tuple(out[0, 0]) == (0, 0, 255)


def test_huge_image_is_capped_to_the_pixel_budget():
    w, h = 5000, 4000
    assert w * h > PIXEL_BUDGET
    for fmt in ("PNG", "JPEG"):
        out = open_image(_encode(Image.new("RGB", (w, h), (10, 200, 30)), fmt), f"t:{fmt}")
        assert out.size[0] * out.size[1] <= PIXEL_BUDGET
        assert abs(out.size[0] / out.size[1] - w / h) < 0.01


def test_bomb_truncated_and_empty_files_are_bad_samples():
    assert 20000 * 20000 > MAX_DECODE_PIXELS
    with pytest.raises(BadSample, match="too large"):
        open_image(png_bomb(), "t:bomb")
    with pytest.raises(BadSample, match="too large"):
        open_image(png_bomb(13000, 12000), "t:bomb2")  # under PIL's own limit, over ours
    whole = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(BadSample, match="cannot decode image"):
        open_image(whole[: len(whole) // 2], "t:truncated")
    with pytest.raises(BadSample, match="empty"):
        open_image(b"", "t:empty")


def test_profile_run_skips_hostile_images_and_resume_gets_past_them(tmp_path, capsys):
    from posbias.cli import main
    from posbias.profiler.store import ProfileStore

    images = tmp_path / "val2014"
    images.mkdir()
    good = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    (images / "COCO_val2014_000000000001.jpg").write_bytes(_encode(Image.fromarray(good), "JPEG"))
    (images / "COCO_val2014_000000000002.png").write_bytes(png_bomb())
    ramp = (np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)
    (images / "COCO_val2014_000000000003.png").write_bytes(_encode(Image.fromarray(ramp)))
    (images / "COCO_val2014_000000000004.jpg").write_bytes(_encode(Image.fromarray(good), "JPEG")[:300])
    out = tmp_path / "run"
    argv = ["profile", "--model", "tiny-llava", "--data", f"coco:{images}", "--n", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "skipped 2 sample(s)" in text
    with ProfileStore(out / "profile.h5") as st:
        assert st.n_samples == 2
        reasons = {sid: reason for sid, _, reason in st.skipped()}
    assert any("too large" in r for r in reasons.values()) and any("cannot decode" in r for r in reasons.values())
    assert main([*argv[:-1], "--resume", "--no-progress"]) == 0  # nothing left: the bad ones are recorded
    assert "resumed: 4 already stored" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::posbias.runtime.quality.CalibrationQualityWarning")
def test_evaluate_lists_the_samples_it_cannot_read(tmp_path, capsys):
    """An unreadable image in the evaluation data is skipped with its reason: in the JSON and on screen, never
    silently (the run takes the next sample instead)."""
    from posbias.cli import main

    images = tmp_path / "val2014"
    images.mkdir()
    good = np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    (images / "COCO_val2014_000000000001.jpg").write_bytes(_encode(Image.fromarray(good), "JPEG"))
    (images / "COCO_val2014_000000000002.png").write_bytes(png_bomb())
    (images / "COCO_val2014_000000000003.jpg").write_bytes(_encode(Image.fromarray(good[::-1]), "JPEG"))
    run = tmp_path / "run"  # a real calibration with its store (evaluate excludes the store's samples)
    assert main(["profile", "--model", "tiny-llava", "--n", "2", "--out", str(run), "--no-progress"]) == 0
    cal = run / "cal.json"
    assert main(["fit", "--store", str(run / "profile.h5"), "--out", str(cal), "--no-stats"]) == 0
    out = tmp_path / "ev.json"
    code = main(["evaluate", "--model", "tiny-llava", "--calibration", str(cal), "--data", f"coco:{images}",
                 "--methods", "fastv", "--keep", "4", "--n", "3", "--max-new-tokens", "1", "--out", str(out),
                 "--no-progress"])
    captured = capsys.readouterr()
    text = captured.out
    assert code == 0, captured.err
    doc = json.loads(out.read_text())
    assert doc["n_samples"] == 2 and len(doc["skipped"]) == 1
    bad = doc["skipped"][0]
    assert bad["id"].startswith("coco:2/") and "too large" in bad["reason"]  # the PNG bomb, image 2
    assert "skipped 1 sample(s)" in text and bad["id"] in text
