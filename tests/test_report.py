"""The HTML + PDF report: every section rendered from real stores, escaping, missing inputs, the PDF pages,
and the page opened in headless Chromium (skipped only where the chromium / pdftoppm binaries are absent)."""

from __future__ import annotations

import html as _html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from posbias.errors import PosbiasError

ARTIFACTS = Path(__file__).parent / "artifacts"
EVIL = 'What is <script>alert("pwned")</script> & <b>this</b>?'
GRID = (6, 6)
N_LAYERS = 6
N_SAMPLES = 24


def _write_store(path: Path, *, extras: bool, grid: tuple[int, int] = GRID, n_layers: int = N_LAYERS,
                 n_samples: int = N_SAMPLES) -> Path:
    """A store of real embedded-photo ids (default: 24 samples, 6x6 grid, 6 layers) with a recency bias at layer 2."""
    from posbias.data.embedded import RECORDS
    from posbias.models.base import VisualLayout
    from posbias.profiler.store import ProfileStoreWriter

    r, c = grid
    v = r * c
    rng = np.random.default_rng(0)
    attrs = {"model_id": "unit/<model>", "model_fingerprint": "sha256:" + "ab" * 8, "adapter": "llava", "seed": 0,
             "data": "embedded", "n_requested": n_samples}
    idx = np.arange(v)
    with ProfileStoreWriter(path, n_layers=n_layers, rope_dims=1, attrs=attrs, overwrite=True) as w:
        for s in range(n_samples):
            attn = rng.gamma(4.0, 1.0 / (4.0 * v), size=(v, n_layers))  # (V, L)
            attn[:, 2] *= 1.0 + 2.0 * (idx / (v - 1)) ** 2  # shallow recency bias
            attn = (attn / attn.sum(axis=0, keepdims=True) * 0.3).astype(np.float32)
            layout = VisualLayout(visual_index=np.arange(5, 5 + v), rows=idx // c, cols=idx % c, grid=grid,
                                  position_ids=np.arange(5, 5 + v)[:, None], seq_len=5 + v + 8)
            kw = {}
            if extras:
                pa = (attn * (1.0 + 0.1 * rng.standard_normal((v, n_layers)))).astype(np.float32)
                logdet = rng.normal(0.0, 1.0, (4, 4))  # (4, 4) region blocks
                logdet[1:3, 1:3] += 1.5
                kw = {
                    "token_data": {"attn_pa": np.abs(pa), "vision_importance": rng.random(v).astype(np.float32)},
                    "sample_data": {"region_logdet": logdet.astype(np.float32),
                                    "utr_loss": np.linspace(1.2, 0.05, n_layers).astype(np.float32) + rng.random(n_layers).astype(np.float32) * 0.05},
                }
            w.append(sample_id=f"embedded:{RECORDS[s].key}", source="embedded", question=EVIL if s == 0 else RECORDS[s].question,
                     answer=RECORDS[s].answer, layout=layout, attn=attn, **kw)
        w.skip(sample_id="embedded:broken/pope-x", source="embedded", reason="unreadable <image> file")
    return path


def _calibration(store: Path, out: Path, *, stats: bool, schedules: bool) -> Path:
    from posbias.artifacts import Calibration
    from posbias.pipeline import fit_calibration

    cal = fit_calibration(store, n_repeats=20, n_boot=20, statistics=stats, keep=8).calibration
    doc = cal.to_dict()
    if schedules:
        doc["methods"]["utp"] = {"schedules": {
            "2": {"ratio": 2, "schedule": [36, 30, 20, 10, 6, 6], "objective": 0.42, "status": "Optimal", "gap": 0.0},
            "4": {"ratio": 4, "schedule": [36, 14, 6, 4, 3, 3], "objective": 0.9, "status": "Optimal", "gap": 0.0},
        }}
    Calibration.from_dict(doc).save(out)
    return out


def _evaluation(path: Path, store_ids: list[str], n_visual: int = GRID[0] * GRID[1]) -> Path:
    methods = ["fastv", "pore", "posprune-pbc", "posprune", "adaptprune", "utp"]
    results, per_sample = [], []
    for i, m in enumerate(methods):
        for k in (8, 16, 24):
            results.append({"method": m, "keep": k, "n": 4, "kl_mean": 0.5 / k * (1 + 0.2 * i), "kl_sem": 0.002,
                            "top1_agreement": 0.6 + k / 100, "exact_agreement": 0.5 + k / 120,
                            "accuracy": None, "flops": 1e9 * k / n_visual, "flops_ratio": k / n_visual, "prefill_ms": 10 + k,
                            "prefill_ms_full": 50.0, "peak_mem_mib": 100.0})
            for sid in ("embedded:rocket/pope-rocket", store_ids[1]):
                per_sample.append({"id": sid, "method": m, "keep": k, "kl": 0.1 * (1 + 0.2 * i) + 0.01 * len(sid),
                                   "top1_agree": True, "exact_agree": False,
                                   "kept": sorted(np.random.default_rng(i + k).choice(n_visual, k, replace=False).tolist())})
    from posbias.evaluate.paired import paired_comparisons

    paired = paired_comparisons(per_sample)
    for r in results:
        r["paired"] = paired.get((r["method"], r["keep"]))
    probe = {"question": "What is in this picture?", "canvas": 336, "patch": 112, "steps": 2, "background": 128,
             "positions": [{"x": x, "y": y, "tokens": 4, "mean_index": 6.0 * y / 112 + x / 112} for y in (0, 224)
                           for x in (0, 224)],
             "results": [{"method": m, "keep": 8, "fraction": f, "spread": max(f) - min(f), "spearman": rho,
                          "uniform": 8 / n_visual}
                         for m, f, rho in (("fastv", [0.0, 0.25, 0.5, 1.0], 1.0), ("pore", [0.5] * 4, None))]}
    doc = {"schema": "posbias.evaluation", "schema_version": 1, "created": "2026-11-23T00:00:00Z", "probe": probe,
           "model": {"id": "unit/<model>", "fingerprint": "sha256:" + "ab" * 8, "adapter": "llava"},
           "calibration": {"file": "cal.json", "fingerprint": "sha256:" + "ab" * 8}, "n_samples": 4,
           "sample_ids": ["embedded:rocket/pope-rocket"], "results": results, "per_sample": per_sample}
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """Store with every optional signal, calibration with statistics and schedules, an evaluation; HTML + PDF."""
    from posbias.profiler.store import ProfileStore
    from posbias.reports.html import render_report

    d = tmp_path_factory.mktemp("report")
    store = _write_store(d / "profile.h5", extras=True)
    cal = _calibration(store, d / "cal.json", stats=True, schedules=True)
    with ProfileStore(store) as s:
        ids = list(s.sample_ids)
    ev = _evaluation(d / "evaluation.json", ids)
    render_report(store, cal, d / "report.html", pdf=d / "report.pdf", evaluation=ev)
    return {"dir": d, "store": store, "cal": cal, "eval": ev, "html": d / "report.html", "pdf": d / "report.pdf"}


def test_every_section_and_figure_present(full_report):
    text = full_report["html"].read_text(encoding="utf-8")
    heads = re.findall(r'<h2 id="([a-z]+)">', text)
    assert heads == ["provenance", "attention", "curves", "consistency", "density", "utp", "pictures", "fidelity"]
    toc = re.findall(r'<nav.*?</nav>', text, flags=re.S)[0]
    assert re.findall(r'href="#([a-z]+)"', toc) == heads
    figs = set(re.findall(r'<figure id="fig-([a-z_]+)">', text))
    assert figs == {"attention_maps", "vision_map", "layer_curves", "bias_curves", "degree_selection", "surface_fits",
                    "consistency", "density", "utp", "pictures", "fidelity", "probe"}
    # every input was given: nothing reported missing
    assert "Not available" not in text, re.findall(r"Not available[^<]*", text)
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in text.replace("http-equiv", "") and "https://" not in text
    # the paired verdicts against FastV and what each measure answers
    assert "verdict (KL)" in text and "not distinguishable" in text and "fidelity to the full model" in text
    # provenance numbers come from the store
    assert "embedded: 24" in text and "unreadable &lt;image&gt; file" in text


def test_user_strings_are_escaped(full_report):
    text = full_report["html"].read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert _html.escape(EVIL, quote=True) in text
    assert "unit/&lt;model&gt;" in text and "<model>" not in text


def test_pdf_pages_render_and_are_not_blank(full_report, tmp_path):
    pdf = full_report["pdf"]
    raw = pdf.read_bytes()
    assert raw.startswith(b"%PDF") and b"/Font" in raw  # text is text (vector), not a page-sized picture
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) not installed; scripts/install.sh installs it")
    from PIL import Image

    subprocess.run(["pdftoppm", "-r", "40", "-png", str(pdf), str(tmp_path / "page")], check=True, timeout=120)
    pages = sorted(tmp_path.glob("page*.png"))
    n_pages = int(re.search(rb"/Type\s*/Pages.*?/Count\s+(\d+)", raw, flags=re.S).group(1))
    assert len(pages) == n_pages >= 9  # title page + 8 sections' worth
    for p in pages:
        img = np.asarray(Image.open(p).convert("L"))  # (H, W) uint8
        assert img.shape[0] > img.shape[1]  # portrait A4
        assert (img < 200).mean() > 0.004, f"{p.name} is blank"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(pages[1], ARTIFACTS / "report_pdf_page2.png")


def test_html_renders_in_headless_chromium(full_report):
    from posbias.reports.browser import check_html, find_chromium

    if find_chromium() is None:
        pytest.skip("chromium not installed; scripts/install.sh installs it")
    shot = ARTIFACTS / "report.png"
    res = check_html(full_report["html"], screenshot=shot)
    text = full_report["html"].read_text(encoding="utf-8")
    assert res.console_errors == []
    assert len(res.images) == text.count("<img ") >= 11
    assert res.broken_images == []
    assert all(i["data"] for i in res.images)
    assert res.scripts == 0 and res.external == []
    assert EVIL in res.text  # the <script> question shows as text
    assert len(res.sections) == 8 and res.toc == [f"#{s}" for s in
                                                  ("provenance", "attention", "curves", "consistency", "density", "utp", "pictures", "fidelity")]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape[0] > 3000 and (img < 200).mean() > 0.02


def test_missing_inputs_say_what_to_run(tmp_path):
    from posbias.reports.html import render_report

    store = _write_store(tmp_path / "profile.h5", extras=False)
    cal = _calibration(store, tmp_path / "cal.json", stats=False, schedules=False)
    render_report(store, cal, tmp_path / "r.html", pdf=tmp_path / "r.pdf", parallel=False)
    text = _html.unescape((tmp_path / "r.html").read_text(encoding="utf-8"))
    for needle in ("profile-bias solve", "profile-bias evaluate", "without --no-stats", "region_logdet", "attn_pa"):
        assert needle in text, needle
    assert len(re.findall(r'<h2 id=', text)) == 8
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")


def test_dynamic_resolution_store(tmp_path):
    from posbias.testing import write_synthetic_store
    from posbias.pipeline import fit_calibration
    from posbias.reports.html import render_report

    store = write_synthetic_store(tmp_path / "dyn.h5", n_samples=12, grid=[(4, 6), (6, 4), (5, 5)], n_layers=5,
                                  shallow_bias=lambda x, u, v: 2e-4 * x)
    fit_calibration(store, statistics=False).calibration.save(tmp_path / "cal.json")
    render_report(store, tmp_path / "cal.json", tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "dynamic: 3 distinct grids, 24-25 visual tokens" in text
    assert text.count("<img ") >= 4 and 'id="fig-attention_maps"' in text and 'id="fig-bias_curves"' in text


def test_kept_sets_follow_the_runtime_and_images_reload(full_report):
    import torch

    from posbias.artifacts import Calibration
    from posbias.profiler.store import ProfileStore
    from posbias.reports.pictures import crop_for_adapter, kept_from_evaluation, kept_from_store, load_sample_image
    from posbias.runtime import select_tokens

    cal = Calibration.load(full_report["cal"])
    with ProfileStore(full_report["store"]) as s:
        attn = np.asarray(s.sample_attn(3))  # (V, L)
        sid, attrs = s.sample_ids[3], dict(s.attrs)
    kept = kept_from_store(attn, cal, 8, grid=GRID)
    assert set(kept) >= {"fastv", "pore", "posprune-pbc", "adaptprune-gaussian"}
    layer = cal.method("fastv")["layer"]
    assert sorted(kept["fastv"].tolist()) == sorted(np.argsort(-attn[:, layer])[:8].tolist())
    pore = select_tokens("pore", torch.from_numpy(attn[:, cal.method("pore")["layer"]].copy()), cal, keep=8)
    assert kept["pore"].tolist() == pore.tolist()
    assert all(len(v) == 8 for v in kept.values())
    img, why = load_sample_image(sid, attrs)
    assert img is not None, why
    arr = crop_for_adapter(img, "llava", GRID)
    assert arr.ndim == 3 and arr.shape[0] == arr.shape[1] and arr.dtype == np.uint8
    _, why = load_sample_image("nosuch:thing", attrs)
    assert "nosuch" in why
    ev = json.loads(full_report["eval"].read_text())
    got = kept_from_evaluation(ev, "embedded:rocket/pope-rocket", 10)
    assert set(got) == {"fastv", "pore", "posprune-pbc", "posprune", "adaptprune", "utp"} and all(len(v) == 8 for v in got.values())


def test_bad_evaluation_and_outputs_are_refused(full_report, tmp_path, capsys):
    from posbias.cli import main
    from posbias.reports.data import load_evaluation

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something.else"}))
    with pytest.raises(PosbiasError, match=re.escape(str(bad))):
        load_evaluation(bad)
    doc = json.loads(full_report["eval"].read_text())
    del doc["results"][0]["kl_mean"]
    bad.write_text(json.dumps(doc))
    with pytest.raises(PosbiasError, match=r"results\[0\] lacks \['kl_mean'\]"):
        load_evaluation(bad)
    code = main(["report", "--store", str(full_report["store"]), "--calibration", str(full_report["cal"])])
    assert code == 2 and "--html" in capsys.readouterr().err
    code = main(["report", "--store", str(full_report["store"]), "--calibration", str(full_report["cal"]),
                 "--evaluation", str(tmp_path / "none.json"), "--html", str(tmp_path / "x.html")])
    assert code == 2 and "none.json" in capsys.readouterr().err


def test_palette_one_colour_per_method():
    from posbias.reports.palette import METHOD_COLORS, method_color

    core = ["fastv", "pore", "posprune-pbc", "posprune", "posprune-pbc-2d", "adaptprune-gaussian", "adaptprune", "utp", "random"]
    assert len({METHOD_COLORS[m] for m in core}) == len(core)
    assert method_color("my-method") == method_color("my-method")


def test_departures_table_in_report_and_docs(full_report):
    from pathlib import Path

    from posbias.departures import DEPARTURES

    text = _html.unescape(full_report["html"].read_text(encoding="utf-8"))
    docs = (Path(__file__).resolve().parents[1] / "docs" / "runtime.md").read_text(encoding="utf-8")
    table = docs.split("## Remaining departures from the papers", 1)[1].split("\n## ", 1)[0]
    assert len(DEPARTURES) >= 5
    for paper, what, why, switch in DEPARTURES:
        assert what in text and switch in text
        assert what in table and why in table  # the docs list the same departures
