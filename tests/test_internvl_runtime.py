"""Pruning inside a tiny InternVL: every method from a calibration, original positions, KV cache, generate equal to
the unpruned model when every token is kept, and spatial methods that stay inside each tile (crops + thumbnail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import posbias.runtime as rt

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
    keep_seq = torch.nonzero(seq).flatten()
    lm = ad.model.model.language_model
    captured = {}
    with torch.no_grad():
        h = lm.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
        ad.model(**inputs, use_cache=False)
        h.remove()
        x = captured["inputs_embeds"]
        cos, sin = lm.rotary_emb(x, torch.arange(x.shape[1])[None])
        for i, layer in enumerate(lm.layers):
            if i == 2:
                x, cos, sin = x[:, keep_seq], cos[:, keep_seq], sin[:, keep_seq]
            x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=None)
        ref = ad.model.lm_head(lm.norm(x))[0, -1]
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
