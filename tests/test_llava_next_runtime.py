"""Pruning inside a tiny LLaVA-NeXT: every method, newline separators always kept, original positions, KV cache,
generate, and spatial methods that never cross the boundary between the base image and the high-resolution tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import posbias.runtime as rt
from posbias.errors import PosbiasError

METHODS_CAL = ("fastv", "pore", "posprune-pbc", "adaptprune")


@pytest.fixture(scope="module")
def nxt(noise_image):
    from tests.test_pruning import make_calibration

    from posbias.models.tiny import tiny_llava_next

    ad = tiny_llava_next(seed=0)
    inputs = ad.prepare(noise_image, "what is in the image")  # 100x150: 4x4 base + 6x8 raster + 6 newlines
    return ad, inputs, ad.layout(inputs), make_calibration(ad)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits[0, -1]  # (vocab,)


def _sep_index(layout) -> list[int]:
    return np.flatnonzero(layout.separator).tolist()


def test_keep_all_grid_tokens_reproduces_generate(nxt):
    ad, inputs, layout, cal = nxt
    n_grid = layout.n_visual - int(layout.separator.sum())

    greedy = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = ad.model.generate(**inputs, **greedy)
    for method in METHODS_CAL:
        with rt.enable_pruning(ad.model, cal, method=method, keep=n_grid, layer=1) as p, torch.no_grad():
            out = ad.model.generate(**inputs, **greedy)
        assert p.last.kept.tolist() == list(range(layout.n_visual)), method  # separators included
        assert torch.equal(out.sequences, ref.sequences), method
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    with rt.enable_pruning(ad.model, cal, method="utp", schedule=[layout.n_visual] * ad.n_layers) as p:
        with torch.no_grad():
            seq = ad.model.generate(**inputs, **greedy).sequences
    assert torch.equal(seq, ref.sequences) and p.last.stages == []
    # the budget counts grid tokens: one more than there are is refused before any compute
    with pytest.raises(PosbiasError, match=str(n_grid)):
        with rt.enable_pruning(ad.model, cal, method="fastv", keep=n_grid + 1):
            _logits(ad.model, inputs)


def test_every_method_keeps_the_separators_and_the_budget(nxt):
    ad, inputs, layout, cal = nxt
    seps = set(_sep_index(layout))
    for method in METHODS_CAL + ("posprune",):
        with rt.enable_pruning(ad.model, cal, method=method, keep=5) as p:
            _logits(ad.model, inputs)
        kept = p.last.kept.tolist()
        assert kept == sorted(set(kept)) and max(kept) < layout.n_visual, method
        assert seps <= set(kept), method  # newlines are never pruned
        assert len(set(kept) - seps) == 5, method  # the budget is over the grid tokens


def decoder_call(model, inputs) -> dict:
    """The keyword arguments the VLM hands its decoder (``inputs_embeds``, positions, ...) for ``inputs``."""
    lm = model.model.language_model
    captured = {}
    h = lm.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        h.remove()
    return captured


def _manual_prefill(model, inputs, kept_seq):
    """Reference: the decoder run by hand, dropping tokens after layer 1 by plain indexing, original RoPE angles."""
    lm = model.model.language_model
    captured = decoder_call(model, inputs)
    with torch.no_grad():
        x = captured["inputs_embeds"]
        cos, sin = lm.rotary_emb(x, torch.arange(x.shape[1])[None])
        for i, layer in enumerate(lm.layers):
            if i == 2:
                x, cos, sin = x[:, kept_seq], cos[:, kept_seq], sin[:, kept_seq]
            x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=None)
        return model.lm_head(lm.norm(x))[0, -1]


def test_pruned_prefill_keeps_original_positions_and_cache(nxt):
    ad, inputs, layout, cal = nxt
    n_prompt = layout.seq_len
    with rt.enable_pruning(ad.model, cal, method="fastv", keep=5, layer=1) as p:
        got = _logits(ad.model, inputs)
        kept = p.last.kept
        with torch.no_grad():
            out = ad.model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    seq = torch.ones(n_prompt, dtype=torch.bool)
    vis = torch.as_tensor(layout.visual_index)
    seq[vis] = False
    seq[vis[kept]] = True
    ref = _manual_prefill(ad.model, inputs, torch.nonzero(seq).flatten())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    n_kept = 5 + len(_sep_index(layout))
    assert p.last.tokens_per_layer == [n_prompt, n_prompt, n_prompt - layout.n_visual + n_kept]
    lens = [int(out.past_key_values.layers[i].keys.shape[-2]) for i in range(ad.n_layers)]
    assert lens[0] == n_prompt + 2 and lens[2] == n_prompt - layout.n_visual + n_kept + 2


def test_arp_blocks_stay_inside_each_tile(nxt):
    """ARP (PosPrune) allots its block quotas on each tile's own grid: what it keeps per tile is that tile's quota."""
    from posbias.runtime.methods import arp_quota

    ad, inputs, layout, cal = nxt
    with rt.enable_pruning(ad.model, cal, method="posprune", keep=4) as p:
        _logits(ad.model, inputs)
    stages = dict(p.last.stages)
    want = 0
    for t, grid in enumerate(layout.tiles):
        cell = (layout.tile == t) & ~layout.separator
        rows, cols = torch.as_tensor(layout.rows[cell]), torch.as_tensor(layout.cols[cell])
        _, quota = arp_quota(rows, cols, grid, blocks=6, centre_ratio=0.25, edge_ratio=0.5)
        want += int(quota.sum())
    assert stages[-1] == want  # stages count grid tokens (the budget's unit); the newlines stay besides


def test_soft_nms_never_suppresses_across_tiles(nxt):
    """With a window covering a whole tile and no decay damping, one pick silences its own tile only: the two
    picks of keep = 2 land one in each tile."""
    ad, inputs, layout, cal = nxt
    params = {"window": 21, "sigma_d": 1e4, "sigma_s": 1e4, "gaussian": False}
    with rt.enable_pruning(ad.model, cal, method="adaptprune", keep=2, params=params) as p:
        _logits(ad.model, inputs)
    grid_kept = [i for i in p.last.kept.tolist() if not layout.separator[i]]
    assert sorted(int(layout.tile[i]) for i in grid_kept) == [0, 1]


@pytest.mark.parametrize("hw", [(100, 150), (56, 56), (60, 200), (200, 61), (300, 500)])
def test_generate_layout_from_encoder_outputs_equals_image_sizes(nxt, make_noise_image, hw):
    """Inside generate the model gets the encoder outputs, not image_sizes: the layout recovered from them is the
    one image_sizes gives (56x56 sits on 1x2 crops, whose unpadded raster also fits 2x1: the projector decides)."""
    ad = nxt[0]
    inputs = ad.prepare(make_noise_image(*hw, seed=4), "what is this?")
    want = ad.plan(inputs)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("enc", kwargs.get("mm_encoder_outputs"))

    hook = ad.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            ad.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    if not seen.get("enc"):  # transformers before mm_encoder_outputs: generate hands the prefill image_sizes itself
        pytest.skip("this transformers passes pixel_values and image_sizes to generate's prefill, not encoder outputs")
    got = ad.arch.plan_from_encoder(seen["enc"]["image"])
    assert got.crops == want.crops and got.kept == want.kept
    np.testing.assert_array_equal(got.source, want.source)


def test_arp_importance_equals_the_stored_signal_also_in_generate(nxt):
    from posbias.profiler.signals import SignalCapture

    ad, inputs, layout, cal = nxt
    stored = SignalCapture(ad, signals="vision_importance").run(inputs, layout).token_data["vision_importance"]
    with rt.enable_pruning(ad.model, cal, method="posprune", keep=5) as p:
        _logits(ad.model, inputs)
        direct = p.last.vision_importance.numpy()
        with torch.no_grad():
            ad.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        in_generate = p.last.vision_importance.numpy()
        kept = set(p.last.kept.tolist())
    for got in (direct, in_generate):
        np.testing.assert_array_equal(np.isnan(got), layout.separator)
        np.testing.assert_allclose(got[~layout.separator], stored[~layout.separator], atol=1e-5, rtol=0)
    assert set(_sep_index(layout)) <= kept and len(kept - set(_sep_index(layout))) == 5


def test_pruner_scores_the_stored_attention_row(nxt, tmp_path):
    """Fit side = apply side: the row the pruner ranks is /tokens/attn of the grid tokens (newlines left out)."""
    from posbias.data.base import Sample
    from posbias.profiler.run import profile_samples
    from posbias.profiler.signals import SignalCapture
    from posbias.profiler.store import ProfileStore

    ad, inputs, layout, cal = nxt
    image = __import__("PIL.Image", fromlist=["Image"]).fromarray(
        np.random.default_rng(9).integers(0, 256, (150, 100, 3), dtype=np.uint8))
    sample = Sample(id="t:0", source="t", image=image, question="what is in the image")
    path = tmp_path / "profile.h5"
    profile_samples(ad, [sample], path, seed=0, progress=False, capture=SignalCapture(ad, signals="attn"))
    inputs = ad.prepare(image, sample.question)
    grid_tok = ~ad.layout(inputs).separator
    with ProfileStore(path) as store:
        stored = store.sample_attn(0)  # (V, L)
    for layer in range(ad.n_layers - 1):
        with rt.enable_pruning(ad.model, method="fastv", keep=6, layer=layer) as p:
            _logits(ad.model, inputs)
        row = p.last.scoring_rows[layer].numpy()  # (V_grid,)
        np.testing.assert_allclose(row, stored[grid_tok, layer], atol=1e-5, rtol=0)
        top = np.flatnonzero(grid_tok)[np.sort(np.argsort(-stored[grid_tok, layer], kind="stable")[:6])]
        np.testing.assert_array_equal(np.setdiff1d(p.last.kept.numpy(), np.flatnonzero(~grid_tok)), top)


@pytest.mark.filterwarnings("ignore::posbias.runtime.quality.CalibrationQualityWarning")  # 3 samples: weak fits
def test_every_stage_end_to_end(tmp_path, capsys, nxt):
    """profile (all signals) -> fit -> utr -> solve -> every method from the calibration -> evaluate (with the
    position probe's geometry) on tiny-llava-next."""
    from posbias.artifacts.calibration import Calibration
    from posbias.cli import main
    from posbias.evaluate import EvaluationConfig, evaluate
    from posbias.profiler.store import ProfileStore

    run = tmp_path / "run"
    assert main(["profile", "--model", "tiny-llava-next", "--n", "3", "--out", str(run), "--no-progress",
                 "--signals", "all"]) == 0, capsys.readouterr().err
    store, cal_path = run / "profile.h5", run / "cal.json"
    assert main(["fit", "--store", str(store), "--out", str(cal_path)]) == 0, capsys.readouterr().err
    assert main(["utr", "--store", str(store), "--no-progress"]) == 0, capsys.readouterr().err
    assert main(["solve", "--store", str(store), "--ratios", "2", "--into", str(cal_path)]) == 0
    out = capsys.readouterr().out
    assert "status=optimal" in out
    cal = Calibration.load(cal_path)
    ad = nxt[0]
    assert cal.model["adapter"] == "llava_next" and cal.model["fingerprint"] == ad.fingerprint()
    with ProfileStore(store) as view:
        n_visual = int(view.n_visual[0])  # the solved UTP schedule is for this sample's token count
        sid = view.sample_ids[0]
    from posbias.data.registry import iter_samples, resolve_sources

    item = next(s for s in iter_samples(resolve_sources(["embedded"]), n=3, seed=0) if s.id == sid)
    inputs = ad.prepare(item.image, item.question)
    layout = ad.layout(inputs)
    assert layout.n_visual == n_visual
    for method in ("fastv", "pore", "posprune-pbc", "posprune", "adaptprune", "utp"):
        with rt.enable_pruning(ad.model, cal, method=method, keep=4, force=True) as p:
            _logits(ad.model, inputs)
        kept = p.last.kept
        assert bool((kept[1:] > kept[:-1]).all()) and int(kept.max()) < n_visual, method
        assert set(_sep_index(layout)) <= set(kept.tolist()), method
    cfg = EvaluationConfig(methods=["fastv", "posprune-pbc", "adaptprune"], keeps=[10], n=2, max_new_tokens=2)
    doc = evaluate(ad, cal, cfg, calibration_path=cal_path)
    assert {r["method"] for r in doc["results"]} == {"fastv", "posprune-pbc", "adaptprune"}
    assert all(0.0 < r["flops_ratio"] < 1.0 and r["kl_mean"] >= 0.0 for r in doc["results"])
