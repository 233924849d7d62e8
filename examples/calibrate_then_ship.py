"""Calibrate a model, then ship the calibration next to its checkpoint: profile -> fit -> export -> load back.

    python examples/calibrate_then_ship.py                      # the demo model, 16 samples
    python examples/calibrate_then_ship.py --to /models/llava-1.5-7b-hf --n 800 --device cuda

The checkpoint is a Hugging Face model folder (config.json + weights + processor). Without --to it is the
demo model's folder, ``posbias.models.demo_model_dir("demo-llava")`` (built on first use, ~1-2 minutes).
The same steps on the command line: ``profile-bias --model FOLDER --n 16`` then
``profile-bias export --calibration runs/FOLDER_NAME/posbias_calibration.json --to FOLDER``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from posbias.artifacts import export_to
from posbias.artifacts.quality import quality_of
from posbias.data.registry import iter_samples
from posbias.models import demo_model_dir, load_adapter
from posbias.pipeline import FitConfig, fit
from posbias.profiler.run import profile_samples
from posbias.runtime import Calibration


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", default=None, help="checkpoint folder to ship to (default: the demo-llava folder)")
    p.add_argument("--n", type=int, default=16, help="samples to profile (800 for a real calibration)")
    p.add_argument("--work", default="runs/calibrate-then-ship", help="folder for the store and calibration")
    p.add_argument("--device", default="cpu", help="torch device")
    args = p.parse_args(argv)

    model_dir = Path(args.to) if args.to else demo_model_dir("demo-llava")
    adapter = load_adapter(str(model_dir), device=args.device)  # the transformers model and its processor

    # 1. profile: last-token attention to every visual token at every decoder layer, into an HDF5 store
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    samples = iter_samples("embedded", n=args.n, seed=0)  # real photos shipped with installed packages
    summary = profile_samples(adapter, samples, work / "profile.h5", seed=0, total=len(samples), overwrite=True,
                              progress=False)
    print(f"profiled {summary.n_profiled} samples in {summary.seconds:.0f} s -> {work / 'profile.h5'}")

    # 2. fit: the bias curves, each with its quality verdict
    result = fit(work / "profile.h5", FitConfig(seed=0))  # every option of `profile-bias fit`, as fields
    cal_path = result.calibration.save(work / "posbias_calibration.json")
    for name, entry in result.calibration.methods.items():
        if entry.get("quality"):
            verdict, reason = quality_of(entry)
            print(f"  {name:<20} {verdict:<9} {reason}")

    # 3. export: validated, fingerprint-checked, written as MODEL_DIR/posbias_calibration.json
    shipped = export_to(cal_path, model_dir, fingerprint=adapter.fingerprint(), overwrite=True)

    # 4. load it back the way a deployment does (torch + stdlib only from here on)
    cal = Calibration.from_pretrained(model_dir)
    cal.check_fingerprint(adapter.fingerprint())
    print(f"shipped {shipped}; loaded back: {cal!r}")
    return shipped


if __name__ == "__main__":
    main()
