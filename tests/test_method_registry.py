"""The method registry: a toy method registered from this file (nothing in src/ names it) runs through
enable_pruning + generate, the fidelity evaluation and the report; the built-in declarations drive the
views that older code imports (PRUNE_METHODS, PARAMS, CALIBRATION_ENTRY, KNOWN_METHODS, the palette)."""

from __future__ import annotations

import json

import pytest
import torch

from posbias.errors import PosbiasError
from posbias.runtime.registry import Selection, SelectionMethod, get_method, register_method, unregister_method

TOY = "middle-k"
TOY_COLOUR = "#123456"
TOY_LABEL = "middle-k (toy: the tokens around the middle of the raster order)"


def _middle_score(s: Selection) -> torch.Tensor:
    """Higher for tokens nearer raster index (V - 1) / 2 + offset; ignores attention entirely."""
    centre = (s.n_visual - 1) / 2.0 + float(s.params["offset"])
    return -(s.ids.double() - centre).abs()


def _check_offset(r) -> None:
    off = r.values["offset"]
    if isinstance(off, bool) or not isinstance(off, int):
        raise PosbiasError(f"offset={off!r} must be an int")


def expected_middle(n_visual: int, keep: int, offset: int = 0) -> list[int]:
    """The toy's picks computed independently: nearest to the centre, ties to the lower index."""
    centre = (n_visual - 1) / 2.0 + offset
    return sorted(sorted(range(n_visual), key=lambda i: (abs(i - centre), i))[:keep])


@pytest.fixture
def toy():
    method = register_method(SelectionMethod(TOY, score=_middle_score, params={"offset": 0}, check=_check_offset,
                                             label=TOY_LABEL, colour=TOY_COLOUR))
    yield method
    unregister_method(TOY)


def test_builtins_back_the_old_tables():
    from posbias.artifacts.calibration import KNOWN_METHODS
    from posbias.artifacts.quality import FITTED_METHODS
    from posbias.reports.palette import METHOD_COLORS, METHOD_LABELS
    from posbias.runtime import PARAMS, PRUNE_METHODS
    from posbias.runtime.spec import CALIBRATION_ENTRY

    assert tuple(PRUNE_METHODS) == ("fastv", "pore", "posprune-pbc", "posprune", "adaptprune", "utp")
    assert CALIBRATION_ENTRY["posprune"] == "posprune-pbc" and CALIBRATION_ENTRY["adaptprune"] == "adaptprune-gaussian"
    assert CALIBRATION_ENTRY["fastv"] is None and CALIBRATION_ENTRY["utp"] is None
    assert PARAMS["posprune"]["mmr_lambda"] == 0.9 and PARAMS["utp"] == {"pa_layers": 3, "ratio": None}
    PARAMS["posprune"]["mmr_lambda"] = 0.1  # a copy: the declaration cannot be changed through the view
    assert PARAMS["posprune"]["mmr_lambda"] == 0.9
    assert set(KNOWN_METHODS) == {"fastv", "pore", "posprune-pbc", "adaptprune-gaussian", "posprune-pbc-2d"}
    assert set(FITTED_METHODS) == set(KNOWN_METHODS) - {"fastv"}
    # a method without its own label or colour shows those of the entry of the same name
    assert METHOD_LABELS["pore"] == "PoRe (A / P(x))" and METHOD_COLORS["posprune-pbc"] == "#009E73"
    assert METHOD_COLORS["pa-att"] == METHOD_COLORS["utp"]


def test_registration_rules(toy):
    from posbias.runtime import PARAMS, PRUNE_METHODS

    assert TOY in PRUNE_METHODS and PARAMS[TOY] == {"offset": 0} and get_method(TOY) is toy
    with pytest.raises(PosbiasError, match="already registered"):
        register_method(SelectionMethod(TOY, score=_middle_score))
    with pytest.raises(PosbiasError, match="score or a select"):
        SelectionMethod("nothing")
    with pytest.raises(PosbiasError, match="unknown pruning method 'no-such'"):
        get_method("no-such")


def test_toy_method_prunes_inside_generate(toy, tiny_llava_adapter, noise_image):
    from posbias.runtime import enable_pruning
    from tests.test_pruning import make_calibration

    ad = tiny_llava_adapter
    cal = make_calibration(ad, grid=(4, 4))  # defaults.layer 1
    inputs = ad.prepare(noise_image, "what is in the image")
    for offset in (0, 3):
        with enable_pruning(ad.model, cal, method=TOY, keep=5, params={"offset": offset}) as pruner:
            with torch.inference_mode():
                out = ad.model.generate(**inputs, max_new_tokens=3, do_sample=False)
            rec = pruner.last
        assert rec.kept.tolist() == expected_middle(16, 5, offset)
        assert rec.stages == [(1, 5)]  # the default layer rule: the calibration's pruning layer
        seq = int(inputs["input_ids"].shape[1])
        assert rec.tokens_per_layer == [seq, seq, seq - 11]
        assert out.shape[1] > seq
    assert expected_middle(16, 5, 3) != expected_middle(16, 5, 0)
    with pytest.raises(PosbiasError, match="offset='x' must be an int"):
        enable_pruning(ad.model, cal, method=TOY, keep=5, params={"offset": "x"})
    with pytest.raises(PosbiasError, match=r"unknown parameter\(s\) \['lam'\]"):
        enable_pruning(ad.model, cal, method=TOY, keep=5, params={"lam": 1})


def test_toy_method_through_evaluate_and_report(toy, tmp_path, tiny_llava_adapter, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posbias.artifacts import Calibration
    from posbias.cli import main
    from posbias.data.registry import iter_samples, resolve_sources
    from posbias.evaluate import EvaluationConfig, evaluate, format_table, write_evaluation
    from posbias.profiler.run import profile_samples
    from posbias.reports.figures import draw_fidelity
    from posbias.reports.html import render_report

    run = tmp_path
    samples = iter_samples(resolve_sources(["embedded"]), n=4, seed=0)
    profile_samples(tiny_llava_adapter, samples, run / "profile.h5", seed=0, progress=False)
    assert main(["fit", "--store", str(run / "profile.h5"), "--out", str(run / "cal.json"), "--no-stats"]) == 0
    capsys.readouterr()
    cal_path = run / "cal.json"
    cal = Calibration.load(cal_path)
    cfg = EvaluationConfig(methods=["fastv", TOY], keeps=[4], n=2, max_new_tokens=2, params={TOY: {"offset": 2}})
    doc = evaluate(tiny_llava_adapter, cal, cfg, calibration_path=cal_path)
    rows = [s for s in doc["per_sample"] if s["method"] == TOY]
    assert len(rows) == 2 and all(s["kept"] == expected_middle(s["n_visual"], 4, 2) for s in rows)
    toy_result = next(r for r in doc["results"] if r["method"] == TOY)
    assert toy_result["paired"]["baseline"] == "fastv" and toy_result["flops_ratio"] < 1.0
    assert TOY in format_table(doc)
    ev = write_evaluation(doc, run / "evaluation.json")

    from posbias.profiler.store import ProfileStore
    from posbias.reports.pictures import kept_from_store

    with ProfileStore(run / "profile.h5") as st:
        attn = st.sample_attn(0)  # (V, L)
    kept = kept_from_store(attn, cal, 4, grid=(4, 4))  # the pictures replay single-row methods on stored rows
    assert kept[TOY].tolist() == expected_middle(16, 4, 0) and "fastv" in kept and "posprune" not in kept

    html = render_report(run / "profile.h5", cal_path, run / "report.html", evaluation=ev, parallel=False)
    text = html.read_text(encoding="utf-8")
    assert TOY_LABEL.split(" (")[0] in text and "toy: the tokens around the middle" in text  # its label in the tables
    fig = plt.figure()
    draw_fidelity(fig, json.loads(ev.read_text())["results"])
    colours = {matplotlib.colors.to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines()}
    plt.close(fig)
    assert TOY_COLOUR in colours  # drawn in its declared colour


def test_declarations_keep_the_import_rules():
    """Loading every declared method keeps the runtime free of h5py/scipy/statsmodels/highspy/matplotlib, and the
    entry declarations keep posbias.artifacts free of numpy and torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from posbias.artifacts.entries import get_entry, known_entries\n"
        "[get_entry(n) for n in known_entries()]\n"
        "print(sorted(m for m in ('numpy', 'torch', 'jsonschema') if m in sys.modules))\n"
        "from posbias.runtime.registry import get_method, known_methods\n"
        "[get_method(n) for n in known_methods()]\n"
        "print(sorted(m for m in ('h5py', 'scipy', 'statsmodels', 'highspy', 'matplotlib', 'posbias.fitters') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "[]", out


def test_entry_declarations_drive_validation_and_quality(tiny_llava_adapter):
    """The built-in entry rules still fire (through the registry), and a registered entry gets the generic ones."""
    import copy

    from posbias.artifacts.entries import CalibrationEntry, register_entry, unregister_entry
    from posbias.artifacts.quality import assess_entry
    from posbias.errors import SchemaError
    from tests.test_pruning import make_calibration

    doc = make_calibration(tiny_llava_adapter, grid=(4, 4)).to_dict()
    from posbias.artifacts import Calibration

    bad = copy.deepcopy(doc)
    bad["methods"]["posprune-pbc"]["deep_layer"] = bad["methods"]["posprune-pbc"]["shallow_layer"]
    with pytest.raises(SchemaError, match=r"posprune-pbc'\]\.deep_layer: deep_layer 1 must be > shallow_layer 1"):
        Calibration.from_dict(bad)
    flat = copy.deepcopy(doc["methods"]["adaptprune-gaussian"])
    flat["fit"]["learned"]["amplitude_"] = 0.0
    assert assess_entry("adaptprune-gaussian", flat)["verdict"] == "unusable"
    # an unregistered name passes through; once registered, the generic layer rule applies to it
    extra = copy.deepcopy(doc)
    extra["methods"]["toy-entry"] = {"layer": 99}
    Calibration.from_dict(extra)
    register_entry(CalibrationEntry("toy-entry", label="toy entry", colour="#654321", fitted=False))
    try:
        with pytest.raises(SchemaError, match=r"toy-entry'\]\.layer: layer 99 does not exist"):
            Calibration.from_dict(extra)
        from posbias.reports.palette import method_color, method_label

        assert method_color("toy-entry") == "#654321" and method_label("toy-entry") == "toy entry"
    finally:
        unregister_entry("toy-entry")
