"""Qwen2-VL (real ``Qwen2VLForConditionalGeneration``, tiny config): what differs from Qwen2.5-VL (no vision
windows), and every stage end to end: profile with every signal, fit, utr, solve, each pruning method applied
from the calibration, evaluate, report. The keep-all and end-to-end tests also run on Qwen3-VL, which shares the
layout (its own tests: tests/test_qwen3_vl.py)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

import posbias.runtime as rt
from posbias.models.registry import architecture_of
from posbias.cli import main
from posbias.profiler.signals import SignalCapture


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _eager_column_mean(adapter, inputs, block: int) -> torch.Tensor:
    """(N,) mean attention each patch receives at vision block ``block``, from transformers' eager kernel."""
    visual = adapter.vision_tower()
    mod = importlib.import_module(type(visual).__module__)
    seen = {}
    hook = visual.blocks[block].attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        hook.remove()
    attn = visual.blocks[block].attn
    with torch.no_grad():
        n = seen["x"].shape[0]
        q, k, v = attn.qkv(seen["x"]).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = mod.apply_rotary_pos_emb_vision(q, k, *seen["pe"])
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        _, weights = mod.eager_attention_forward(attn, q, k, v, None, scaling=attn.scaling)  # (1, H, N, N)
    return weights[0].mean(dim=(0, 1))  # (N,)


def test_vision_importance_is_last_block_column_mean_in_raster_order(tiny_qwen2_adapter, noise_image):
    adapter = tiny_qwen2_adapter
    assert getattr(adapter.vision_tower().config, "window_size", None) is None  # no windows in Qwen2-VL
    inputs = adapter.prepare(noise_image, "what is this?")
    layout = adapter.layout(inputs)
    got = SignalCapture(adapter, signals="vision_importance").run(inputs, layout).token_data["vision_importance"]
    col = _eager_column_mean(adapter, inputs, len(adapter.vision_tower().blocks) - 1)  # (N,) processor order
    expected = col.reshape(-1, 4).mean(dim=1).numpy()  # (V,) 4 patches per merged token, raster order
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # an earlier block gives another map: the choice of block matters
    other = _eager_column_mean(adapter, inputs, 0).reshape(-1, 4).mean(dim=1).numpy()
    assert not np.allclose(other, expected, atol=1e-6)
    # the runtime's ARP importance (recomputed from the tower's projections) equals the stored signal
    from posbias.runtime.vision import VisionImportance

    vi = VisionImportance(architecture_of(adapter.model))
    vi.attach()
    try:
        with torch.no_grad():
            adapter.vision_tower()(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        runtime = vi.importance.numpy()
    finally:
        vi.detach()
    np.testing.assert_allclose(runtime, got, atol=1e-5, rtol=0)
    assert architecture_of(adapter.model).model_type == "qwen2_vl"


#: (fixture, CLI alias, adapter name, pixels per merged token) of the M-RoPE models without vision windows
QWEN_GLOBAL = [("tiny_qwen2_adapter", "tiny-qwen2-vl", "qwen2_vl", 28),
               ("tiny_qwen3_adapter", "tiny-qwen3-vl", "qwen3_vl", 32)]


@pytest.mark.parametrize("fixture", ["tiny_qwen2_adapter", "tiny_qwen3_adapter"])
def test_generate_with_keep_all_equals_unpruned(fixture, noise_image, request):
    """Keeping every token reproduces transformers' own generation (for Qwen3-VL, with the deepstack additions
    made by the pruner's layer hooks instead of the decoder)."""
    from tests.test_pruning import make_calibration

    ad = request.getfixturevalue(fixture)
    inputs = ad.prepare(noise_image, "what is in the image")
    cal = make_calibration(ad)
    n_visual = ad.layout(inputs).n_visual

    def gen():
        with torch.no_grad():
            out = ad.model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits)

    ref_seq, ref_logits = gen()
    for method in ("fastv", "pore", "posprune-pbc", "adaptprune"):
        with rt.enable_pruning(ad.model, cal, method=method, keep=n_visual, layer=1) as p:
            seq, logits = gen()
        assert p.last.kept.tolist() == list(range(n_visual)), method
        assert torch.equal(seq, ref_seq), method
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    with rt.enable_pruning(ad.model, cal, method="utp", schedule=[n_visual] * ad.n_layers) as p:
        seq, _ = gen()
    assert torch.equal(seq, ref_seq) and p.last.stages == []


@pytest.mark.filterwarnings("ignore::posbias.runtime.quality.CalibrationQualityWarning")  # 3 samples: weak fits
@pytest.mark.parametrize("fixture,alias,name,unit", QWEN_GLOBAL)
def test_every_stage_end_to_end(tmp_path, capsys, request, fixture, alias, name, unit):
    from posbias.artifacts.calibration import Calibration
    from posbias.evaluate import EvaluationConfig, evaluate
    from posbias.profiler.store import ProfileStore

    run = tmp_path / "run"
    code, _, err = _run(["profile", "--model", alias, "--n", "3", "--out", str(run), "--no-progress",
                         "--signals", "all"], capsys)
    assert code == 0, err
    store, cal_path = run / "profile.h5", run / "cal.json"
    with ProfileStore(store) as view:
        assert view.attrs["adapter"] == name and view.rope_dims == 3
        assert {"attn_pa", "vision_importance"} <= set(view.signal_names()["tokens"])  # every signal defined
        assert view.n_samples == 3
    assert _run(["fit", "--store", str(store), "--out", str(cal_path)], capsys)[0] == 0
    code, out, err = _run(["utr", "--store", str(store), "--no-progress"], capsys)
    assert code == 0 and "computed 3" in out, err
    code, out, err = _run(["solve", "--store", str(store), "--ratios", "2", "--into", str(cal_path)], capsys)
    assert code == 0 and "status=optimal" in out, err
    cal = Calibration.load(cal_path)
    assert cal.model["adapter"] == name
    assert set(cal.to_dict()["methods"]) >= {"fastv", "pore", "posprune-pbc", "adaptprune-gaussian"}

    ad = request.getfixturevalue(fixture)
    assert cal.model["fingerprint"] == ad.fingerprint()
    from PIL import Image

    with ProfileStore(store) as view:
        n_visual = int(view.n_visual[0])  # the solved UTP schedule is for this token count
        rows, cols = (int(x) for x in view.grids[0])
    pixels = (rows * unit, cols * unit, 3)  # an image the processor maps onto the same merged grid
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, pixels, dtype=np.uint8))
    inputs = ad.prepare(image, "what is in the image")
    assert ad.layout(inputs).n_visual == n_visual
    for method in ("fastv", "pore", "posprune-pbc", "posprune", "adaptprune", "utp"):
        with rt.enable_pruning(ad.model, cal, method=method, keep=4, force=True) as p:
            with torch.no_grad():
                ad.model(**inputs, use_cache=False, logits_to_keep=1)
        kept = p.last.kept
        assert 0 < kept.shape[0] <= n_visual and int(kept.max()) < n_visual, method
        assert bool((kept[1:] > kept[:-1]).all()), method

    # (UTP's solved schedule fits one token count; the evaluation samples have other image sizes)
    cfg = EvaluationConfig(methods=["fastv", "posprune-pbc", "adaptprune"], keeps=[10], n=2, max_new_tokens=2)
    doc = evaluate(ad, cal, cfg, calibration_path=cal_path)
    assert {r["method"] for r in doc["results"]} == {"fastv", "posprune-pbc", "adaptprune"}
    assert all(0.0 < r["flops_ratio"] < 1.0 and r["kl_mean"] >= 0.0 for r in doc["results"])
    ev = run / "evaluation.json"
    ev.write_text(json.dumps(doc))

    html = run / "report.html"
    code, _, err = _run(["report", "--store", str(store), "--calibration", str(cal_path), "--html", str(html)],
                        capsys)
    assert code == 0, err
    text = html.read_text()
    assert "data:image/png;base64," in text and name in text


@pytest.mark.slow
@pytest.mark.parametrize("alias,name", [("demo-qwen2-vl", "qwen2_vl"), ("demo-qwen3-vl", "qwen3_vl")])
def test_demo_qwen_cli_run(tmp_path, capsys, alias, name):
    """The demo model (SmolLM2 decoder inside Qwen2-VL / Qwen3-VL) through the whole default run, two samples."""
    out = tmp_path / "q"
    code, stdout, err = _run(["--model", alias, "--n", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    doc = json.loads((out / "posbias_calibration.json").read_text())
    assert doc["model"]["adapter"] == name and doc["model"]["n_layers"] == 30
    assert (out / "report.html").stat().st_size > 10_000
    if name == "qwen3_vl":  # SmolLM2 under added q/k norms: the build records how far it still agrees
        from posbias.models.demo import demo_folder

        check = json.loads((demo_folder(alias) / "posbias_demo.json").read_text())["decoder_vs_smollm2"]
        assert 0.0 < check["top1_agreement"] < 1.0 and check["kl_nats"] > 0.0


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from posbias.errors import PosbiasError
    from posbias.models.registry import load_adapter

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(PosbiasError) as info:
        load_adapter(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "'mllama'" in msg
    assert all(name in msg for name in ("llava", "llava_next", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "internvl"))


def test_qwen2_vl_hub_alias_fails_fast_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from posbias.errors import ModelUnavailableError
    from posbias.models.registry import load_adapter

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for alias, repo in (("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct"), ("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct"),
                        ("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct")):
        with pytest.raises(ModelUnavailableError) as info:
            load_adapter(alias, cache_dir=tmp_path)
        msg = str(info.value)
        assert "\n" not in msg and f"'{alias}' ({repo})" in msg and "model=/path/to/checkpoint" in msg
