"""LLaVA-NeXT (real ``LlavaNextForConditionalGeneration``, tiny config): the any-resolution layout checked against
transformers' own packing (``pack_image_features``), the newline separators, vision importance per crop, and the
aliases."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from posbias.profiler.signals import SignalCapture

#: (height, width) of test images: wide, tall, small square, 1x3 and 3x1 crops, large, odd sizes
SIZES = [(100, 150), (150, 100), (56, 56), (60, 200), (200, 61), (300, 500), (77, 113)]


@pytest.fixture(scope="module")
def tiny_next():
    from posbias.models.tiny import tiny_llava_next

    return tiny_llava_next(seed=0)


def _packed_sources(adapter, inputs) -> np.ndarray:
    """(V,) what transformers' pack_image_features puts at each visual token: crop * side**2 + patch, -1 = newline.

    The model's own packing is fed features whose only channel is the patch's flat index, and a newline of -1.
    """
    config = adapter.model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    n_crops = int(inputs["pixel_values"].shape[1])
    feats = [torch.arange(n_crops * side * side, dtype=torch.float64).reshape(n_crops, side * side, 1)]
    packed, lens = adapter.model.model.pack_image_features(
        feats, inputs["image_sizes"], "default", image_newline=torch.tensor([-1.0], dtype=torch.float64)
    )
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0][:, 0].numpy().astype(np.int64)


@pytest.mark.parametrize("hw", SIZES)
def test_layout_follows_transformers_packing(tiny_next, make_noise_image, hw):
    ad = tiny_next
    inputs = ad.prepare(make_noise_image(*hw, seed=1), "what is in the image")
    layout = ad.layout(inputs)
    ids = inputs["input_ids"][0].numpy()
    # visual positions = the processor's image tokens, one per packed feature
    np.testing.assert_array_equal(layout.visual_index, np.flatnonzero(ids == ad.model.config.image_token_id))
    source = _packed_sources(ad, inputs)
    assert source.shape == (layout.n_visual,)
    np.testing.assert_array_equal(layout.separator, source < 0)
    side = ad.model.config.vision_config.image_size // ad.model.config.vision_config.patch_size
    # tile 0 = the base image (crop 0) in raster order
    base = layout.tile == 0
    assert layout.tiles[0] == (side, side) and layout.grid == (side, side) and int(base.sum()) == side * side
    np.testing.assert_array_equal(source[base], np.arange(side * side))
    np.testing.assert_array_equal(layout.rows[base] * side + layout.cols[base], np.arange(side * side))
    # tile 1 = the unpadded high-resolution raster: rows/cols are the raster coordinates of the crop patch
    assert layout.n_tiles == 2 and bool(np.all(np.diff(layout.tile) >= 0))
    hi = (layout.tile == 1) & ~layout.separator
    nr, nc = layout.tiles[1]
    assert int(hi.sum()) == nr * nc and int(layout.separator.sum()) == nr  # one newline per row
    crop, patch = source[hi] // (side * side) - 1, source[hi] % (side * side)
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    gh, gw = get_anyres_image_grid_shape(inputs["image_sizes"][0], ad.model.config.image_grid_pinpoints,
                                         ad.model.config.vision_config.image_size)
    assert gh * gw == inputs["pixel_values"].shape[1] - 1
    pr = (crop // gw) * side + patch // side  # padded raster row
    pc = (crop % gw) * side + patch % side  # padded raster column
    # the kept area is a translated rectangle: row/col = raster coordinate minus a constant offset
    assert len(set((pr - layout.rows[hi]).tolist())) == 1 and len(set((pc - layout.cols[hi]).tolist())) == 1
    assert layout.rows[hi].min() == 0 and layout.rows[hi].max() == nr - 1
    assert layout.cols[hi].min() == 0 and layout.cols[hi].max() == nc - 1
    # each newline ends its row: it comes right after the row's last column and carries that row, column -1
    sep = np.flatnonzero(layout.separator)
    assert bool(np.all(layout.cols[sep] == -1))
    np.testing.assert_array_equal(layout.rows[sep], np.arange(nr))
    np.testing.assert_array_equal(layout.cols[sep - 1], np.full(nr, nc - 1))
    # 1-D RoPE positions = sequence positions (no padding)
    np.testing.assert_array_equal(layout.position_ids[:, 0], layout.visual_index)
    assert layout.seq_len == ids.shape[0]


def test_separators_receive_the_image_newline_embedding(tiny_next, noise_image):
    ad = tiny_next
    inputs = ad.prepare(noise_image, "what is in the image")
    layout = ad.layout(inputs)
    seen = {}
    hook = ad.language_model().register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=kw["inputs_embeds"].detach()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            ad.model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    visual = seen["x"][0, torch.as_tensor(layout.visual_index)]  # (V, D)
    newline = ad.model.model.image_newline.detach()
    is_newline = (visual == newline).all(dim=1).numpy()
    np.testing.assert_array_equal(is_newline, layout.separator)
    assert layout.separator.sum() == layout.tiles[1][0] > 0


def _eager_cls_rows(adapter, inputs) -> torch.Tensor:
    """(n_crops, side**2) [CLS] -> patch attention per crop, head mean, at the feature layer (eager CLIP)."""
    tower = copy.deepcopy(adapter.vision_tower())
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(inputs["pixel_values"][0], output_attentions=True)
    layer = adapter.vision_feature_layers()[0]
    return out.attentions[layer][:, :, 0, 1:].mean(dim=1)  # (n_crops, side**2)


def test_vision_importance_is_the_cls_row_per_crop_in_packed_order(tiny_next, make_noise_image):
    ad = tiny_next
    inputs = ad.prepare(make_noise_image(100, 150, seed=2), "what is this?")
    layout = ad.layout(inputs)
    sig = SignalCapture(ad, signals=["vision_importance", "region_logdet"]).run(inputs, layout)
    got = sig.token_data["vision_importance"]
    rows = _eager_cls_rows(ad, inputs).double()  # (n_crops, s*s)
    nan = torch.tensor([float("nan")], dtype=torch.float64)
    packed, _ = ad.model.model.pack_image_features([rows[:, :, None]], inputs["image_sizes"], "default",
                                                   image_newline=nan)
    expected = packed[0][:, 0].numpy()  # (V,) the model's own crop -> raster -> unpad order
    assert got.shape == (layout.n_visual,) and got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), layout.separator)  # not defined at newlines
    np.testing.assert_allclose(got[~layout.separator], expected[~layout.separator], atol=1e-6, rtol=0)
    # a crop's rows sum below 1 (the [CLS] key takes the rest); the high-res crops differ from the base one
    assert 0 < got[layout.tile == 0].sum() < 1
    assert not np.allclose(got[layout.tile == 0][:4], got[(layout.tile == 1) & ~layout.separator][:4])
    # region blocks cover the base image only
    blocks = sig.token_data["region_block"]
    assert bool(np.all(blocks[layout.tile == 0] >= 0)) and bool(np.all(blocks[layout.tile == 1] == -1))


def test_vision_features_follow_the_packing(tiny_next, noise_image):
    ad = tiny_next
    inputs = ad.prepare(noise_image, "what is this?")
    layout = ad.layout(inputs)
    seen = {}
    hook = ad.vision_feature_module().register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach()))
    try:
        with torch.no_grad():
            ad.model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    got = ad.vision_features_tokens(seen["x"], inputs)  # (V, D_v)
    zero = torch.zeros(seen["x"].shape[-1])
    packed, _ = ad.model.model.pack_image_features([seen["x"]], inputs["image_sizes"], "default",
                                                   image_newline=zero)
    torch.testing.assert_close(got, packed[0], rtol=0, atol=0)
    assert got.shape[0] == layout.n_visual


def test_load_adapter_and_options(tmp_path):
    from posbias.errors import PosbiasError
    from posbias.models.llava_next import LlavaNextAdapter
    from posbias.models.registry import adapter_class, load_adapter

    ad = load_adapter("tiny-llava-next")
    assert isinstance(ad, LlavaNextAdapter) and ad.name == "llava_next" and ad.rope_dims == 1
    assert adapter_class("llava_next") is LlavaNextAdapter
    with pytest.raises(PosbiasError) as info:
        load_adapter("tiny-llava-next", min_pixels=100)
    assert "LLaVA-NeXT" in str(info.value) and "\n" not in str(info.value)
    # a saved checkpoint folder loads back with the PIL processor (no torchvision) and the same layout
    folder = tmp_path / "ckpt"
    ad.model.save_pretrained(folder)
    ad.processor.save_pretrained(folder)
    again = load_adapter(folder)
    assert isinstance(again, LlavaNextAdapter)
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    a, b = ad.prepare(image, "what is this?"), again.prepare(image, "what is this?")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    la, lb = ad.layout(a), again.layout(b)
    np.testing.assert_array_equal(la.cols, lb.cols)
    assert la.tiles == lb.tiles


def test_llava_next_hub_aliases_fail_fast_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from posbias.errors import ModelUnavailableError
    from posbias.models.registry import load_adapter

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for alias, repo in (("llava-v1.6-vicuna-7b", "llava-hf/llava-v1.6-vicuna-7b-hf"),
                        ("llava-v1.6-mistral-7b", "llava-hf/llava-v1.6-mistral-7b-hf")):
        with pytest.raises(ModelUnavailableError) as info:
            load_adapter(alias, cache_dir=tmp_path)
        msg = str(info.value)
        assert "\n" not in msg and f"'{alias}' ({repo})" in msg and "model=/path/to/checkpoint" in msg


def test_demo_builder_wraps_the_decoder_exactly(tmp_path, make_noise_image):
    """demo-llava-next around a tiny stand-in decoder: text logits equal, LLaVA-1.6's pinpoints at half scale."""
    from tests.test_models import _tiny_decoder

    from posbias.models import demo

    causal, tok = _tiny_decoder()
    ids = torch.tensor([[5, 20, 30, 40, 7]])  # (1, 5) words of the tiny vocabulary
    with torch.no_grad():
        want = causal(input_ids=ids).logits[0]  # (5, vocab)
    folder = demo.build_demo("demo-llava-next", cache_dir=tmp_path, decoder=(causal, tok))
    from posbias.models.registry import load_adapter

    adapter = load_adapter("demo-llava-next", cache_dir=tmp_path)
    assert type(adapter.model).__name__ == "LlavaNextForConditionalGeneration" and adapter.name == "llava_next"
    with torch.no_grad():
        got = adapter.model(input_ids=ids, use_cache=False).logits[0]
    torch.testing.assert_close(got[:, : want.shape[1]], want, atol=1e-5, rtol=0)
    config = adapter.model.config
    assert config.vision_config.image_size == 168 and config.image_grid_pinpoints == [
        [p // 2 for p in pair] for pair in ([336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008])]
    layout = adapter.layout(adapter.prepare(make_noise_image(512, 512, seed=0), "what is in the image?"))
    assert layout.tiles == ((12, 12), (24, 24)) and layout.n_visual == 144 + 24 * 25
    assert "USER:" in adapter.prompt("hi") and "<image>" in adapter.prompt("hi")  # the saved chat template
    assert demo.build_demo("demo-llava-next", cache_dir=tmp_path) == folder


@pytest.mark.filterwarnings("ignore::posbias.runtime.quality.CalibrationQualityWarning")  # 3 samples: weak fits
def test_profile_store_round_trip_and_fit(tiny_next, tmp_path, capsys):
    """Every signal through the profiler into the store and back: per-token tile, separator, rows, cols equal the
    adapter's layout; the fit places tokens along the visual run (i/N) and leaves the newlines out."""
    from posbias.artifacts.calibration import Calibration
    from posbias.data.base import Sample
    from posbias.cli import main
    from posbias.profiler.run import profile_samples
    from posbias.profiler.store import ProfileStore

    ad = tiny_next
    rng = np.random.default_rng(5)
    samples = [Sample(id=f"t:{i}", source="t", question="what is in the image",
                      image=__import__("PIL.Image", fromlist=["Image"]).fromarray(
                          rng.integers(0, 256, (*hw, 3), dtype=np.uint8)))
               for i, hw in enumerate([(100, 150), (150, 100), (60, 200)])]
    path = tmp_path / "profile.h5"
    capture = SignalCapture(ad, signals="all")
    assert profile_samples(ad, samples, path, seed=0, progress=False, capture=capture).n_profiled == 3
    with ProfileStore(path) as store:
        assert store.attrs["adapter"] == "llava_next" and store.multi_tile
        for i, item in enumerate(samples):
            inputs = ad.prepare(item.image, item.question)
            layout = ad.layout(inputs)
            assert [tuple(int(v) for v in g) for g in store.sample_tiles(i)] == list(layout.tiles)
            np.testing.assert_array_equal(store.sample_token_tile(i), layout.tile)
            np.testing.assert_array_equal(store.sample_token_separator(i), layout.separator)
            sl = slice(int(np.sum(store.n_visual[:i])), int(np.sum(store.n_visual[: i + 1])))
            np.testing.assert_array_equal(store.rows[sl], layout.rows)
            np.testing.assert_array_equal(store.cols[sl], layout.cols)
            np.testing.assert_array_equal(store.positions[sl][:, 0], layout.position_ids[:, 0])
            sig = SignalCapture(ad, signals="all").run(inputs, layout)
            np.testing.assert_allclose(store.sample_attn(i), sig.attn, atol=1e-6)
            got_vi = store.sample_token_data("vision_importance", i)
            np.testing.assert_array_equal(np.isnan(got_vi), layout.separator)
        assert store.sample_data("region_logdet").shape == (3, 6, 6)
    cal_path = tmp_path / "cal.json"
    assert main(["fit", "--store", str(path), "--out", str(cal_path)]) == 0, capsys.readouterr().err
    cal = Calibration.load(cal_path)
    assert cal.model["adapter"] == "llava_next" and cal.model["fingerprint"] == ad.fingerprint()
    methods = cal.to_dict()["methods"]
    assert methods["posprune-pbc"]["domain"] == "normalized" and methods["pore"]["domain"] == "normalized"
    assert methods["posprune-pbc"]["goodness"]["n_samples"] == 3
    # the fit sees the candidates only, placed along the visual run: the separators' attention does not matter
    with ProfileStore(path) as store:
        from posbias.fitters.curves import token_geometry

        index, grid, cand = token_geometry(store)
        np.testing.assert_array_equal(cand, ~store.token_separator)
        assert int(index[: store.n_visual[0]].max()) == int(store.n_visual[0]) - 1  # i over the whole run
        hi = store.token_tile[: store.n_visual[0]] == 1
        assert {tuple(g) for g in grid[: store.n_visual[0]][hi]} == {tuple(store.sample_tiles(0)[1])}
    html = tmp_path / "report.html"
    code = main(["report", "--store", str(path), "--calibration", str(cal_path), "--html", str(html)])
    assert code == 0, capsys.readouterr().err
    text = html.read_text()
    # the pictures section says why these samples (source "t", not reloadable) are not drawn
    assert "llava_next" in text and "t:0: not drawn (" in text and "not drawn for any-resolution layouts" not in text
