"""Quality verdicts of fitted calibration entries: the rules, the artifact, the fit summary, the runtime (issue 18)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest

from posbias.artifacts import Calibration
from posbias.artifacts.quality import assess_entry, assess_methods
from posbias.errors import PosbiasError


def _entry(r2: float, n: int = 40, **learned) -> dict:
    return {"goodness": {"r2": r2, "rmse": 1e-4, "n_samples": n}, "fit": {"learned": dict(learned)}}


def test_rules_give_each_verdict_with_a_reason():
    q = assess_entry("adaptprune-gaussian", _entry(0.0, amplitude_=0.0, centre_peak_=False))
    assert q["verdict"] == "unusable" and "amplitude 0" in q["reason"]
    q = assess_entry("posprune-pbc", _entry(-0.2))
    assert q["verdict"] == "unusable" and "R^2 -0.20" in q["reason"]
    stats = {"level": 0.95, "pore_inference": {"params": {"b": {"estimate": -3.0, "low": -85.4, "high": 12.9}}}}
    q = assess_entry("pore", _entry(0.9), stats)
    assert q["verdict"] == "weak" and "spans 0" in q["reason"] and "[-85.4, 12.9]" in q["reason"]
    assert q["interval_ok"] is False
    stats["pore_inference"]["params"]["b"] = {"estimate": 0.01, "low": 0.007, "high": 0.013}
    q = assess_entry("pore", _entry(0.9), stats)
    assert q["verdict"] == "good" and q["interval_ok"] is True
    assert assess_entry("posprune-pbc", _entry(0.26))["verdict"] == "weak"
    q = assess_entry("posprune-pbc", _entry(0.9, n=8))
    assert q["verdict"] == "weak" and "8 samples" in q["reason"]
    band = {"x": [0, 1, 2], "fit": [0.0, 1.0, 2.0], "low": [-3.0, -2.0, -1.0], "high": [3.0, 4.0, 5.0]}
    q = assess_entry("posprune-pbc", _entry(0.9), {"pbc_inference": {"band": band}})
    assert q["verdict"] == "weak" and "wider than the curve's range" in q["reason"]
    q = assess_entry("posprune-pbc", _entry(0.9))
    assert q["verdict"] == "good" and q["interval_ok"] is None
    assert assess_entry("fastv", {"layer": 2}) is None


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A real run of the tiny LLaVA: store + calibration written by the CLI."""
    from posbias.cli import main

    out = tmp_path_factory.mktemp("q") / "run"
    assert main(["--model", "tiny-llava", "--n", "6", "--out", str(out), "--no-progress"]) == 0
    return out


def test_fit_writes_quality_into_every_fitted_entry_and_validates(fitted):
    doc = json.loads((fitted / "posbias_calibration.json").read_text())
    assert doc["schema_version"] == 2
    for name, entry in doc["methods"].items():
        if name == "fastv":
            assert "quality" not in entry
            continue
        q = entry["quality"]
        assert q["verdict"] in ("good", "weak", "unusable") and q["reason"]
        assert q["r2"] == entry["goodness"]["r2"] and q["n_samples"] == entry["goodness"]["n_samples"]
        assert q["verdict"] != "good"  # 6 samples are never enough
    bad = copy.deepcopy(doc)
    bad["methods"]["pore"]["quality"]["verdict"] = "fine"
    with pytest.raises(PosbiasError, match="verdict"):
        Calibration.from_dict(bad)


def test_version_1_files_without_quality_still_load(fitted):
    doc = json.loads((fitted / "posbias_calibration.json").read_text())
    doc["schema_version"] = 1
    for entry in doc["methods"].values():
        entry.pop("quality", None)
    cal = Calibration.from_dict(doc)
    assert "quality" not in cal.method("pore")


def test_fit_summary_leads_with_the_verdicts(fitted, capsys):
    from posbias.cli import main

    assert main(["fit", "--store", str(fitted / "profile.h5"), "--out", str(fitted / "again.json"), "--no-stats"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("quality of the fitted curves")
    header = out[1].split()
    assert header == ["method", "verdict", "why"]
    assert any(line.startswith("pore ") and ("weak" in line or "unusable" in line) for line in out[3:8])


def _with_verdict(cal: Calibration, name: str, verdict: str) -> Calibration:
    doc = cal.to_dict()
    doc["methods"][name]["quality"] = {"verdict": verdict, "reason": f"made {verdict} by the test", "r2": 0.5,
                                       "n_samples": 20, "interval_ok": None, "interval": "none"}
    return Calibration.from_dict(doc, source=f"<{verdict}>")


def test_runtime_refuses_unusable_warns_once_for_weak(tiny_llava_adapter):
    import posbias.runtime as rt
    from posbias.runtime import CalibrationQualityWarning
    from test_pruning import make_calibration

    ad = tiny_llava_adapter
    base = make_calibration(ad, grid=(4, 4))
    unusable = _with_verdict(base, "adaptprune-gaussian", "unusable")

    def n_hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ad.model.modules())

    before = n_hooks()
    with pytest.raises(PosbiasError) as exc:
        rt.enable_pruning(ad.model, unusable, method="adaptprune", keep=4)
    msg = str(exc.value)
    assert "unusable" in msg and "force=True" in msg and "\n" not in msg
    assert n_hooks() == before  # the refusal hooks nothing
    with pytest.warns(CalibrationQualityWarning):
        rt.enable_pruning(ad.model, unusable, method="adaptprune", keep=4, force=True).disable()
    # AdaptPrune without its Gaussian does not use the entry
    rt.enable_pruning(ad.model, unusable, method="adaptprune", keep=4, params={"gaussian": False}).disable()
    # other methods of the same calibration are not affected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt.enable_pruning(ad.model, unusable, method="pore", keep=4).disable()

    weak = _with_verdict(base, "pore", "weak")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            rt.enable_pruning(ad.model, weak, method="pore", keep=4).disable()
    mine = [w for w in caught if issubclass(w.category, CalibrationQualityWarning)]
    assert len(mine) == 1 and "weak" in str(mine[0].message) and "pore" in str(mine[0].message)
