"""Fidelity evaluation on the tiny LLaVA: document shape, disjointness, KL/agreement semantics, FLOPs."""

from __future__ import annotations

import json

import pytest
import torch

from posbias.errors import PosbiasError
from posbias.evaluate import (
    EvaluationConfig,
    calibration_sample_ids,
    evaluate,
    format_table,
    kl_divergence,
    layer_flops,
    prefill_flops,
    write_evaluation,
)
from posbias.evaluate.paired import VERDICTS, paired_comparisons, paired_stats
from tests.test_pruning import make_calibration

RESULT_KEYS = {"method", "keep", "n", "kl_mean", "kl_sem", "top1_agreement", "exact_agreement", "accuracy", "flops",
               "flops_ratio", "prefill_ms", "prefill_ms_full", "peak_mem_mib"}
SAMPLE_KEYS = {"id", "method", "keep", "kl", "top1_agree", "exact_agree", "kept"}


def test_kl_and_flops_formulas():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert kl_divergence(a, a) == 0.0
    p, q = torch.softmax(a.double(), 0), torch.softmax(torch.tensor([3.0, 2.0, 1.0]).double(), 0)
    assert kl_divergence(a, torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(float((p * (p / q).log()).sum()))
    assert layer_flops(576, 4096, 11008) == 4 * 576 * 4096**2 + 2 * 576**2 * 4096 + 2 * 576 * 4096 * 11008
    assert prefill_flops([10, 10, 4], 8, 16) == 2 * layer_flops(10, 8, 16) + layer_flops(4, 8, 16)


def test_evaluate_tiny_llava(tiny_llava_adapter, tmp_path):
    ad = tiny_llava_adapter
    cal = make_calibration(ad, grid=(4, 4))
    from posbias.data.registry import get_source

    src = get_source("embedded")
    excluded = [src.sample_id(i) for i in range(0, len(src), 2)]  # every other record "was calibrated on"
    cfg = EvaluationConfig(methods=["fastv", "posprune", "adaptprune"], keeps=[4, 16], n=3, max_new_tokens=3)
    with pytest.raises(PosbiasError, match="ARP"):
        evaluate(ad, cal, cfg, exclude_ids=excluded)  # keep 16 > the 8 tokens ARP leaves: fails before compute
    cfg.keeps = [4, 8]
    doc = evaluate(ad, cal, cfg, exclude_ids=excluded)
    assert doc["schema"] == "posbias.evaluation" and doc["schema_version"] == 1
    assert doc["n_samples"] == 3 and not set(doc["sample_ids"]) & set(excluded)
    assert {r["method"] for r in doc["results"]} == {"fastv", "posprune", "adaptprune"}
    for r in doc["results"]:
        assert RESULT_KEYS <= set(r) and r["n"] == 3
        assert 0.0 < r["flops_ratio"] < 1.0 and r["kl_mean"] >= 0.0
    assert len(doc["per_sample"]) == 3 * 3 * 2
    for s in doc["per_sample"]:
        assert SAMPLE_KEYS <= set(s) and len(s["kept"]) == s["keep"]
        if s["kl"] == 0.0:
            assert s["top1_agree"]
    # FLOPs fall with the budget
    fv = {r["keep"]: r["flops"] for r in doc["results"] if r["method"] == "fastv"}
    assert fv[4] < fv[8]
    out = write_evaluation(doc, tmp_path / "ev.json")
    assert json.loads(out.read_text())["results"] == doc["results"]
    table = format_table(doc)
    assert "fastv" in table and "verdict (KL)" in table and "fidelity to the full model" in table
    # every method is paired with FastV on the same samples and keep; FastV is the baseline
    assert doc["paired_baseline"] == "fastv" and "accuracy" in doc["measures"]
    for r in doc["results"]:
        if r["method"] == "fastv":
            assert r["paired"] is None
            continue
        pr = r["paired"]
        assert pr["baseline"] == "fastv" and pr["kl"]["n"] == 3 and pr["verdict"] in VERDICTS
        kl = {s["id"]: s["kl"] for s in doc["per_sample"] if s["method"] == r["method"] and s["keep"] == r["keep"]}
        base = {s["id"]: s["kl"] for s in doc["per_sample"] if s["method"] == "fastv" and s["keep"] == r["keep"]}
        assert pr["kl"]["mean"] == pytest.approx(sum(kl[i] - base[i] for i in kl) / 3)


def test_paired_statistics_decide_from_the_per_sample_differences():
    import numpy as np
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    lower = -0.05 + 0.02 * rng.standard_normal(40)  # KL consistently lower than FastV's: better
    st = paired_stats(lower, direction=-1)
    assert st["verdict"] == "better" and st["ci"][1] < 0 < 0.05 - st["p"]
    assert st["mean"] == pytest.approx(lower.mean()) and st["p"] == pytest.approx(wilcoxon(lower).pvalue)
    assert paired_stats(-lower, direction=-1)["verdict"] == "worse"
    assert paired_stats(-lower, direction=+1)["verdict"] == "better"  # agreement: higher is better
    noise = 0.02 * rng.standard_normal(40)
    st = paired_stats(noise, direction=-1)
    assert st["verdict"] == "not distinguishable" and st["ci"][0] < 0 < st["ci"][1]
    assert st["n_needed"] > 40  # a real but small effect would need more samples
    zeros = paired_stats(np.zeros(10), direction=+1)
    assert zeros["p"] == 1.0 and zeros["verdict"] == "not distinguishable" and zeros["n_needed"] is None
    # pairing is by sample id at the same keep; the baseline gets no entry of its own
    rows = [{"id": f"s{i}", "method": m, "keep": 4, "kl": kl, "top1_agree": True, "exact_agree": m == "fastv"}
            for i in range(12) for m, kl in (("fastv", 0.5 + i), ("pore", 0.4 + i))]
    rows.append({"id": "extra", "method": "pore", "keep": 4, "kl": 9.0, "top1_agree": False, "exact_agree": False})
    out = paired_comparisons(rows)
    assert set(out) == {("pore", 4)}
    assert out[("pore", 4)]["kl"]["n"] == 12 and out[("pore", 4)]["kl"]["mean"] == pytest.approx(-0.1)
    assert out[("pore", 4)]["verdict"] == "better" and out[("pore", 4)]["exact"]["verdict"] == "worse"
    assert out[("pore", 4)]["top1"]["p"] == 1.0


def test_keep_all_gives_zero_kl(tiny_llava_adapter):
    ad = tiny_llava_adapter
    cal = make_calibration(ad, grid=(4, 4))
    cfg = EvaluationConfig(methods=["fastv", "pore"], keeps=[16], n=2, max_new_tokens=3)
    doc = evaluate(ad, cal, cfg, exclude_ids=[])
    for r in doc["results"]:
        assert r["kl_mean"] == 0.0 and r["top1_agreement"] == 1.0 and r["exact_agreement"] == 1.0
        assert r["flops_ratio"] == pytest.approx(1.0)


def test_missing_store_is_an_error(tiny_llava_adapter, tmp_path):
    cal = make_calibration(tiny_llava_adapter, grid=(4, 4))
    with pytest.raises(PosbiasError, match="store="):
        calibration_sample_ids(cal, tmp_path / "cal.json")


def test_cli_evaluate_errors(tmp_path, capsys):
    from posbias.cli import main

    rc = main(["evaluate", "--model", "tiny-llava", "--calibration", str(tmp_path / "nope.json"), "--out",
               str(tmp_path / "e.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_pinned_mmap_threshold_keeps_large_buffers_mapped_so_rss_peaks_see_them():
    # glibc raises its mmap threshold after a large buffer is freed: the next 8 MiB buffer then comes from the
    # heap, stays resident after its free and is reused by the next forward, whose sampled-RSS growth then
    # under-reads. Pinned (what `profile-bias evaluate` does), it is its own mapping (mallinfo2's hblkhd).
    import subprocess
    import sys

    code = (
        "import ctypes, sys, torch\n"
        "from posbias.evaluate import pin_mmap_threshold\n"
        "class MI2(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd',\n"
        "                'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.mallinfo2.restype = MI2\n"
        "if sys.argv[1] == '1':\n"
        "    assert pin_mmap_threshold()\n"
        "x = torch.ones(4 * 2**20); del x  # a 16 MiB buffer freed\n"
        "before = libc.mallinfo2().hblkhd\n"
        "y = torch.ones(2 * 2**20)  # 8 MiB\n"
        "print((libc.mallinfo2().hblkhd - before) / 2**20)\n"
    )

    def mapped(pin: str) -> float:
        out = subprocess.run([sys.executable, "-c", code, pin], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    assert mapped("0") < 1.0  # the glibc behaviour the pin exists for: the buffer went to the heap
    assert mapped("1") >= 8.0


def test_probe_patch_tokens_and_kept_fractions(tiny_llava_adapter):
    import numpy as np

    from posbias.evaluate.probe import format_probe, patch_tokens, position_probe, probe_canvases

    # LLaVA-1.5: a 336 px canvas is 24 x 24 tokens of 14 px; a 112 px patch at (112, 224) covers rows 16-23, cols 8-15
    idx = np.arange(576)
    mask = patch_tokens(idx // 24, idx % 24, (24, 24), (112, 224, 224, 336), 336)
    assert mask.sum() == 64 and set(idx[mask] // 24) == set(range(16, 24)) and set(idx[mask] % 24) == set(range(8, 16))
    canv = probe_canvases(336, 112, 3)
    assert [xy for _, xy in canv] == [(x, y) for y in (0, 112, 224) for x in (0, 112, 224)]
    img, (x, y) = canv[4]
    px = np.asarray(img)
    assert (px[:112, :112] == 128).all() and not (px[y:y + 112, x:x + 112] == 128).all()  # grey canvas, real patch

    ad = tiny_llava_adapter
    cal = make_calibration(ad, grid=(4, 4))
    probe = position_probe(ad, cal, ["fastv", "pore"], [4], steps=3, patch_fraction=0.5)
    assert len(probe["positions"]) == 9 and all(p["tokens"] == 4 for p in probe["positions"])
    for r in probe["results"]:
        f = np.asarray(r["fraction"])
        assert f.shape == (9,) and ((f >= 0) & (f <= 1)).all() and r["spread"] == pytest.approx(f.max() - f.min())
        assert r["uniform"] == pytest.approx(4 / 16)
    # the first position's fraction is what the pruner keeps of the patch on that canvas
    import posbias.runtime as rt

    img, (x, y) = probe_canvases(336, probe["patch"], 3)[0]
    inputs = ad.prepare(img, probe["question"])
    lay = ad.layout(inputs)
    m = patch_tokens(lay.rows, lay.cols, lay.grid, (x, y, x + probe["patch"], y + probe["patch"]), 336)
    with rt.enable_pruning(ad.model, cal, method="fastv", keep=4) as pruner:
        with torch.inference_mode():
            ad.model(**inputs)
        kept = pruner.last.kept.numpy()
    assert probe["results"][0]["fraction"][0] == pytest.approx(m[kept].sum() / m.sum())
    assert "spearman" in format_probe(probe)


def test_probe_measures_an_unusable_entry_as_the_evaluation_does(tiny_llava_adapter):
    # evaluate forces every method (the report shows the verdicts); the probe, which runs after the evaluation,
    # must not refuse the same entry and lose the run
    from posbias.errors import PosbiasError
    from posbias.evaluate.probe import position_probe
    import posbias.runtime as rt

    ad = tiny_llava_adapter
    doc = make_calibration(ad, grid=(4, 4)).to_dict()
    doc["methods"]["pore"]["quality"] = {"verdict": "unusable", "reason": "made unusable by the test", "r2": 0.5,
                                         "n_samples": 20, "interval_ok": None, "interval": "none"}
    cal = rt.Calibration.from_dict(doc, source="<unusable>")
    with pytest.raises(PosbiasError, match="unusable"):
        rt.enable_pruning(ad.model, cal, method="pore", keep=4)
    probe = position_probe(ad, cal, ["pore"], [4], steps=2, patch_fraction=0.5)
    assert [r["method"] for r in probe["results"]] == ["pore"] and len(probe["results"][0]["fraction"]) == 4
