"""The profile-bias command line, end to end on the tiny real-architecture models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from posbias.cli import main


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_whole_pipeline_writes_store_calibration_report(tmp_path, capsys, model):
    out = tmp_path / "run"
    code, stdout, stderr = _run(["--model", model, "--n", "6", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, stderr
    store, cal, report = out / "profile.h5", out / "posbias_calibration.json", out / "report.html"
    assert store.is_file() and cal.is_file() and report.is_file()
    with h5py.File(store, "r") as f:
        assert f.attrs["schema"] == "posbias.profile"
        n_layers = int(f.attrs["n_layers"])
        assert f["tokens/attn"].shape[1] == n_layers
        assert f["samples/id"].shape[0] + f["skipped/id"].shape[0] == 6
    doc = json.loads(cal.read_text())
    assert doc["schema"] == "posbias.calibration"
    assert set(doc["methods"]) >= {"fastv", "pore", "posprune-pbc"}
    assert doc["model"]["n_layers"] == n_layers
    html = report.read_text()
    assert "data:image/png;base64," in html and "<script" not in html.lower()
    assert "profiled" in stdout and "calibration ->" in stdout


def test_stages_one_by_one_match_the_whole_run(tmp_path, capsys):
    a = tmp_path / "a"
    assert _run(["profile", "--model", "tiny-llava", "--n", "5", "--out", str(a), "--no-progress"], capsys)[0] == 0
    store = a / "profile.h5"
    cal = a / "cal.json"
    code, stdout, _ = _run(["fit", "--store", str(store), "--out", str(cal)], capsys)
    assert code == 0 and "posprune-pbc" in stdout
    code, _, _ = _run(["report", "--store", str(store), "--calibration", str(cal), "--html", str(a / "r.html")], capsys)
    assert code == 0 and (a / "r.html").stat().st_size > 1000
    # fitting the same store again gives a byte-identical artifact apart from the creation time
    cal2 = a / "cal2.json"
    assert _run(["fit", "--store", str(store), "--out", str(cal2)], capsys)[0] == 0
    d1, d2 = json.loads(cal.read_text()), json.loads(cal2.read_text())
    d1.pop("created"), d2.pop("created")
    assert d1 == d2
    strip = lambda t: "\n".join(l for l in t.splitlines() if '"created"' not in l)  # noqa: E731
    assert strip(cal.read_text()) == strip(cal2.read_text())


def test_export_writes_next_to_config_and_checks_fingerprint(tmp_path, capsys):
    from posbias.models import load_adapter
    from posbias.runtime import Calibration

    run = tmp_path / "run"
    assert _run(["--model", "tiny-llava", "--n", "4", "--out", str(run), "--no-progress"], capsys)[0] == 0
    adapter = load_adapter("tiny-llava")
    model_dir = tmp_path / "ckpt"
    adapter.model.save_pretrained(model_dir)
    code, _, err = _run(["export", "--calibration", str(run / "posbias_calibration.json"), "--to", str(model_dir)], capsys)
    assert code == 0, err
    cal = Calibration.from_pretrained(model_dir)
    cal.check_fingerprint(adapter.fingerprint())  # same model: passes
    other = load_adapter("tiny-qwen2.5-vl")
    with pytest.raises(Exception) as exc:
        cal.check_fingerprint(other.fingerprint(), model_id=other.model_id)
    assert cal.model["fingerprint"] in str(exc.value) and other.fingerprint() in str(exc.value)


def test_existing_out_is_refused_and_left_intact(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["--model", "tiny-llava", "--n", "3", "--out", str(out), "--no-progress"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = _run(["--model", "tiny-llava", "--n", "3", "--out", str(out), "--no-progress"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "--overwrite" in err and str(out) in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "no-such-model-alias", "--n", "2"], "no-such-model-alias"),
        (["--model", "tiny-llava", "--n", "2", "--data", "nosuchsource"], "nosuchsource"),
        (["--model", "tiny-llava", "--n", "0"], "--n"),
    ],
)
def test_bad_input_one_line_error(tmp_path, capsys, args, needle):
    code, _, err = _run([*args, "--out", str(tmp_path / "x"), "--no-progress"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("profile-bias: error:") and needle in lines[0]


def test_wrong_schema_store_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["schema"] = "something.else"
        f.create_dataset("x", data=np.zeros(3))
    code, _, err = _run(["fit", "--store", str(bad), "--out", str(tmp_path / "c.json")], capsys)
    assert code == 2 and str(bad) in err and not (tmp_path / "c.json").exists()


def test_wrong_schema_calibration_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(["--model", "tiny-llava", "--n", "3", "--out", str(run), "--no-progress"], capsys)[0] == 0
    doc = json.loads((run / "posbias_calibration.json").read_text())
    doc["schema_version"] = 99
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    code, _, err = _run(["report", "--store", str(run / "profile.h5"), "--calibration", str(bad), "--html", str(tmp_path / "r.html")], capsys)
    assert code == 2 and "schema_version" in err and str(bad) in err


def test_hub_model_without_hub_fails_fast_with_local_path_hint(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"))  # empty cache
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "posbias.cli", "--model", "qwen2.5-vl-7b", "--n", "800", "--out", str(tmp_path / "q")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in err[0] and "offline" in err[0] and "--model /" in err[0]
    assert elapsed < 60
    assert not (tmp_path / "q" / "profile.h5").exists()


def test_help_documents_every_option(capsys):
    for args in (["--help"], ["profile", "--help"], ["fit", "--help"], ["export", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "--help" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for opt in ("--model", "--n", "--data", "--seed", "--device", "--dtype", "--out", "--overwrite", "--degree"):
        assert opt in text
