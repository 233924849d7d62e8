"""Pruning inside real (tiny, random) LLaVA, Qwen2.5-VL and Qwen2-VL models: exactness, positions, cache, generate, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import posbias.runtime as rt
from posbias.artifacts import Calibration, fastv_entry, model_fingerprint, pbc_entry, pore_entry
from posbias.errors import FingerprintMismatchError, PosbiasError
from posbias.fitters import ExponentialBiasFitter, PolynomialBiasFitter

METHODS_CAL = ("fastv", "pore", "posprune-pbc", "adaptprune")


def make_calibration(adapter, *, grid=None, domain="normalized", schedules=None) -> Calibration:
    """A valid calibration for ``adapter``'s model with synthetic (but fitted) curves."""
    rng = np.random.default_rng(0)
    x = np.tile(np.linspace(0, 1, 50, endpoint=False), 20)  # (1000,) normalized positions
    pore = ExponentialBiasFitter(domain=domain).fit(x, 1e-3 * np.exp(2 * x) * rng.uniform(0.8, 1.2, x.size)).to_dict()
    pbc = PolynomialBiasFitter(degree=3, domain=domain).fit(x, 1e-3 * x ** 3 + rng.normal(0, 1e-5, x.size)).to_dict()
    n_layers = adapter.n_layers
    gauss = {
        "layer": 1,
        "grid": list(grid) if grid else None,
        "coords": "u, v = linspace(-1, 1)",
        "fit": {"class": "GaussianCentreFitter", "params": {"sigma": "default"},
                "learned": {"sigma_": 1.0, "amplitude_": 1e-3, "offset_": 0.0, "centre_peak_": True, "r2_": 0.5,
                            "rmse_": 1e-4, "r2_default_": 0.5, "n_samples_": 20, "n_points_": 1000, "n_excluded_": 0}},
        "goodness": {"r2": 0.5, "rmse": 1e-4, "n_samples": 20},
    }
    doc = Calibration.new(
        model={"id": adapter.model_id, "revision": None, "fingerprint": model_fingerprint(adapter.model.config.to_dict()),
               "adapter": adapter.name, "n_layers": n_layers, "rope_dims": adapter.rope_dims,
               "grid": list(grid) if grid else None},
        store={"file": "profile.h5", "n_samples": 20, "n_skipped": 0, "sources": {"embedded": 20}, "seed": 0},
        methods={"fastv": fastv_entry(1), "pore": pore_entry(pore, layer=1),
                 "posprune-pbc": pbc_entry(pbc, shallow_layer=1, deep_layer=2), "adaptprune-gaussian": gauss},
        defaults={"method": "posprune-pbc", "layer": 1, "keep": 4},
        created="2026-11-22T00:00:00Z",
    ).to_dict()
    if schedules is not None:
        doc["schedules"] = schedules
    return Calibration.from_dict(doc)


@pytest.fixture(scope="module")
def llava(tiny_llava_adapter, noise_image):
    ad = tiny_llava_adapter
    inputs = ad.prepare(noise_image, "what is in the image")
    return ad, inputs, make_calibration(ad, grid=(4, 4))


@pytest.fixture(scope="module")
def qwen(tiny_qwen_adapter, noise_image):
    ad = tiny_qwen_adapter
    inputs = ad.prepare(noise_image, "what is in the image")
    return ad, inputs, make_calibration(ad)


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2_adapter, noise_image):
    ad = tiny_qwen2_adapter
    inputs = ad.prepare(noise_image, "what is in the image")
    return ad, inputs, make_calibration(ad)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits[0, -1]  # (vocab,)


@pytest.mark.parametrize("which", ["llava", "qwen", "qwen2"])
def test_keep_all_reproduces_logits_and_disable_restores(which, request):
    ad, inputs, cal = request.getfixturevalue(which)
    model = ad.model
    ref = _logits(model, inputs)
    n_visual = ad.layout(inputs).n_visual
    for method in ("fastv", "pore", "posprune-pbc", "adaptprune"):
        with rt.enable_pruning(model, cal, method=method, keep=n_visual, layer=1) as p:
            out = _logits(model, inputs)
            assert p.last is not None and p.last.kept.tolist() == list(range(n_visual))
        assert torch.equal(out, ref), method  # keep = V: nothing dropped, identical float ops
    with rt.enable_pruning(model, cal, method="fastv", keep=3, layer=1):
        pruned = _logits(model, inputs)
    assert not torch.allclose(pruned, ref)
    assert torch.equal(_logits(model, inputs), ref)  # disabled: bit-identical again


def _manual_prefill_positions(model, inputs, kept_seq):
    """Reference: run the decoder layers by hand, dropping tokens after layer 1 with plain indexing."""
    lm = model.model.language_model
    with torch.no_grad():
        captured = {}
        h = lm.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
        model(**inputs, use_cache=False)
        h.remove()
        x = captured["inputs_embeds"]
        pos = captured.get("position_ids")
        if pos is None:
            pos = torch.arange(x.shape[1])[None]
        if pos.ndim == 3 and pos.shape[0] == 4:
            pos = pos[1:]
        cos, sin = lm.rotary_emb(x, pos)
        for i, layer in enumerate(lm.layers):
            if i == 2:
                x = x[:, kept_seq]
                cos, sin = cos[:, kept_seq], sin[:, kept_seq]
            x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=None)
        return model.lm_head(lm.norm(x))[0, -1]


@pytest.mark.parametrize("which", ["llava", "qwen", "qwen2"])
def test_pruned_prefill_keeps_original_positions(which, request):
    ad, inputs, cal = request.getfixturevalue(which)
    model = ad.model
    layout = ad.layout(inputs)
    with rt.enable_pruning(model, cal, method="fastv", keep=5, layer=1) as p:
        got = _logits(model, inputs)
        kept = p.last.kept
    seq = torch.ones(layout.seq_len, dtype=torch.bool)
    vis = torch.as_tensor(layout.visual_index)
    seq[vis] = False
    seq[vis[kept]] = True
    ref = _manual_prefill_positions(model, inputs, torch.nonzero(seq).flatten())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # gathering positions matters: re-numbering the kept tokens 0..S'-1 gives different logits
    assert p.last.tokens_per_layer == [layout.seq_len, layout.seq_len, layout.seq_len - layout.n_visual + 5]


@pytest.mark.parametrize("which", ["llava", "qwen", "qwen2"])
def test_generate_continues_on_pruned_cache(which, request):
    ad, inputs, cal = request.getfixturevalue(which)
    model = ad.model
    n_prompt = inputs["input_ids"].shape[1]
    with rt.enable_pruning(model, cal, method="fastv", keep=4, layer=1) as p:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        kept = p.last.kept
        # the cache of layers after the pruning layer holds only the kept tokens
        cache = out.past_key_values
        n_text = n_prompt - ad.layout(inputs).n_visual
        lens = [int(cache.layers[i].keys.shape[-2]) for i in range(ad.n_layers)]
        assert lens[0] == lens[1] == n_prompt + 3 and lens[2] == n_text + 4 + 3
        first = _logits(model, inputs)
    torch.testing.assert_close(out.logits[0][0], first, rtol=1e-5, atol=1e-5)
    # reference decode: feed the generated tokens one by one through a hand-pruned forward without a cache
    layout = ad.layout(inputs)
    seq = torch.ones(n_prompt, dtype=torch.bool)
    vis = torch.as_tensor(layout.visual_index)
    seq[vis] = False
    seq[vis[kept]] = True
    gen = out.sequences[0, n_prompt:]
    for step in range(1, gen.shape[0]):
        ids = torch.cat([inputs["input_ids"], gen[None, :step]], dim=1)
        ext = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
        if "mm_token_type_ids" in ext:
            ext["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, step, dtype=torch.long)], 1)
        keep_seq = torch.cat([torch.nonzero(seq).flatten(), torch.arange(n_prompt, n_prompt + step)])
        ref = _manual_prefill_positions(model, ext, keep_seq)
        torch.testing.assert_close(out.logits[step][0], ref, rtol=1e-4, atol=1e-4)


def test_all_methods_run_and_keep_budget(llava, qwen, qwen2):
    for ad, inputs, cal in (llava, qwen, qwen2):
        model = ad.model
        n_visual = ad.layout(inputs).n_visual
        for method in METHODS_CAL:
            with rt.enable_pruning(model, cal, method=method, keep=4) as p:
                _logits(model, inputs)
            assert p.last.kept.shape == (4,) and bool((p.last.kept[1:] > p.last.kept[:-1]).all())
            assert int(p.last.kept.max()) < n_visual
        # posprune: ARP on the vision side, then PBC + MMR in the decoder
        with rt.enable_pruning(model, cal, method="posprune", keep=4) as p:
            _logits(model, inputs)
        stages = dict(p.last.stages)
        assert -1 in stages and stages[-1] < n_visual and p.last.kept.shape == (4,)
        assert p.last.tokens_per_layer[0] == ad.layout(inputs).seq_len - n_visual + stages[-1]


def test_utp_prunes_progressively(llava):
    ad, inputs, cal = llava
    model = ad.model
    with rt.enable_pruning(model, cal, method="utp", schedule=[16, 10, 6]) as p:
        _logits(model, inputs)
    assert p.last.stages == [(0, 10), (1, 6)]
    layout = ad.layout(inputs)
    assert p.last.tokens_per_layer == [layout.seq_len, layout.seq_len - 6, layout.seq_len - 10]
    # schedules from the calibration: the one whose ratio is nearest V / keep
    sched = {"2": {"ratio": 2.0, "formulation": "compact", "mode": "joint", "status": "optimal", "n_samples": 4,
                   "solve_seconds": 0.1, "schedule": [16, 12, 4]},
             "4": {"ratio": 4.0, "formulation": "compact", "mode": "joint", "status": "optimal", "n_samples": 4,
                   "solve_seconds": 0.1, "schedule": [16, 4, 4]}}
    cal2 = make_calibration(ad, grid=(4, 4), schedules=sched)
    with rt.enable_pruning(model, cal2, method="utp", keep=4) as p:
        _logits(model, inputs)
    assert p.last.stages == [(0, 4)]
    with pytest.raises(PosbiasError, match="schedule"):
        rt.enable_pruning(model, cal, method="utp", keep=4)


def test_errors_before_compute(llava):
    ad, inputs, cal = llava
    model = ad.model
    calls = []
    h = model.model.language_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        other = Calibration.from_dict({**cal.to_dict(), "model": {**cal.model, "fingerprint": "sha256:" + "0" * 16}})
        with pytest.raises(FingerprintMismatchError, match="fingerprint"):
            rt.enable_pruning(model, other, method="fastv", keep=4)
        d = cal.to_dict()
        del d["methods"]["pore"]
        with pytest.raises(PosbiasError, match="has no method 'pore'"):
            rt.enable_pruning(model, Calibration.from_dict(d), method="pore", keep=4)
        for keep in (0, -3, 17):
            with pytest.raises(PosbiasError, match="keep"):
                rt.enable_pruning(model, cal, method="fastv", keep=keep)
        for layer in (-1, 2, 7):
            with pytest.raises(PosbiasError, match="layer"):
                rt.enable_pruning(model, cal, method="fastv", keep=4, layer=layer)
        with pytest.raises(PosbiasError, match="unknown parameter"):
            rt.enable_pruning(model, cal, method="posprune", keep=4, params={"lambda": 0.5})
        with pytest.raises(PosbiasError, match="unknown pruning method"):
            rt.enable_pruning(model, cal, method="random", keep=4)
        with pytest.raises(PosbiasError, match="ARP"):
            rt.enable_pruning(model, cal, method="posprune", keep=16)
        assert not calls
        assert getattr(model, "_posbias_pruner", None) is None
    finally:
        h.remove()


def test_keep_above_dynamic_visual_count_fails_before_decoder(qwen):
    ad, inputs, cal = qwen
    model = ad.model
    calls = []
    h = model.model.language_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with rt.enable_pruning(model, cal, method="fastv", keep=21):
            with pytest.raises(PosbiasError, match="exceeds the 20 visual tokens"):
                _logits(model, inputs)
        assert not calls
    finally:
        h.remove()
