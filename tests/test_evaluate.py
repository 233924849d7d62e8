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
    assert "fastv" in format_table(doc)


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
    with pytest.raises(PosbiasError, match="--store"):
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
