"""The scripts in examples/ run as a user runs them (subprocesses, the SmolLM2 demo model, issue 18).

The calibration is shipped into a throw-away checkpoint folder (links to the demo model's files), so the
user's demo cache is not changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import posbias

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(posbias.__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)


@pytest.mark.slow
def test_calibrate_then_ship_then_prune_and_generate(tmp_path):
    from posbias.models import demo_model_dir

    demo = demo_model_dir("demo-llava")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in demo.iterdir():
        if f.name != "posbias_calibration.json":
            (ckpt / f.name).symlink_to(f)
    had_cal = (demo / "posbias_calibration.json").exists()

    ship = _run("calibrate_then_ship.py", "--to", str(ckpt), "--n", "6", "--work", str(tmp_path / "work"))
    assert ship.returncode == 0, ship.stderr[-3000:]
    assert (ckpt / "posbias_calibration.json").is_file() and not (ckpt / "posbias_calibration.json").is_symlink()
    assert "shipped" in ship.stdout and "loaded back: Calibration(model=" in ship.stdout
    assert "posprune-pbc" in ship.stdout and ("weak" in ship.stdout or "good" in ship.stdout)  # the verdicts
    assert (demo / "posbias_calibration.json").exists() == had_cal  # the demo cache is untouched

    run = _run("prune_and_generate.py", "--model", str(ckpt), "--keep", "32", "--max-new-tokens", "6")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("posprune: kept 32 of 576 visual tokens after layer")
    per_row = eval(lines[1].split(":", 1)[1])  # noqa: S307  (a list literal the script printed)
    assert len(per_row) == 24 and sum(per_row) == 32
    assert lines[2].startswith("full answer:") and lines[3].startswith("pruned answer:")
