"""The report's pictures of kept tokens on multi-tile images (LLaVA-NeXT, InternVL).

Two parts:

- the tile geometry (:meth:`Architecture.tile_placement` through :func:`posbias.reports.pictures.picture_geometry`)
  against the real transformers processors on non-square images: the box the report draws for a token must cover
  the part of the image the processor put into that token's patch (a colour gradient makes every place in the
  image tell its coordinates);
- the pictures of tiny LLaVA-NeXT and tiny InternVL stores (real models, real stores): the kept sets are the
  pruner's, separators are never kept or drawn, kept tokens lie inside their tile's box, the overview tile gets a
  panel of its own, and the report renders them legibly.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from posbias.models.base import Architecture, TokenGrid

KEEP = 6


def _gradient(h: int, w: int) -> Image.Image:
    """R grows with x, G with y, B constant: no pixel is black (the processors pad with black)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([40 + 200 * (x + 0.5) / w, 40 + 200 * (y + 0.5) / h, np.full((h, w), 90.0)], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def _pixels(pixel_values: torch.Tensor, processor) -> np.ndarray:
    """(..., 3, H, W) normalised processor output -> (..., H, W, 3) float 0..255."""
    mean = np.asarray(processor.image_mean, dtype=np.float64)[:, None, None]
    std = np.asarray(processor.image_std, dtype=np.float64)[:, None, None]
    raw = (pixel_values.double().numpy() * std + mean) * 255.0
    return np.moveaxis(raw, -3, -1)


def _box_mean(image: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Mean colour of the image over a (top, left, bottom, right) box, to the nearest pixel, inside the image."""
    t, l, b, r = (int(round(v)) for v in cell)
    t, l = max(t, 0), max(l, 0)
    return image[t:max(b, t + 1), l:max(r, l + 1)].reshape(-1, 3).mean(axis=0)


# ------------------------------------------------------------------------------------------------ geometry
@pytest.fixture(scope="module")
def tiny_next():
    from posbias.models.tiny import tiny_llava_next

    return tiny_llava_next(seed=0)


def test_default_placement_is_one_tile_over_the_picture():
    got = Architecture.tile_placement((30, 50), ((4, 4),))
    assert got.overview is None and got.boxes.tolist() == [[0.0, 0.0, 30.0, 50.0]]
    from posbias.errors import PosbiasError

    with pytest.raises(PosbiasError, match="tile_placement"):
        Architecture.tile_placement((30, 50), ((2, 4), (2, 4)))


@pytest.mark.parametrize("hw, max_patches, canvas", [((100, 150), 6, (2, 3)), ((150, 100), 6, (3, 2)),
                                                      ((60, 130), 4, (1, 2)), ((200, 90), 4, (2, 1))])
def test_internvl_crops_cover_their_cell_of_the_image(hw, max_patches, canvas):
    """Crop i of GotOcr2ImageProcessorPil(crop_to_patches) shows the cell the report places it on, row-major over the
    canvas the processor picked, and the thumbnail shows the whole image."""
    from transformers import GotOcr2ImageProcessorPil

    from posbias.reports.pictures import picture_geometry

    proc = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1,
                                    max_patches=max_patches)
    image = _gradient(*hw)
    out = proc(images=image, return_tensors="pt")
    n_tiles = int(out["num_patches"][0])
    assert n_tiles == canvas[0] * canvas[1] + 1  # crops + thumbnail
    side = 4  # token cells of 14 px per tile side: finer than InternVL's 2x2 pixel-shuffle units, same boxes
    cell = np.arange(side * side)
    tokens = TokenGrid(rows=np.tile(cell // side, n_tiles), cols=np.tile(cell % side, n_tiles),
                       tiles=((side, side),) * n_tiles, tile=np.repeat(np.arange(n_tiles), side * side))
    geo = picture_geometry("internvl", hw, tokens)
    assert geo["overview_tile"] == n_tiles - 1
    assert geo["tile_boxes"][-1].tolist() == [0.0, 0.0, float(hw[0]), float(hw[1])]
    crops = _pixels(out["pixel_values"], proc)  # (n_tiles, 56, 56, 3)
    img = np.asarray(image, dtype=np.float64)
    err, err_transposed = [], []
    for j in range(n_tiles * side * side):
        t, (r, c) = int(tokens.tile[j]), divmod(j % (side * side), side)
        seen = crops[t, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].reshape(-1, 3).mean(axis=0)
        err.append(np.abs(seen - _box_mean(img, geo["cells"][j]))[:2].max())
        if t < n_tiles - 1:  # the same boxes with the crops taken column-major: a wrong placement
            rows_, cols_ = canvas
            col_major = (t % rows_) * cols_ + t // rows_
            err_transposed.append(np.abs(seen - _box_mean(img, geo["cells"][col_major * side * side + j % (side * side)]))[:2].max())
    assert max(err) < 4.0, max(err)  # grey levels of 255; the gradient moves ~50 levels per cell
    if canvas[0] > 1 and canvas[1] > 1:
        assert max(err_transposed) > 30.0


@pytest.mark.parametrize("hw", [(100, 150), (150, 100), (60, 200), (90, 70)])
def test_llava_next_raster_and_base_image_cover_the_image(tiny_next, hw):
    """Every grid token's box shows what LlavaNextImageProcessorPil put into that token's patch: the base image
    (tile 0) is the whole image; the unpadded crop raster (tile 1) is the whole image after select_best_resolution,
    resize, pad and unpad; newline separators get no box."""
    from posbias.models.llava_next import anyres_layout
    from posbias.reports.pictures import picture_geometry

    proc = tiny_next.processor.image_processor
    image = _gradient(*hw)
    out = proc(images=image, return_tensors="pt")
    plan = anyres_layout(hw, tiny_next.model.config)
    assert out["pixel_values"].shape[1] == plan.n_crops
    tokens = TokenGrid(rows=plan.rows, cols=plan.cols, tiles=plan.tiles, tile=plan.tile, separator=plan.separator)
    geo = picture_geometry("llava_next", hw, tokens)
    assert geo["overview_tile"] == 0 and np.array_equal(geo["overview"], plan.tile == 0)
    assert np.isnan(geo["cells"][plan.separator]).all() and np.isfinite(geo["cells"][~plan.separator]).all()
    crops = _pixels(out["pixel_values"][0], proc)  # (n_crops, 56, 56, 3)
    img = np.asarray(image, dtype=np.float64)
    side, px = plan.side, 56 // plan.side
    errs, padded = {0: [], 1: []}, 0
    for j in np.flatnonzero(~plan.separator):
        crop, patch = divmod(int(plan.source[j]), side * side)
        pr, pc = divmod(patch, side)
        block = crops[crop, pr * px:(pr + 1) * px, pc * px:(pc + 1) * px].reshape(-1, 3)
        if (block < 20).all(axis=1).any():  # the patch holds some of the black padding: at the raster's edge only
            padded += 1
            r, c = int(plan.rows[j]), int(plan.cols[j])
            assert plan.tile[j] == 1 and (r in (0, plan.tiles[1][0] - 1) or c in (0, plan.tiles[1][1] - 1))
            continue
        errs[int(plan.tile[j])].append(np.abs(block.mean(axis=0) - _box_mean(img, geo["cells"][j]))[:2].max())
    n_hi = int((plan.tile == 1).sum() - plan.separator.sum())
    assert len(errs[1]) >= n_hi // 2 and padded + len(errs[1]) == n_hi
    # one token row of tile 1 spans ~33 grey levels of the gradient at (100, 150); stretching the raster over the image
    # alone (ignoring the padding unpad leaves) is off by 7.4 levels there, a quarter of a token
    assert max(errs[0]) < 4.0 and max(errs[1]) < 4.0, (max(errs[0]), max(errs[1]))


# ------------------------------------------------------------------------------------------------ pictures
def _profile(adapter, path, n: int = 4):
    from posbias.data.registry import iter_samples, resolve_sources
    from posbias.pipeline import fit_calibration
    from posbias.profiler.run import profile_samples
    from posbias.profiler.signals import SignalCapture

    samples = list(iter_samples(resolve_sources(["embedded"]), n=n, seed=0))
    capture = SignalCapture(adapter, signals="attn_pa")
    profile_samples(adapter, samples, path, seed=0, progress=False, capture=capture,
                    extra_attrs={"data": "embedded", "n_requested": n})
    cal = fit_calibration(path, statistics=False, keep=KEEP).calibration
    cal_path = path.with_name("cal.json")
    cal.save(cal_path)
    return {s.id: s for s in samples}, cal_path


@pytest.fixture(scope="module")
def next_run(tmp_path_factory, tiny_next):
    d = tmp_path_factory.mktemp("next")
    samples, cal = _profile(tiny_next, d / "profile.h5")
    return tiny_next, samples, d / "profile.h5", cal


@pytest.fixture(scope="module")
def internvl_run(tmp_path_factory, tiny_internvl_adapter):
    d = tmp_path_factory.mktemp("ivl")
    samples, cal = _profile(tiny_internvl_adapter, d / "profile.h5")
    return tiny_internvl_adapter, samples, d / "profile.h5", cal


def _inside(cells: np.ndarray, box: np.ndarray) -> bool:
    eps = 1e-9
    return bool(np.all((cells[:, 0] >= box[0] - eps) & (cells[:, 1] >= box[1] - eps)
                       & (cells[:, 2] <= box[2] + eps) & (cells[:, 3] <= box[3] + eps)))


def _check_rows(adapter, samples, store, cal, expect_overview):
    """Shared checks: the pictures exist, every kept token of every method is a grid token inside its own tile's box,
    the kept sets of fastv and pore are the pruner's on the same prompt, the overview tile has its panel."""
    import posbias.runtime as rt
    from posbias.artifacts import Calibration
    from posbias.reports.data import collect
    from posbias.reports.pictures import picture_rows

    data = collect(store, cal, n_pictures=3)
    assert not any("multi-tile" in what for what, _ in data.missing)
    rows, methods, notes = picture_rows(data, KEEP)
    assert len(rows) == len(data.picked) >= 2 and not notes, notes
    assert {"fastv", "pore", "posprune-pbc", "pa-att"} <= set(methods)
    calibration = Calibration.load(cal)
    multi_row = 0
    for row, p in zip(rows, data.picked):
        tokens = p.tokens
        sep = np.asarray(tokens.separator, bool)
        tile = np.asarray(tokens.tile, np.int64)
        h, w = row["size"]
        image = samples[p.id].image
        assert (h, w) == (image.height, image.width) and row["image"] is not None
        n_tiles = len(tokens.tiles)
        multi_row += n_tiles > 1
        ov = expect_overview(n_tiles)
        assert row["overview_tile"] == ov
        assert np.array_equal(row["overview"], tile == ov if ov is not None else np.zeros_like(sep))
        assert np.isnan(row["cells"][sep]).all() and np.isfinite(row["cells"][~sep]).all()
        for m, kept in row["kept"].items():
            kept = np.asarray(kept)
            assert kept.size == min(KEEP, int((~sep).sum())), m
            assert not sep[kept].any(), m  # separators are never kept
            for t in np.unique(tile[kept]):
                mine = kept[tile[kept] == t]
                assert _inside(row["cells"][mine], row["tile_boxes"][t]), (m, t)
        # the pruner, run on the same prompt, keeps the same tokens (fastv: the stored row; pore: + run positions)
        sample = samples[p.id]
        inputs = adapter.prepare(sample.image, sample.question)
        for m in ("fastv", "pore"):
            with warnings.catch_warnings():  # a weak fit on 4 samples is expected here
                warnings.simplefilter("ignore", rt.CalibrationQualityWarning)
                with rt.enable_pruning(adapter.model, calibration, method=m, keep=KEEP, force=True) as pruner:
                    with torch.no_grad():
                        adapter.model(**inputs)
            got = pruner.last.kept.numpy()
            assert np.array_equal(got[~sep[got]], row["kept"][m]), m
    assert multi_row >= 1
    return data, rows, methods


def test_llava_next_pictures(next_run):
    adapter, samples, store, cal = next_run
    data, rows, methods = _check_rows(adapter, samples, store, cal, lambda n: 0)
    for row, p in zip(rows, data.picked):
        # the base image (tile 0) spans the picture; the unpadded raster (tile 1) too, plus less than a token of
        # leftover padding at both ends of one axis
        h, w = row["size"]
        base, hi = row["tile_boxes"]
        nr, nc = p.tokens.tiles[1]
        assert base.tolist() == [0.0, 0.0, float(h), float(w)]
        over = np.array([-hi[0], -hi[1], hi[2] - h, hi[3] - w])  # (4,) beyond the picture at each edge
        cell = np.array([hi[2] - hi[0], hi[3] - hi[1]]) / np.array([nr, nc])  # a token's height and width
        assert (over >= -1e-9).all() and (over[[0, 2]] < cell[0]).all() and (over[[1, 3]] < cell[1]).all()
        assert over[0] == pytest.approx(over[2]) and over[1] == pytest.approx(over[3]) and min(over[0], over[1]) < 1e-9


def test_internvl_pictures(internvl_run):
    adapter, samples, store, cal = internvl_run
    data, rows, _ = _check_rows(adapter, samples, store, cal, lambda n: n - 1 if n > 1 else None)
    for row, p in zip(rows, data.picked):
        boxes = row["tile_boxes"]
        if len(boxes) > 1:  # the crops tile the picture without overlap; the thumbnail covers it
            crops = boxes[:-1]
            area = float(np.sum((crops[:, 2] - crops[:, 0]) * (crops[:, 3] - crops[:, 1])))
            h, w = row["size"]
            assert area == pytest.approx(h * w) and boxes[-1].tolist() == [0.0, 0.0, float(h), float(w)]


def test_evaluation_kept_lists_on_multi_tile_stores(next_run, internvl_run, tmp_path):
    """An evaluation's kept lists (indices over every visual token, separators included) are drawn for the store's
    samples without their separators; evaluation-only samples are placed when the store's layout says how (InternVL's
    equal raster tiles), and listed as not drawn otherwise (LLaVA-NeXT's newlines)."""
    from posbias.profiler.store import ProfileStore
    from posbias.reports.data import collect
    from posbias.reports.pictures import picture_rows

    for (adapter, _, store, cal), placed in ((next_run, False), (internvl_run, True)):
        with ProfileStore(store) as s:
            sid, n0 = s.sample_ids[0], int(s.n_visual[0])
            sep0 = s.sample_token_separator(0)
        kept_store = sorted(set(range(0, n0, 3)) | set(np.flatnonzero(sep0).tolist()))
        per_tile = int(np.prod(adapter.arch.tile_grid)) if placed else 7
        other = "embedded:rocket/pope-rocket"
        per_sample = [{"id": sid, "method": "posprune", "keep": KEEP, "kl": 0.1, "kept": kept_store, "n_visual": n0},
                      {"id": other, "method": "posprune", "keep": KEEP, "kl": 0.1, "kept": [0, 2, 5],
                       "n_visual": 3 * per_tile}]
        doc = {"schema": "posbias.evaluation", "schema_version": 1,
               "results": [{"method": "posprune", "keep": KEEP, "kl_mean": 0.1}], "per_sample": per_sample}
        ev = tmp_path / f"ev-{placed}.json"
        ev.write_text(json.dumps(doc))
        data = collect(store, cal, ev, n_pictures=3)
        rows, methods, _ = picture_rows(data, KEEP)
        assert "posprune" in methods
        first = next(r for r, p in zip(rows, data.picked) if p.id == sid)
        drawn = np.asarray(first["kept"]["posprune"])
        assert np.isfinite(first["cells"][drawn[~sep0[drawn]]]).all() and np.isnan(first["cells"][drawn[sep0[drawn]]]).all()
        ids = [p.id for p in data.picked]
        if placed:
            row = rows[ids.index(other)]
            assert len(row["tile_boxes"]) == 3 and row["overview_tile"] == 2
            assert not any("evaluation-only" in what for what, _ in data.missing)
        else:
            assert other not in ids and any("evaluation-only" in what for what, _ in data.missing)


def test_multi_tile_report_renders_legibly(next_run, internvl_run, tmp_path):
    from posbias.reports.html import render_report
    from posbias.reports.legibility import report_figure_problems

    for name, (_, _, store, cal) in (("next", next_run), ("ivl", internvl_run)):
        res = report_figure_problems(store, cal)
        assert "pictures" in res.pop("_figures")
        assert not res["pictures"], res["pictures"]
        html = tmp_path / f"{name}.html"
        render_report(store, cal, html)
        text = html.read_text(encoding="utf-8")
        assert 'id="fig-pictures"' in text and "not drawn for any-resolution layouts" not in text
        assert "overview tile" in text  # the section's text says what the small row is
