"""Every figure of a demo-sized report is legible: no text over text, over a plot area, or cut off (issue 18).

The store is synthetic but demo-sized (24 x 24 = 576 visual tokens, 30 decoder layers like the SmolLM2 demo
models, 24 samples with every optional signal), the calibration is fitted on it with statistics, and UTP
schedules and an evaluation are added, so that every figure of the report is drawn. Each figure is drawn at
the size the report uses (the HTML and the PDF draw the same figures at the same sizes) and its text boxes
are checked with :func:`posbias.reports.legibility.layout_problems`.
"""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest

from posbias.reports.legibility import layout_problems, report_figure_problems
from test_report import _evaluation, _write_store

GRID = (24, 24)
V = GRID[0] * GRID[1]
N_LAYERS = 30
#: every figure a full report draws (docs/report.md quotes this count)
ALL_FIGURES = ["attention_maps", "vision_map", "layer_curves", "bias_curves", "degree_selection", "surface_fits",
               "consistency", "density", "utp", "pictures", "fidelity", "probe"]


def _schedules() -> dict:
    out = {}
    for ratio in (2, 4, 8):
        keep = np.linspace(V, V / ratio / 2, N_LAYERS).round().astype(int).tolist()
        keep[0] = V
        out[str(ratio)] = {"ratio": float(ratio), "formulation": "pwl", "mode": "joint", "status": "optimal",
                           "n_samples": 24, "solve_seconds": 0.01, "schedule": keep, "objective": 1.0, "gap": 0.0}
    return out


@pytest.fixture(scope="module")
def demo_sized(tmp_path_factory):
    from posbias.artifacts import Calibration
    from posbias.pipeline import fit_calibration
    from posbias.profiler.store import ProfileStore

    d = tmp_path_factory.mktemp("legible")
    store = _write_store(d / "profile.h5", extras=True, grid=GRID, n_layers=N_LAYERS, n_samples=24)
    doc = fit_calibration(store, n_repeats=20, n_boot=20, keep=64).calibration.to_dict()
    doc["schedules"] = _schedules()
    cal = Calibration.from_dict(doc).save(d / "cal.json")
    with ProfileStore(store) as s:
        ids = list(s.sample_ids)
    ev = _evaluation(d / "evaluation.json", ids, n_visual=V)
    return store, cal, ev


def test_every_figure_of_a_demo_sized_report_is_legible(demo_sized):
    store, cal, ev = demo_sized
    res = report_figure_problems(store, cal, ev)
    drawn = res.pop("_figures")
    assert sorted(drawn) == sorted(ALL_FIGURES), drawn
    bad = {k: v for k, v in res.items() if v}
    assert not bad, json.dumps(bad, indent=1)


def test_heatmaps_are_large_enough_to_read(demo_sized):
    from posbias.reports.data import collect
    from posbias.reports.document import Fig
    from posbias.reports.figures import RC, new_figure
    from posbias.reports.sections import build_sections
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    store, cal, ev = demo_sized
    figs = {b.key: b for s in build_sections(collect(store, cal, ev)) for b in s.blocks if isinstance(b, Fig)}
    for key in ("attention_maps", "surface_fits", "vision_map"):
        with matplotlib.rc_context(RC):
            fig = new_figure(figs[key].size)
            figs[key].draw(fig)
            FigureCanvasAgg(fig).draw()  # runs the constrained layout
            for ax in fig.axes:
                if ax.get_images() and ax.get_label() != "<colorbar>" and ax.get_visible():
                    width_in = ax.get_window_extent().width / fig.dpi
                    assert width_in >= 1.2, (key, ax.get_title(), width_in)  # >= 180 px in the 150-dpi PNG (was ~70)


def test_checker_finds_overlaps_legends_on_data_and_clipping():
    from posbias.reports.figures import new_figure

    fig = new_figure((3.0, 2.0))
    ax = fig.subplots()
    ax.plot(np.arange(10), np.arange(10), label="a line")
    ax.legend(loc="center")  # over the data
    ax.set_xticks(np.arange(10))
    ax.set_xticklabels([f"a long tick label {i}" for i in range(10)])  # overlapping each other
    fig.text(0.95, 0.5, "cut off at the right edge")
    problems = layout_problems(fig)
    assert any("legend" in p and "plot area" in p for p in problems)
    assert any("overlaps text" in p and "long tick label" in p for p in problems)
    assert any("cut off" in p for p in problems)

    ok = new_figure((4.0, 3.0))
    ax = ok.subplots()
    ax.plot(np.arange(10), np.arange(10), label="a line")
    ax.set_xlabel("x (unit)")
    ax.set_ylabel("y (unit)")
    ok.legend(loc="outside lower center")
    assert layout_problems(ok) == []


def test_flat_gaussian_is_a_sentence_not_a_figure(demo_sized, tmp_path):
    from posbias.artifacts import Calibration
    from posbias.reports.data import collect
    from posbias.reports.document import Fig, Para
    from posbias.reports.sections import build_sections

    store, cal, _ = demo_sized
    doc = json.loads(cal.read_text())
    g = doc["methods"]["adaptprune-gaussian"]
    g["fit"]["learned"]["amplitude_"] = 0.0
    flat = Calibration.from_dict(doc).save(tmp_path / "flat.json")
    sections = build_sections(collect(store, flat, None))
    texts = [b.text for s in sections for b in s.blocks if isinstance(b, Para)]
    assert any("amplitude is 0" in t for t in texts)
    assert len(texts) == len(set(texts)), "a sentence is repeated"
    # no Gaussian panel is drawn in the surface or attention figures
    import inspect

    for s in sections:
        for b in s.blocks:
            if isinstance(b, Fig) and b.key in ("surface_fits", "attention_maps"):
                kw = b.draw.keywords
                panels = kw.get("panels") or []
                assert not any("Gaussian" in p[0] for p in panels)
                assert not any(k.endswith("/adaptprune-gaussian") for k in (kw.get("maps") or {}))
    assert inspect  # keep the import local and used


def test_report_opens_with_the_verdicts(demo_sized):
    from posbias.reports.data import collect
    from posbias.reports.document import Para, Table
    from posbias.reports.sections import build_sections

    store, cal, ev = demo_sized
    first = build_sections(collect(store, cal, ev))[0]
    assert first.title.startswith("Verdicts")
    lead, table = first.blocks[0], first.blocks[1]
    assert isinstance(lead, Para) and lead.kind in ("good", "neutral", "bad")
    assert isinstance(table, Table) and table.header == ["what", "verdict", "why"]
    doc = json.loads(cal.read_text())
    fitted = [m for m, e in doc["methods"].items() if "quality" in e]
    assert len(table.rows) >= len(fitted) + 1  # every fitted curve, then the consistency test
    assert {r[1] for r in table.rows[: len(fitted)]} <= {"good", "weak", "unusable"}
    assert any(r[0].startswith("bias consistency") and "more samples" in r[2] for r in table.rows)
