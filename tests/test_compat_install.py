"""The runtime-only install: a clean venv with torch 2.13.0 and ``pip install <repo>`` (no extra) applies a
calibration inside a transformers model, and carries none of the profiling stack.

Slow (a venv, a wheel build and the transformers download the first time; pip's cache serves reruns).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROFILING_STACK = ("h5py", "scipy", "statsmodels", "highspy", "matplotlib", "skimage", "sklearn", "pyarrow", "gguf")

RUNTIME_EXAMPLE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import LlavaForConditionalGeneration
    from posbias.runtime import Calibration, enable_pruning

    folder = sys.argv[1]
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    cal = Calibration.from_pretrained(folder)
    inputs = torch.load(folder + "/inputs.pt")
    with enable_pruning(model, cal, method="posprune-pbc", keep=5, layer=1) as pruner:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    heavy = %r
    print(json.dumps({"kept": pruner.last.kept.tolist(), "tokens": pruner.last.tokens_per_layer,
                      "sequence": out[0].tolist(), "heavy": sorted(m for m in heavy if m in sys.modules)}))
    """
    % (PROFILING_STACK,)
)


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True,
                   capture_output=True, text=True, timeout=1200)


def _example_model(folder: Path, adapter, image) -> dict:
    """Save the tiny LLaVA, a calibration for it and prepared inputs; return the main environment's run."""
    from test_pruning import make_calibration

    import posbias.runtime as rt

    adapter.model.save_pretrained(folder)
    make_calibration(adapter, grid=(4, 4)).save(folder / rt.CALIBRATION_FILENAME)
    inputs = {k: v for k, v in adapter.prepare(image, "what is in the image").items()}
    torch.save(inputs, folder / "inputs.pt")
    out = subprocess.run([sys.executable, "-c", RUNTIME_EXAMPLE, str(folder)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_runtime_only_install_prunes_without_profiling_stack(tmp_path, tiny_llava_adapter, noise_image):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    _pip(python, "torch==2.13.0")  # the CPU wheel first; a bare torch requirement pulls the CUDA build
    _pip(python, str(REPO))  # non-editable, no extra
    probe = "import importlib.util, json; print(json.dumps([m for m in %r if importlib.util.find_spec(m)]))"
    found = subprocess.run([str(python), "-c", probe % (PROFILING_STACK,)], capture_output=True, text=True,
                           check=True).stdout
    assert json.loads(found) == []  # none of the profiling stack was installed

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    expected = _example_model(model_dir, tiny_llava_adapter, noise_image)  # this (full) environment
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(python), "-c", RUNTIME_EXAMPLE, str(model_dir)], capture_output=True, text=True,
                         env=clean_env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    assert len(got["kept"]) == 5 and got["kept"] == expected["kept"]
    assert got["tokens"] == expected["tokens"] and got["tokens"][-1] < got["tokens"][0]  # pruned after layer 1
    assert got["sequence"] == expected["sequence"]  # same prompt, same pruned greedy continuation

    # the profiling CLI names the extra in one line and exits non-zero, writing nothing
    out_dir = tmp_path / "run"
    cli = subprocess.run([str(venv / "bin" / "profile-bias"), "profile", "--model", "tiny-llava", "--out",
                          str(out_dir)], capture_output=True, text=True, env=clean_env, timeout=300)
    assert cli.returncode == 2
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "posbias[profile]"' in lines[0], cli.stderr
    assert not out_dir.exists()
