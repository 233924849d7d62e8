"""InternVL (real ``InternVLForConditionalGeneration``, tiny config): tiles, their token layout, vision importance
through the pixel shuffle, and the profile -> fit stages."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from posbias.cli import main
from posbias.profiler.signals import SignalCapture


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size, n_tiles", [((56, 56), 1), ((60, 130), 3), ((130, 60), 3), ((120, 120), 5)])
def test_layout_follows_the_processor_tiles(tiny_internvl_adapter, size, n_tiles):
    ad = tiny_internvl_adapter
    inputs = ad.prepare(_image(*size), "what is in the image")
    lay = ad.layout(inputs)
    ids = inputs["input_ids"][0].numpy()
    tok = ad.processor.tokenizer
    ctx, start, end = (tok.convert_tokens_to_ids(t) for t in ("<IMG_CONTEXT>", "<img>", "</img>"))
    assert inputs["pixel_values"].shape[0] == n_tiles == lay.n_tiles
    assert np.array_equal(lay.visual_index, np.flatnonzero(ids == ctx))
    # the span is <img> + contiguous context tokens + </img>; no separators inside
    assert ids[lay.visual_index[0] - 1] == start and ids[lay.visual_index[-1] + 1] == end
    assert np.array_equal(np.diff(lay.visual_index), np.ones(lay.n_visual - 1))
    assert not lay.separator.any()
    assert lay.tiles == ((2, 2),) * n_tiles and lay.n_visual == 4 * n_tiles
    assert np.array_equal(lay.tile, np.repeat(np.arange(n_tiles), 4))
    assert np.array_equal(lay.rows * 2 + lay.cols, np.tile(np.arange(4), n_tiles))
    assert np.array_equal(lay.position_ids[:, 0], lay.visual_index)


def test_token_cells_are_the_pixel_shuffle_units(tiny_internvl_adapter):
    """Token (tile t, row r, col c) holds patches (2r..2r+1, 2c..2c+1) of tile t in transformers' own pixel
    shuffle, so the vision importance averages exactly those patches."""
    ad = tiny_internvl_adapter
    n_tiles, side = 3, 4  # 56 px tiles, patch 14
    patch_id = torch.arange(n_tiles * side * side, dtype=torch.float32).reshape(n_tiles, side, side, 1)
    shuffled = ad.model.model.pixel_shuffle(patch_id, scale_factor=0.5).reshape(n_tiles * 4, 4)  # (V, 4)
    cells = {int(t): set() for t in range(n_tiles * 4)}
    for j in range(n_tiles * 4):
        t, cell = divmod(j, 4)
        r, c = divmod(cell, 2)
        cells[j] = {t * 16 + (2 * r + a) * side + 2 * c + b for a in (0, 1) for b in (0, 1)}
        assert set(int(x) for x in shuffled[j]) == cells[j]
    records = torch.rand(n_tiles, 1 + side * side)
    got = ad.vision_importance_tokens([records], {})
    flat = records[:, 1:].reshape(-1)
    want = torch.stack([flat[sorted(cells[j])].mean() for j in range(n_tiles * 4)])
    torch.testing.assert_close(got, want)


def test_vision_importance_equals_eager_cls_rows_per_tile(tiny_internvl_adapter):
    ad = tiny_internvl_adapter
    inputs = ad.prepare(_image(60, 130), "what is this")
    layout = ad.layout(inputs)
    sig = SignalCapture(ad, signals="vision_importance").run(inputs, layout)
    got = sig.token_data["vision_importance"]  # (V,)
    tower = copy.deepcopy(ad.vision_tower())
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True)
    cls = out.attentions[ad.arch.vision_feature_layer()][:, :, 0, 1:].mean(dim=1)  # (T, 16) [CLS] -> patches
    want = cls.reshape(3, 2, 2, 2, 2).mean(dim=(2, 4)).reshape(-1).numpy()
    assert got.shape == (layout.n_visual,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # a different tile order would not match
    assert np.abs(got - want.reshape(3, 4)[::-1].ravel()).max() > 1e-6


def test_profile_and_fit_on_tiles(tmp_path, capsys):
    from posbias.profiler.store import ProfileStore

    run = tmp_path / "ivl"
    code = main(["profile", "--model", "tiny-internvl", "--n", "3", "--out", str(run), "--no-progress",
                 "--signals", "all"])
    err = capsys.readouterr().err
    assert code == 0, err
    with ProfileStore(run / "profile.h5") as view:
        assert view.attrs["adapter"] == "internvl" and view.n_samples == 3
        assert all(int(v) % 4 == 0 for v in view.n_visual)
    cal = run / "cal.json"
    assert main(["fit", "--store", str(run / "profile.h5"), "--out", str(cal)]) == 0, capsys.readouterr().err
    doc = json.loads(cal.read_text())
    assert doc["model"]["adapter"] == "internvl"


def test_internvl_hub_aliases_fail_fast_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from posbias.errors import ModelUnavailableError
    from posbias.models.registry import load_adapter

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError) as info:
        load_adapter("internvl3-8b", cache_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "'internvl3-8b' (OpenGVLab/InternVL3-8B-hf)" in msg


def test_region_density_is_measured_on_the_thumbnail(tiny_internvl_adapter):
    ad = tiny_internvl_adapter
    inputs = ad.prepare(_image(60, 130), "what is this")
    layout = ad.layout(inputs)
    assert layout.overview == layout.n_tiles - 1 == 2
    sig = SignalCapture(ad, signals="region_logdet").run(inputs, layout)
    blocks = sig.token_data["region_block"]
    assert (blocks[layout.tile != 2] == -1).all() and (blocks[layout.tile == 2] >= 0).all()
