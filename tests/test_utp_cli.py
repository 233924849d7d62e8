"""UTP end to end: profile -> fit -> utr -> solve on a tiny real-architecture model, schedules loaded back
through the calibration artifact (stdlib schema validator)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from posbias.cli import main


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_utr_then_solve_writes_valid_schedules(tmp_path, capsys):
    from posbias.artifacts.calibration import Calibration
    from posbias.profiler.store import ProfileStore
    from posbias.solvers.utp import simulate_loss

    run = tmp_path / "run"
    assert _run(["profile", "--model", "tiny-llava", "--n", "3", "--out", str(run), "--no-progress",
                 "--capture", "attn"], capsys)[0] == 0
    store = run / "profile.h5"
    cal = run / "cal.json"
    assert _run(["fit", "--store", str(store), "--out", str(cal)], capsys)[0] == 0

    # solve before utr: a one-line error naming the command to run first
    code, _, err = _run(["solve", "--store", str(store), "--ratios", "2", "--into", str(cal)], capsys)
    assert code == 2 and "profile-bias utr" in err and err.count("\n") == 1

    code, out, err = _run(["utr", "--store", str(store), "--no-progress"], capsys)
    assert code == 0, err
    assert "computed 3" in out
    with ProfileStore(store) as view:
        loss = view.utr_loss  # (S, L)
        n_layers, n_vis = view.n_layers, int(view.n_visual[0])
        metrics = [view.sample_attn(i).astype(np.float64) for i in range(view.n_samples)]
    assert loss.shape == (3, n_layers) and np.isfinite(loss).all() and (loss[:, 1:] > 0).all()
    # a second run keeps the rows it has
    code, out, _ = _run(["utr", "--store", str(store), "--no-progress"], capsys)
    assert code == 0 and "computed 0" in out and "kept 3" in out

    code, out, err = _run(["solve", "--store", str(store), "--ratios", "1.5,2", "--into", str(cal)], capsys)
    assert code == 0, err
    assert out.count("status=optimal") == 2
    loaded = Calibration.load(cal)  # validates the whole document, schedules included
    doc = loaded.to_dict()
    assert set(doc["schedules"]) == {"1.5", "2"}
    for key, entry in doc["schedules"].items():
        sched = entry["schedule"]
        assert entry["formulation"] == "compact" and entry["status"] == "optimal"
        assert len(sched) == n_layers and sched[0] == n_vis
        assert sum(sched[1:]) == entry["budget"] == round(n_vis * n_layers / float(key)) - n_vis
        assert all(a >= b for a, b in zip(sched, sched[1:]))
        assert entry["n_samples"] == 3 and len(entry["samples"]) == 3
        # the progressive objective stored is the seed's loss of that schedule on these samples
        prog = sum(simulate_loss(m, ell, sched) for m, ell in zip(metrics, loss.astype(np.float64)))
        assert entry["objective_progressive"] == pytest.approx(prog, rel=1e-6)
    # the fitted methods are untouched by solve
    assert set(json.loads(cal.read_text())["methods"]) >= {"fastv", "pore"}


def test_schema_rejects_a_broken_schedule_entry(tmp_path, capsys):
    from posbias.artifacts.calibration import Calibration
    from posbias.errors import PosbiasError

    run = tmp_path / "run"
    assert _run(["profile", "--model", "tiny-llava", "--n", "2", "--out", str(run), "--no-progress",
                 "--capture", "attn"], capsys)[0] == 0
    assert _run(["fit", "--store", str(run / "profile.h5"), "--out", str(run / "cal.json")], capsys)[0] == 0
    doc = json.loads((run / "cal.json").read_text())
    doc["schedules"] = {"2": {"ratio": 2.0, "formulation": "magic", "mode": "joint", "status": "optimal",
                              "n_samples": 1, "solve_seconds": 0.1}}
    with pytest.raises(PosbiasError, match="formulation"):
        Calibration.from_dict(doc)
    doc["schedules"]["2"]["formulation"] = "pwl"
    doc["schedules"]["2"]["schedule"] = [16, -1]
    with pytest.raises(PosbiasError, match="schedule"):
        Calibration.from_dict(doc)
    doc["schedules"]["2"]["schedule"] = [16, 4]
    assert Calibration.from_dict(doc).to_dict()["schedules"]["2"]["schedule"] == [16, 4]


def test_utr_refuses_another_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(["profile", "--model", "tiny-llava", "--n", "2", "--out", str(run), "--no-progress",
                 "--capture", "attn"], capsys)[0] == 0
    code, _, err = _run(["utr", "--store", str(run / "profile.h5"), "--model", "tiny-qwen2.5-vl", "--no-progress"], capsys)
    assert code == 2 and "fingerprint" in err
