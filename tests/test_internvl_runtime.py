"""Pruning inside a tiny InternVL: every method from a calibration, original positions, KV cache, generate equal to
the unpruned model when every token is kept, and spatial methods that stay inside each tile (crops + thumbnail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import posbias.runtime as rt
from tests.test_llava_next_runtime import _manual_prefill

METHODS_CAL = ("fastv", "pore", "posprune-pbc", "adaptprune")


@pytest.fixture(scope="module")
def ivl(tiny_internvl_adapter):
    from tests.test_pruning import make_calibration

    ad = tiny_internvl_adapter
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 120, 3), dtype=np.uint8))
    inputs = ad.prepare(image, "what is in the image")  # 2x2 crops + thumbnail = 5 tiles of 2x2 tokens
    return ad, inputs, ad.layout(inputs), make_calibration(ad)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits[0, -1]  # (vocab,)


def test_layout_is_five_tiles_with_the_thumbnail_as_overview(ivl):
    _, _, layout, _ = ivl
    assert layout.n_tiles == 5 and layout.overview == 4 and layout.n_visual == 20
    assert not layout.separator.any()


def test_keep_all_reproduces_generate(ivl):
    ad, inputs, layout, cal = ivl
    greedy = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = ad.model.generate(**inputs, **greedy)
    for method in METHODS_CAL:
        with rt.enable_pruning(ad.model, cal, method=method, keep=layout.n_visual, layer=1) as p, torch.no_grad():
            out = ad.model.generate(**inputs, **greedy)
        assert p.last.kept.tolist() == list(range(layout.n_visual)), method
        assert torch.equal(out.sequences, ref.sequences), method
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)


def test_every_method_keeps_the_budget_and_generates(ivl):
    ad, inputs, layout, cal = ivl
    for method in METHODS_CAL + ("posprune",):
        with rt.enable_pruning(ad.model, cal, method=method, keep=6) as p:
            _logits(ad.model, inputs)
            with torch.no_grad():
                out = ad.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        kept = p.last.kept.tolist()
        assert kept == sorted(set(kept)) and len(kept) == 6 and max(kept) < layout.n_visual, method
        n_prompt = layout.seq_len
        lens = [int(out.past_key_values.layers[i].keys.shape[-2]) for i in range(ad.n_layers)]
        if method == "posprune":  # ARP prunes on the vision side, before the first decoder layer
            assert lens[0] < n_prompt + 1, method
        else:
            assert lens[0] == n_prompt + 1, method  # layers before the cut hold every prompt token
        assert lens[-1] == n_prompt - layout.n_visual + 6 + 1, method  # after it, only the kept ones


def test_pruned_prefill_keeps_original_positions(ivl):
    """The pruned forward equals the decoder run by hand on the kept tokens with their original RoPE angles."""
    ad, inputs, layout, cal = ivl
    with rt.enable_pruning(ad.model, cal, method="fastv", keep=6, layer=1) as p:
        got = _logits(ad.model, inputs)
    kept = p.last.kept
    seq = torch.ones(layout.seq_len, dtype=torch.bool)
    vis = torch.as_tensor(layout.visual_index)
    seq[vis] = False
    seq[vis[kept]] = True
    ref = _manual_prefill(ad.model, inputs, torch.nonzero(seq).flatten())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_soft_nms_never_suppresses_across_tiles(ivl):
    """A window covering a whole tile with no decay damping silences the pick's own tile only: keep = 5 puts one
    pick in each of the five tiles."""
    ad, inputs, layout, cal = ivl
    params = {"window": 21, "sigma_d": 1e4, "sigma_s": 1e4, "gaussian": False}
    with rt.enable_pruning(ad.model, cal, method="adaptprune", keep=5, params=params) as p:
        _logits(ad.model, inputs)
    assert sorted(int(layout.tile[i]) for i in p.last.kept.tolist()) == [0, 1, 2, 3, 4]


def test_arp_importance_equals_the_stored_signal(ivl):
    from posbias.profiler.signals import SignalCapture

    ad, inputs, layout, cal = ivl
    stored = SignalCapture(ad, signals="vision_importance").run(inputs, layout).token_data["vision_importance"]
    with rt.enable_pruning(ad.model, cal, method="posprune", keep=6) as p:
        _logits(ad.model, inputs)
    np.testing.assert_allclose(p.last.vision_importance.numpy(), stored, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::posbias.runtime.quality.CalibrationQualityWarning")  # 3 samples: weak fits
def test_every_stage_end_to_end(tmp_path, capsys, tiny_internvl_adapter):
    """profile (all signals) -> fit -> utr -> solve -> every method from the calibration -> evaluate -> report on
    tiny-internvl."""
    import json

    from posbias.artifacts.calibration import Calibration
    from posbias.cli import main
    from posbias.data.registry import iter_samples, resolve_sources
    from posbias.evaluate import EvaluationConfig, evaluate
    from posbias.profiler.store import ProfileStore

    run = tmp_path / "run"
    assert main(["profile", "--model", "tiny-internvl", "--n", "3", "--out", str(run), "--no-progress",
                 "--signals", "all"]) == 0, capsys.readouterr().err
    store, cal_path = run / "profile.h5", run / "cal.json"
    assert main(["fit", "--store", str(store), "--out", str(cal_path)]) == 0, capsys.readouterr().err
    assert main(["utr", "--store", str(store), "--no-progress"]) == 0, capsys.readouterr().err
    assert main(["solve", "--store", str(store), "--ratios", "2", "--into", str(cal_path)]) == 0
    assert "status=optimal" in capsys.readouterr().out
    cal = Calibration.load(cal_path)
    ad = tiny_internvl_adapter
    assert cal.model["adapter"] == "internvl" and cal.model["fingerprint"] == ad.fingerprint()
    assert cal.method("posprune-pbc")["domain"] == "normalized"  # multi-tile: position along the visual run
    with ProfileStore(store) as view:
        assert view.multi_tile and int(view.n_tiles.max()) > 1
        n_visual = int(view.n_visual[0])  # the solved UTP schedule is for this sample's token count
        sid = view.sample_ids[0]
    item = next(s for s in iter_samples(resolve_sources(["embedded"]), n=3, seed=0) if s.id == sid)
    inputs = ad.prepare(item.image, item.question)
    assert ad.layout(inputs).n_visual == n_visual
    for method in ("fastv", "pore", "posprune-pbc", "posprune", "adaptprune", "utp"):
        with rt.enable_pruning(ad.model, cal, method=method, keep=4, force=True) as p:
            _logits(ad.model, inputs)
        kept = p.last.kept
        assert 0 < kept.shape[0] < n_visual and int(kept.max()) < n_visual, method
        assert bool((kept[1:] > kept[:-1]).all()), method
    cfg = EvaluationConfig(methods=["fastv", "pore", "adaptprune"], keeps=[6], n=2, max_new_tokens=2)
    doc = evaluate(ad, cal, cfg, calibration_path=cal_path)
    assert {r["method"] for r in doc["results"]} == {"fastv", "pore", "adaptprune"}
    assert all(0.0 < r["flops_ratio"] < 1.0 and r["kl_mean"] >= 0.0 for r in doc["results"])
    ev = run / "evaluation.json"
    ev.write_text(json.dumps(doc))
    html = run / "report.html"
    assert main(["report", "--store", str(store), "--calibration", str(cal_path), "--html", str(html),
                 "--evaluation", str(ev)]) == 0, capsys.readouterr().err
    text = html.read_text()
    assert "data:image/png;base64," in text and "internvl" in text and "any resolution" in text
